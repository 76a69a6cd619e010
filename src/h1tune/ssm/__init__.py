"""Exact packed-sequence support for Falcon-H1's Mamba-2 mixer (boundary-aware torch kernels)."""


def is_installed() -> bool:
    """Whether h1tune's boundary-aware kernels sit at transformers' kernel seam."""
    return False
