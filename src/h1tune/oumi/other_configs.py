"""OUMI evaluation and inference configs: recognised, and answered with the h1tune command to run.

They are not training configs, so `h1tune train` / `check` / `convert-config` refuse them with one
clear message that spells out the equivalent `h1tune eval` or `h1tune chat` / `generate` command.
"""

from __future__ import annotations

from typing import Any

from h1tune.errors import H1tuneError


def not_training_error(kind: str, tree: dict[str, Any], source: str) -> H1tuneError:
    """The error for an OUMI evaluation or inference config given where a training config belongs."""
    model = (tree.get("model") or {}).get("model_name", "MODEL")
    if kind == "evaluation":
        body = _eval_commands(tree, model)
        what = "an OUMI evaluation config (EvaluationConfig: model, tasks, generation)"
    else:
        body = _inference_commands(tree, model)
        what = "an OUMI inference config (InferenceConfig: model, generation, engine)"
    return H1tuneError(f"{source} is {what}, not a training config; h1tune trains from OUMI training configs "
                       "(model, data, training, peft, fsdp). The equivalent here:\n" + "\n".join(body))


def _eval_commands(tree: dict[str, Any], model: str) -> list[str]:
    """One `h1tune eval` line per few-shot count (h1tune's --num-fewshot applies to every task of a run)."""
    by_shots: dict[Any, list[str]] = {}
    other = []
    for task in tree.get("tasks") or []:
        if not isinstance(task, dict):
            continue
        name, backend = task.get("task_name"), str(task.get("evaluation_backend", "")).lower()
        if backend != "lm_harness" or not name:
            other.append(f"{name or '?'} ({backend or 'no backend'})")
            continue
        shots = (task.get("eval_kwargs") or {}).get("num_fewshot", task.get("num_fewshot"))
        by_shots.setdefault(shots, []).append(name)
    batch = (tree.get("generation") or {}).get("batch_size")
    lines = []
    for shots, names in by_shots.items():
        flags = f" --num-fewshot {shots}" if shots is not None else ""
        flags += f" --batch-size {batch}" if batch else ""
        lines.append(f"  h1tune eval {model} --tasks {','.join(names)}{flags}")
    if other:
        lines.append(f"  (not available in h1tune eval, which runs lm-evaluation-harness tasks: {', '.join(other)})")
    if tree.get("enable_wandb"):
        lines.append("  (enable_wandb: h1tune eval writes its numbers with --output FILE.json instead)")
    return lines or [f"  h1tune eval {model} --tasks TASKS"]


def _inference_commands(tree: dict[str, Any], model: str) -> list[str]:
    gen = tree.get("generation") or {}
    sampling = gen.get("use_sampling", False) and gen.get("temperature", 0.0)
    flags = f" --max-new-tokens {gen['max_new_tokens']}" if "max_new_tokens" in gen else ""
    if sampling:
        flags += f" --temperature {gen['temperature']}"
        flags += f" --top-p {gen['top_p']}" if gen.get("top_p") is not None else ""
    dtype = (tree.get("model") or {}).get("torch_dtype_str")
    flags += f" --dtype {dtype}" if dtype in ("float32", "bfloat16", "float16") else ""
    lines = [f"  h1tune chat {model}{flags}", f"  h1tune generate {model} --prompt TEXT{flags}"]
    if tree.get("input_path"):
        lines.append(f"  h1tune eval {model} --samples {tree['input_path']}"
                     + (f" --samples-output {tree['output_path']}" if tree.get("output_path") else ""))
    unsupported = [f"{k}={gen[k]}" for k in ("min_p", "presence_penalty", "frequency_penalty", "num_beams")
                   if gen.get(k) not in (None, 0, 0.0, 1)]
    if unsupported:
        lines.append(f"  (not available in h1tune's sampling: {', '.join(unsupported)})")
    return lines
