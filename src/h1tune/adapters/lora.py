"""LoRA on Falcon-H1: resolve the config's targets against the real module names, safely.

    names = resolve_targets(model, cfg.adapter)      # refuses conv1d, mamba.out_proj, lm_head
    peft_model = get_peft_model(model, lora_config(cfg.adapter, names))
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from h1tune.errors import ConfigError
from h1tune.policy import (SAFE_ALTERNATIVE, select_paths, bypassed_reason, never_adapted, spec_matches,
                           target_spelling_problems)

if TYPE_CHECKING:
    from h1tune.config import AdapterConfig

log = logging.getLogger("h1tune")


def resolve_targets(model: Any, adapter_cfg: "AdapterConfig") -> list[str]:
    """The full module names LoRA will wrap in `model`, after `exclude_modules`; refuses unsafe ones.

    Raises:
        ConfigError: a spec matching nothing, or any selected module that is conv1d, mamba.out_proj,
            lm_head or not a Linear layer; every problem at once.
    """
    import torch

    named = dict(model.named_modules())
    paths = [name for name in named if name]
    specs, exclude = list(adapter_cfg.target_modules), list(adapter_cfg.exclude_modules)
    problems = [f"adapter.target_modules: {p}" for p in target_spelling_problems(specs, exclude)
                if "matches no Falcon-H1 module" not in p]
    if problems:
        raise ConfigError(problems)
    selected = select_paths(specs, exclude, paths)
    for spec, hits in selected.items():
        if not hits:
            problems.append(f"adapter.target_modules: {spec!r} matches no module of this model (after "
                            f"adapter.exclude_modules); module names look like {_example_linear(paths)!r}")
    for spec in exclude:
        if not any(spec_matches(spec, p) for p in paths):
            log.warning("adapter.exclude_modules: %r matches no module of this model", spec)
    chosen = [p for p in paths if any(p in hits for hits in selected.values())]
    for path in chosen:
        reason = bypassed_reason(path)
        if reason:
            problems.append(f"adapter.target_modules: selects {path!r}: {reason}; {SAFE_ALTERNATIVE}")
        elif never_adapted(path):
            problems.append(f"adapter.target_modules: selects {path!r}; h1tune does not adapt lm_head; remove it")
        elif not isinstance(named[path], torch.nn.Linear):
            problems.append(f"adapter.target_modules: selects {path!r}, a {type(named[path]).__name__}, not a "
                            "Linear layer; use a group (attention, mamba, mlp) or Linear names (q_proj, in_proj)")
    if not chosen and not problems:
        problems.append(f"adapter.target_modules: {specs} selects no module; {SAFE_ALTERNATIVE}")
    if problems:
        raise ConfigError(problems)
    return chosen


def _example_linear(paths: list[str]) -> str:
    return next((p for p in paths if p.endswith("q_proj")), paths[-1] if paths else "")


def lora_config(adapter_cfg: "AdapterConfig", module_names: list[str]):
    """A peft LoraConfig over an explicit list of full module names (never `all-linear`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.lora_alpha,
        lora_dropout=adapter_cfg.lora_dropout,
        use_rslora=adapter_cfg.use_rslora,
        target_modules=list(module_names),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_kbit(model: Any) -> Any:
    """peft's k-bit preparation: base frozen, non-reentrant gradient checkpointing, input grads on."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    # Non-reentrant checkpointing does not need it; a trainer that switches to reentrant would.
    model.enable_input_require_grads()
    return model
