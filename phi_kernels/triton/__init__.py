"""Triton kernels, one file per op. Imported lazily: triton is optional for the package."""
