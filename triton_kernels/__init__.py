"""Triton kernels and their launchers (installed as vtattn.triton_kernels)."""
