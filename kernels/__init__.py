"""Triton kernels, installed as ``shala.kernels`` (importing this package does not import triton)."""
