"""Compiled kernels that stand in for parts of the models on particular backends."""
