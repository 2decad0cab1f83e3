"""The CPU backend: fused float32 kernels for the model seam, the sleeping host thread, thread counts."""
