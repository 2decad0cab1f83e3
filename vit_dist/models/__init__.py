"""The Vision Transformer: `spec` (sizes, pure Python) and `vit` (MindSpore Cells, with a seam for
backend layers). Importing this package imports no MindSpore; training.assemble builds models."""
