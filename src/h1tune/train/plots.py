"""The loss curve a run writes at the end (loss_curve.png), read back from metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

from h1tune.train.run_dir import METRICS_FILE

LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(output_dir: str | Path) -> Path | None:
    """Train and eval loss against step, from metrics.jsonl; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    _label(ax, "loss")
    return _save(fig, Path(output_dir) / LOSS_CURVE_FILE)


def _label(ax, ylabel: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


REWARDS_CURVE_FILE = "rewards_curve.png"


def plot_rewards_curve(output_dir: str | Path) -> Path | None:
    """DPO/KTO: reward margin and preference accuracy; GRPO: mean reward and completion length (train and
    eval) against step; None for SFT runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    panels = [("rewards/margins", "reward margin"), ("rewards/accuracies", "preference accuracy"),
              ("reward", "mean reward (grpo)"), ("completions/mean_length", "completion length (grpo)")]
    panels = [(key, label) for key, label in panels if any(key in r or f"eval_{key}" in r for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for prefix, style in (("", {}), ("eval_", {"marker": "o"})):
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                ax.plot(*zip(*points), label=f"{prefix.rstrip('_') or 'train'} {label}", **style)
        _label(ax, label)
    return _save(fig, Path(output_dir) / REWARDS_CURVE_FILE)

