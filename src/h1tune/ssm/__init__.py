"""Exact packed-sequence support for Falcon-H1's Mamba-2 mixer (boundary-aware torch kernels),
and its attention run one document at a time on CPU (`attention.py`).

    from h1tune import ssm
    ssm.install()   # then: model(input_ids, position_ids=..., seq_idx=..., labels=..., use_cache=False)

`install()` puts `h1tune.ssm.kernels` at transformers' kernel seam so `seq_idx` keeps the conv
and SSM state of packed documents apart on the torch path; on CUDA with mamba_ssm the real
kernels still run. The kernels live in `kernels.py`, the seam and its version check in `seam.py`.
Importing this package does not import torch.
"""


def install() -> None:
    """Route Falcon-H1's Mamba kernel calls through h1tune's boundary-aware kernels, and SDPA calls
    of packed rows through the per-document attention (idempotent)."""
    from h1tune.ssm import attention, seam

    seam.install()
    attention.install()


def uninstall() -> None:
    """Restore transformers' own kernel and attention functions."""
    from h1tune.ssm import attention, seam

    seam.uninstall()
    attention.uninstall()


def is_installed() -> bool:
    """Whether h1tune's boundary-aware kernels sit at transformers' kernel seam."""
    import sys

    seam = sys.modules.get("h1tune.ssm.seam")  # never imported means never installed; stays torch-free
    return seam is not None and seam.is_installed()
