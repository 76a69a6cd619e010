"""The typed h1tune config: a YAML file plus dotted command-line overrides.

    cfg = load_config("examples/quickstart.yaml", ["training.learning_rate=1e-4"])

Keys reuse the Hugging Face / PEFT names users already know. Unknown keys are errors, and
every problem is reported at once with its path (``adapter.r: must be > 0, got 0``).
This module must not import torch: `h1tune --help` and `h1tune check` stay instant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from h1tune.config_checks import (DPO_LOSS_TYPES, GRPO_LOSS_TYPES, KTO_LOSS_TYPES, distributed_checks,
                                  objective_checks)
from h1tune.errors import ConfigError
from h1tune.policy import FREEZE_GROUPS, target_spelling_problems

DEFAULT_TARGETS = ["attention", "mamba", "mlp"]

# Each choice list is spelled once, here; the CLI and the other modules take them with get_args.
Quantization = Literal["none", "4bit", "8bit"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
# Preference formats (DPO pairs, then KTO's unpaired rows), in detection order: h1tune.data.preference.
PreferenceFormat = Literal["sharegpt_ranking", "preference", "kto_sharegpt", "kto_messages", "kto_prompt_completion"]
Objective = Literal["sft", "dpo", "kto", "grpo"]
TextUnit = Literal["line", "paragraph", "file"]
# How several processes share a run (h1tune.train.strategies): none (one process, or plain DDP under a
# launcher), ddp, fsdp (FSDP2), or DeepSpeed ZeRO stage 2 / 3.
Distributed = Literal["none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which Falcon-H1 to load and how."""

    name_or_path: str = Field("tiny", description="hub id, local directory, or embedded preset (tiny, tiny-h1r, tiny-h1tiny, tiny-90m, 0.5b, 1.5b, ...)")
    dtype: DType = "auto"
    quantization: Quantization = "none"
    llm_int8_skip_modules: list[str] = Field(default_factory=list, description="added to out_proj and lm_head, never replacing them")
    trust_remote_code: bool = False
    use_safetensors: bool = True
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    seed: int = Field(0, description="seed for the random weights of an embedded preset")
    adapter: str | None = Field(None, description="a LoRA adapter dir to start from (e.g. an SFT run's final/); it keeps training")


class DataSourceConfig(_Section):
    """One dataset: a local file (json, jsonl, parquet, csv) or a Hugging Face dataset id."""

    path: str
    format: Literal[get_args(DataFormat) + get_args(PreferenceFormat)] = "auto"  # type: ignore[valid-type]
    weight: float = Field(1.0, gt=0)
    split: str = "train"
    text_unit: TextUnit | None = Field(None, description=".txt/.md sources: this source's unit (default: data.text_unit)")


def _as_sources(value: Any) -> Any:
    """Accept `train: file.jsonl` and `train: [a.json, {path: b.json, weight: 2}]` alike."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class DataConfig(_Section):
    """Training data, its formatting and how it is batched."""

    train: list[DataSourceConfig] = Field(default_factory=list)
    eval: list[DataSourceConfig] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out from train when no eval set is given")
    max_length: int = Field(2048, gt=0)
    truncation: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    system_prompt: str | None = None
    assistant_only_loss: bool = True
    reasoning: Literal["train", "mask", "drop"] = Field(
        "train", description="reasoning traces on assistant turns (reasoning_content, <think>, reasoning parts): "
        "train (rendered and trained), mask (rendered, not trained) or drop (not rendered)")
    empty_assistant: Literal["drop", "train"] = Field(
        "drop", description="rows with an assistant turn that has no content and no tool call: drop (counted in "
        "the summary) or train (the turn then teaches the end-of-turn token alone)")

    text_unit: TextUnit = Field("line", description=".txt/.md files and folders of them: one document per line "
                                "(LLaMA-Factory's convention), per paragraph (blank-line separated) or per file")

    _sources = field_validator("train", "eval", mode="before")(_as_sources)

    @model_validator(mode="after")
    def _source_text_units(self) -> "DataConfig":
        """A source without its own text_unit takes data.text_unit."""
        for source in [*self.train, *self.eval]:
            if source.text_unit is None:
                object.__setattr__(source, "text_unit", self.text_unit)
        return self


class AdapterConfig(_Section):
    """LoRA (QLoRA when model.quantization is set) or full fine-tuning."""

    method: Literal["lora", "full"] = "lora"
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input; 0 (peft's default) "
                                "because on CPU drawing the masks took ~9% of a 0.5B step")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_modules: list[str] = Field(default_factory=list)
    use_rslora: bool = False
    freeze: list[str] = Field(default_factory=list, description="full fine-tuning: parameter groups kept frozen")
    probe: bool = Field(True, description="prove every adapter changes the loss before training")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class RewardConfig(_Section):
    """One GRPO reward: a built-in by `name` (math_answer, think_format, tool_call, length) or a user
    `function` ('path/to/rewards.py:score'), and its weight in the sum."""

    name: str | None = None
    function: str | None = None
    weight: float = 1.0
    target: int | None = Field(None, gt=0, description="length: the target completion length in characters")


class TrainingConfig(_Section):
    """Optimiser, schedule and loop settings; `None` means "take it from the recipe"."""

    objective: Objective = Field("sft", description="sft, preference tuning: dpo (pairs) or kto (labelled completions), "
                                 "or grpo (online RL on prompts with training.rewards)")
    recipe: Literal["lora", "tii_sft", "tii_dpo", "dpo", "kto", "grpo", "h1r_grpo"] | None = Field(
        None, description="default: lora for LoRA SFT, tii_sft for full SFT, dpo / kto / grpo for those objectives; "
        "h1r_grpo: GRPO for long reasoning traces (see train/recipes.py for each value's source)")
    beta: float | None = Field(None, ge=0, description="dpo/kto: deviation from the reference (TRL's beta); grpo: the "
                               "KL coefficient (0: no reference forward)")
    loss_type: list[str] | None = Field(None, description="dpo/kto/grpo: TRL loss names, e.g. sigmoid_norm; default from the recipe")
    rewards: list[RewardConfig] = Field(default_factory=list, description="grpo: reward functions, summed with their weights")
    num_generations: int = Field(4, ge=2, description="grpo: completions sampled per prompt (a group)")
    max_completion_length: int = Field(128, gt=0, description="grpo: tokens generated per completion at most")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling of the rollouts")
    rollouts: Literal["transformers", "vllm"] = Field(
        "transformers", description="grpo: who generates: transformers (any device, log-prob parity checked) or "
        "vllm (CUDA, colocate mode, pip install -e '.[vllm]')")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="grpo with rollouts vllm: share of "
                                               "each GPU vLLM may hold beside training")
    schedule_epochs: float | None = Field(None, gt=0, description="the LR schedule spans this many epochs; training stops after num_train_epochs")
    learning_rate: float | None = Field(None, gt=0)
    lr_scheduler_type: str | None = None
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    weight_decay: float | None = Field(None, ge=0.0)
    adam_beta1: float | None = Field(None, ge=0.0, lt=1.0)
    adam_beta2: float | None = Field(None, ge=0.0, lt=1.0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int = Field(200, gt=0)
    save_total_limit: int | None = Field(3, gt=0)
    seed: int = 42
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations in backward (less memory, ~30% slower); auto: on when the "
        "memory estimate without it would not fit")
    context_parallel: int = Field(1, ge=1, description="ranks that share one packed row (contiguous slices; the Mamba "
                                  "state and attention keys cross between them); with --nproc = data-parallel x this")
    distributed: Distributed = Field("none", description="with `h1tune train --nproc N`: ddp, fsdp (FSDP2, sharded), "
                                     "deepspeed_zero2 or deepspeed_zero3; see docs/distributed.md")
    report_to: list[str] = Field(default_factory=lambda: ["auto"], description="'auto' = tensorboard when installed")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _loss_names(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class H1tuneConfig(_Section):
    """A whole run: the five sections."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str = "runs/h1tune"


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as `path: must be ..., got ...`."""
    path = ".".join(str(p) for p in error["loc"]) or "<root>"
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        valid = _valid_keys(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{path}: required"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"{path}: must be {bounds[kind]} {bound}, got {got!r}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')}, got {got!r}"
    return f"{path}: {error['msg'].lower()}, got {got!r}"


def _valid_keys(loc: tuple) -> list[str]:
    """The field names of the section at `loc`, for an unknown-key message."""
    section: Any = H1tuneConfig
    for key in loc:
        if isinstance(key, int):  # an item of a list of sections, e.g. data.train.0
            continue
        annotation = section.model_fields[key].annotation
        section = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type)), annotation)
    return list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []


def _cross_checks(cfg: H1tuneConfig) -> list[str]:
    """Contradictions between fields, each with the choice that fixes it."""
    problems = []
    if cfg.model.quantization != "none" and cfg.adapter.method == "full":
        problems.append(
            f"model.quantization: {cfg.model.quantization!r} needs adapter.method: lora "
            "(quantized base weights cannot be trained); set model.quantization: none for full fine-tuning"
        )
    if cfg.training.max_steps == 0:
        problems.append("training.max_steps: 0 would train nothing (the Trainer would still run one step and save); "
                        "set a positive number of steps, or -1 to train for training.num_train_epochs")
    if cfg.adapter.freeze and cfg.adapter.method != "full":
        problems.append("adapter.freeze: only applies to adapter.method: full (LoRA already freezes the base)")
    for group in cfg.adapter.freeze:
        if group not in FREEZE_GROUPS:
            problems.append(f"adapter.freeze: unknown group {group!r}; choose from {sorted(FREEZE_GROUPS)}")
    if cfg.adapter.method == "lora":
        problems += [f"adapter.target_modules: {p}" for p in
                     target_spelling_problems(cfg.adapter.target_modules, cfg.adapter.exclude_modules)]
    return problems + objective_checks(cfg) + distributed_checks(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str, problems: list[str]) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            problems.append(f"{'.'.join(keys[: i + 1])}: is a value, not a section; cannot set {dotted}")
            return
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply `a.b=value` strings (values parsed as YAML); return the malformed ones as problems."""
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
            continue
        try:
            _set_dotted(tree, key.strip(), raw, problems)
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})")
    return problems


def config_from_dict(tree: dict[str, Any], problems: list[str] | None = None) -> H1tuneConfig:
    """Validate a plain dict; raise one ConfigError listing every problem."""
    problems = list(problems or [])
    try:
        cfg = H1tuneConfig.model_validate(tree)
    except ValidationError as exc:
        problems += [_describe(e) for e in exc.errors()]
        cfg = _partial_config(tree)
    if cfg is not None:
        problems += _cross_checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _partial_config(tree: dict[str, Any]) -> H1tuneConfig | None:
    """Validate each section alone so the cross-checks still run on the sections that are valid."""
    sections = {}
    for name, field in H1tuneConfig.model_fields.items():
        if name not in tree:
            continue
        try:
            sections[name] = H1tuneConfig.model_validate({name: tree[name]}).__dict__[name]
        except ValidationError:
            sections[name] = field.get_default(call_default_factory=True)
    try:
        return H1tuneConfig(**sections)
    except ValidationError:
        return None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> H1tuneConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply `--set` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with sections model, data, adapter, training")
        tree = _resolve_relative_paths(tree, path.parent)
    problems = apply_overrides(tree, list(overrides))
    return config_from_dict(tree, problems)


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """One rule: a relative path written in a config file is relative to that file's folder.

    So a config works from any directory. Data sources and model names that are not local paths
    (hub ids such as `tatsu-lab/alpaca`, presets such as `tiny`) are left as they are; paths given
    with `--set` are typed in a shell and so are relative to the current directory.
    """
    data = tree.get("data")
    if isinstance(data, dict):
        for split in ("train", "eval"):
            sources = _as_sources(data.get(split))
            if not isinstance(sources, list):
                continue
            for source in sources:
                if isinstance(source, dict) and isinstance(source.get("path"), str):
                    source["path"] = _relative_to(base, source["path"], only_if_exists=not _looks_local(source["path"]))
            data[split] = sources
    if isinstance(tree.get("output_dir"), str):
        tree["output_dir"] = _relative_to(base, tree["output_dir"], only_if_exists=False)
    model = tree.get("model")
    if isinstance(model, dict):
        for key in ("name_or_path", "adapter"):
            if isinstance(model.get(key), str):
                model[key] = _relative_to(base, model[key], only_if_exists=True)
    rewards = (tree.get("training") or {}).get("rewards") if isinstance(tree.get("training"), dict) else None
    for reward in rewards if isinstance(rewards, list) else []:  # 'rewards.py:score': the file part is a path
        if isinstance(reward, dict) and isinstance(reward.get("function"), str) and ".py:" in reward["function"]:
            file, _, name = reward["function"].rpartition(":")
            reward["function"] = f"{_relative_to(base, file, only_if_exists=False)}:{name}"
    return tree


_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")


def _looks_local(path: str) -> bool:
    return path.lower().endswith(_LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _relative_to(base: Path, path: str, only_if_exists: bool) -> str:
    """`path` joined to `base` when relative (and, if asked, only when that exists)."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = base / expanded
    return str(candidate) if candidate.exists() or not only_if_exists else path


def absolute_paths(cfg: H1tuneConfig) -> H1tuneConfig:
    """The config with every local path absolute (the current directory resolves `--set` paths),
    so a saved config means the same run from any directory and on resume."""
    def local(path: str) -> str:
        expanded = Path(path).expanduser()
        return str(expanded.resolve()) if expanded.exists() or _looks_local(path) else path

    tree = cfg.model_dump(mode="json")
    for split in ("train", "eval"):
        for source in tree["data"][split]:
            source["path"] = local(source["path"])
    tree["output_dir"] = str(Path(tree["output_dir"]).expanduser().resolve())
    for key in ("name_or_path", "adapter"):
        if isinstance(tree["model"].get(key), str):
            tree["model"][key] = local(tree["model"][key])
    for reward in tree["training"]["rewards"]:
        if reward["function"] and ".py:" in reward["function"]:
            file, _, name = reward["function"].rpartition(":")
            reward["function"] = f"{Path(file).expanduser().resolve()}:{name}"
    return H1tuneConfig.model_validate(tree)


def save_config(cfg: H1tuneConfig, path: str | Path) -> Path:
    """Write the resolved config beside a run, so the run can be reproduced from it alone."""
    from h1tune.atomic import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(absolute_paths(cfg).model_dump(mode="json"), sort_keys=False))
