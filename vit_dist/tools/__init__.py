"""Commands beside training: bench, infer, export, weight import, demo data, plots."""
