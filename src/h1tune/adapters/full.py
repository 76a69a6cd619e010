"""Full fine-tuning: every parameter trains except the FREEZE_GROUPS a user keeps frozen."""

from __future__ import annotations

import re
from typing import Any

from h1tune.errors import ConfigError
from h1tune.policy import FREEZE_GROUPS


def freeze_for_full(model: Any, freeze: list[str]) -> list[str]:
    """Full fine-tuning: train every parameter except the FREEZE_GROUPS named; return the frozen names.

    Buffers (the μP `mup_vector`) are never touched: they are not parameters. Unknown group names
    never get here: config.py refuses them.
    """
    frozen = []
    for name, param in model.named_parameters():
        hit = any(re.search(FREEZE_GROUPS[g], name) for g in freeze)
        param.requires_grad_(not hit)
        if hit:
            frozen.append(name)
    for group in freeze:
        if not any(re.search(FREEZE_GROUPS[group], n) for n in frozen):
            raise ConfigError(f"adapter.freeze: {group!r} matches no parameter of this model; remove it")
    if len(frozen) == sum(1 for _ in model.parameters()):
        raise ConfigError(f"adapter.freeze: {freeze} freezes every parameter; nothing would train")
    return frozen
