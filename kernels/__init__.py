"""Triton kernels of rectok_fast, installed as ``rectok_fast.kernels`` (one file per fused op)."""
