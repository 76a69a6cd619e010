"""GRPO rollouts on vLLM (`training.rollouts: vllm`): TRL's colocate mode, prefix caching off.

    pip install -e '.[vllm]'        # CUDA machines; vLLM runs Falcon-H1 (`falcon_h1`) since its PR #18406

TRL's GRPOTrainer owns the engine: in colocate mode every training process holds a vLLM `LLM` on its own
GPU (`gpu_memory_utilization` of it), and before each generation TRL pushes the current weights into it
(`sync_weights`: for a PEFT model the adapter is merged, the merged weights loaded, the merge undone; h1tune's
adapter policy keeps adapters off `out_proj`/`conv1d`, so that merge is the verified one). h1tune adds:

- prefix caching off. vLLM caches a prompt's Mamba state per block and reuses it for every completion that
  shares the prefix, which GRPO's groups always do; for hybrid models that cache has returned states of the
  wrong prefix (vLLM #53912, #57267, #51250), and then the sampled tokens are not the policy's. TRL's colocate
  `LLM(...)` takes no flag for it, so the constructor TRL calls is wrapped. The cost is one prompt prefill per
  completion instead of per group: small next to generating the completions;
- a clear refusal where vLLM cannot run (no CUDA device, vLLM not installed), before any weights load.

Not run here (no GPU on the machines h1tune is tested on): the arguments and the wrapper are tested; the
generation itself is TRL's and vLLM's.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from h1tune.config import H1tuneConfig
from h1tune.errors import H1tuneError

INSTALL = "pip install -e '.[vllm]'"
_WRAPPED = "_h1tune_no_prefix_caching"


def vllm_arguments(cfg: H1tuneConfig) -> dict[str, Any]:
    """GRPOConfig fields for rollouts on vLLM in colocate mode (nothing when rollouts stay on transformers)."""
    t = cfg.training
    if t.rollouts != "vllm":
        return {}
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": t.vllm_gpu_memory_utilization,
            "vllm_max_model_length": cfg.data.max_length, "vllm_enable_sleep_mode": False,
            # h1tune's own parity metric reads its transformers rollouts; on vLLM, TRL's truncated importance
            # sampling corrects for the engines' differences instead (its default, kept explicit)
            "vllm_importance_sampling_correction": True}


def require_vllm() -> None:
    """Refuse `rollouts: vllm` where it cannot run, saying what to change."""
    import torch

    if not torch.cuda.is_available():
        raise H1tuneError("training.rollouts: vllm needs a CUDA GPU and this machine has none; use "
                          "training.rollouts: transformers (h1tune's CPU rollouts), or run on a GPU machine")
    if importlib.util.find_spec("vllm") is None:
        raise H1tuneError(f"training.rollouts: vllm needs vLLM, which is not installed: {INSTALL} (or set "
                          "training.rollouts: transformers)")


def without_prefix_caching() -> None:
    """Make the `LLM` TRL's colocate mode constructs start with `enable_prefix_caching=False` (idempotent)."""
    from trl.generation import vllm_generation

    llm = getattr(vllm_generation, "LLM", None)
    if llm is None:
        raise H1tuneError(f"training.rollouts: vllm: TRL could not import vLLM ({INSTALL})")
    if getattr(llm, _WRAPPED, False):
        return

    @functools.wraps(llm, updated=())
    def no_prefix_caching(*args, **kwargs):
        return llm(*args, **{**kwargs, "enable_prefix_caching": False})

    setattr(no_prefix_caching, _WRAPPED, True)
    vllm_generation.LLM = no_prefix_caching
