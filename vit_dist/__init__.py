"""vit-dist: distributed Vision Transformer training with MindSpore (Ascend, GPU, CPU)."""
__version__ = "0.1.0"
