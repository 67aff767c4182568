"""Triton kernels and their launchers, installed as ``lorafast.kernels``."""
