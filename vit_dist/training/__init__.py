"""Training: the one assembly of a run, the step, the loop and its components, checkpoints as tensors."""
