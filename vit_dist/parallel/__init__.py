"""Parallelism applied to a built model from outside: gradient reduction and collectives."""
