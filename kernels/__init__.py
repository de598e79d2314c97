"""Triton kernels of rectok_fast, installed as ``rectok_fast.kernels`` (one file per fused op).

The op registry (:mod:`rectok_fast.ops.registry`) loads these modules when :mod:`rectok_fast.ops` is
imported; importing the ops package first keeps that order when a kernel module is imported directly.
"""
import rectok_fast.ops  # noqa: F401
