"""OUMI's `model` and `data` sections onto h1tune's `model` and `data`.

OUMI names a dataset by a hub id or by one of its registered dataset classes (`dataset_name`),
optionally reading a local `dataset_path`; h1tune reads a local file or a hub id and detects the
row format itself. Offline, a hub id fails with h1tune's usual data error: point it at a file
with `--set data.train=FILE`.
"""

from __future__ import annotations

from typing import Any

from h1tune.oumi.mapper import Section
from h1tune.oumi.report import IGNORED, MAPPED, NOT_HONOURED

DTYPES = {"auto": "auto", "f32": "float32", "float32": "float32", "float": "float32", "bf16": "bfloat16",
          "bfloat16": "bfloat16", "f16": "float16", "float16": "float16", "half": "float16"}
OFFLINE_HINT = "a Hugging Face dataset id; offline, point it at a local file with --set data.train=FILE"
# OUMI dataset classes that rewrite rows before training, and how h1tune's reading differs.
ROW_REWRITES = {
    name: "OUMI's AlpacaDataset adds a fixed system prompt ('Below is an instruction that describes a task...') "
    "and joins input as '\\n\\n### Input:\\n'; h1tune reads the rows as its alpaca format (instruction and input "
    "joined by a newline, no system prompt; set data.system_prompt to add one)"
    for name in ("yahma/alpaca-cleaned", "tatsu-lab/alpaca")
}
COLLATORS = {"text_with_padding": False, "text_completions_only_with_padding": True}


def dtype_name(value: Any) -> Any:
    return DTYPES.get(value.lower(), value) if isinstance(value, str) else value


def map_model(sec: Section) -> None:
    """Which checkpoint, in which dtype, with which attention; the rest h1tune decides or refuses."""
    sec.map("model_name", "model.name_or_path", note="hub id or directory; offline: --set model.name_or_path=tiny "
            "(or a local checkpoint)")
    sec.map("model_revision", "model.revision")
    if sec.get("adapter_model"):
        sec.map("adapter_model", "model.adapter", note="LoRA training continues from this adapter")
    else:
        sec.refuse("adapter_model", "")
    if sec.get("model_max_length") is not None:
        sec.map("model_max_length", "data.max_length", note="longer examples are truncated (data.truncation)")
    else:
        sec.note(NOT_HONOURED, "model_max_length", "unset: OUMI truncates at the tokenizer's limit, h1tune at "
                 "data.max_length (2048 unless set)", default="model_max_length" not in sec.values)
    sec.map("torch_dtype_str", "model.dtype", convert=dtype_name)
    sec.map("trust_remote_code", "model.trust_remote_code")
    if sec.get("attn_implementation") is not None:
        sec.map("attn_implementation", "model.attn_implementation")
    else:
        sec.ignore("attn_implementation", "unset: transformers' default (sdpa), as h1tune")
    name = sec.get("model_name")
    sec.agree("tokenizer_name", lambda v: v in (None, name), "the model's own tokenizer, as h1tune loads",
              otherwise="h1tune loads the tokenizer saved with the model (Falcon-H1's, with its chat template)")
    sec.refuse("tokenizer_pad_token", "h1tune pads with the tokenizer's pad token (padding never reaches the loss)")
    sec.refuse("tokenizer_kwargs", "h1tune loads the tokenizer with its defaults")
    sec.refuse("processor_kwargs", "for vision processors; Falcon-H1 is text-only")
    sec.agree("load_pretrained_weights", {True}, "h1tune loads the checkpoint's weights",
              otherwise="h1tune always loads the checkpoint's weights; for random weights use a preset "
              "(model.name_or_path: tiny, 0.5b or 1.5b)")
    sec.agree("compile", {False}, "no compilation, as h1tune", otherwise="h1tune does not torch.compile the model "
              "(OUMI itself rejects model.compile; it wants training.compile)")
    sec.refuse("chat_template", "h1tune renders with the model's own chat template (Falcon-H1's), against which "
               "its assistant-only masks are checked")
    sec.refuse("chat_template_kwargs", "h1tune renders the chat template without extra arguments")
    sec.ignore("device_map", "h1tune places the model itself (one device)")
    sec.refuse("model_kwargs", "h1tune passes no extra from_pretrained arguments")
    sec.agree("enable_liger_kernel", {False}, "not requested", ok_kind=IGNORED,
              otherwise="not used: liger-kernel (CUDA/Triton kernels for speed and memory; the loss is the same) is "
              "not an h1tune dependency, and its patched forward would replace transformers' Falcon-H1 forward on "
              "which h1tune's exact-packing Mamba path, its loss and the adapter probe are verified")
    sec.ignore("shard_for_eval", "evaluation only (OUMI shards the model across GPUs to evaluate)")
    sec.refuse("freeze_layers", "h1tune freezes parameter groups instead: adapter.freeze (embeddings, lm_head, "
               "norms, attention, mamba, mamba_ssm, mlp) under adapter.method: full")
    sec.ignore("tool_call_parser", "inference only")


def map_data(data: Section, splits: dict[str, Section], objective: str) -> None:
    """Datasets of the train and validation splits, the train split's loss target and packing."""
    data.consulted.update(("train", "validation", "test"))
    train = splits["train"]
    _map_datasets(train, "data.train")
    _map_mixture(train)
    if objective == "sft":
        _map_loss_target(train)
    else:
        train.refuse("collator_name", f"{objective}: h1tune builds the preference batches itself")
        train.refuse("train_target", f"{objective}: the loss is on the completions")
    train.map("pack", "data.packing", note="exact: packed examples never see each other (attention and Mamba "
              "state reset at each boundary)")
    train.refuse("collator_kwargs", "h1tune's collator takes no arguments")
    train.agree("stream", {False}, "h1tune reads the whole dataset", otherwise="h1tune reads the whole dataset up "
                "front (its validation and token counts need every row)")
    train.ignore("target_col", "deprecated in OUMI")
    train.ignore("seed", "h1tune mixes and shuffles with training.seed")
    train.ignore("use_torchdata", "data loading machinery")
    _map_datasets(splits["validation"], "data.eval")
    for name in ("validation", "test"):
        split = splits[name]
        if name == "test" and split.get("datasets"):
            split.note(IGNORED, "datasets", "OUMI trains without the test split; score it with h1tune eval --data FILE")
        split.consulted.add("datasets")
        for key in split.values:
            if key != "datasets":
                split.ignore(key, "the test split is not used in training" if name == "test" else
                             "h1tune applies the train split's settings to eval data too")


def _map_datasets(split: Section, h1tune: str) -> None:
    split.consulted.add("datasets")
    datasets = split.get("datasets") or []
    split.tree.setdefault("data", {})[h1tune.split(".")[1]] = [{} for _ in datasets]
    for i, values in enumerate(datasets):
        sec = Section(values, f"{split.prefix}datasets.{i}.", split.tree, split.report)
        _map_dataset(sec, f"{h1tune}.{i}")
        split.children.append(sec)


def _map_dataset(sec: Section, h1tune: str) -> None:
    name = sec.get("dataset_name")
    if sec.get("dataset_path"):
        sec.map("dataset_path", f"{h1tune}.path", note="a local file; h1tune detects its row format")
        sec.ignore("dataset_name", "names OUMI's loader class for dataset_path; h1tune reads the rows as they are")
    else:
        sec.map("dataset_name", f"{h1tune}.path", note=OFFLINE_HINT)
        sec.ignore("dataset_path", "unset")
    if name in ROW_REWRITES:
        sec.report.add(NOT_HONOURED, sec.prefix + "dataset_name (rows)", name, reason=ROW_REWRITES[name])
    sec.map("split", f"{h1tune}.split")
    kwargs = sec.get("dataset_kwargs") or {}
    if kwargs and set(kwargs) <= {"assistant_only"}:
        sec.note(MAPPED, "dataset_kwargs", "assistant_only sets data.assistant_only_loss (with data.train.collator_name)")
    else:
        sec.refuse("dataset_kwargs", f"h1tune's data reader takes no loader arguments (got {sorted(kwargs)}); the "
                   "loss target is data.assistant_only_loss")
    sec.refuse("subset", "h1tune loads a dataset's default configuration; save the subset to a file and point "
               f"{h1tune}.path at it")
    sec.refuse("sample_count", f"h1tune takes every row; scale a source with {h1tune}.weight "
               "(rows = round(weight * n))")
    sec.refuse("mixture_proportion", "see data.train.mixture_strategy")
    sec.ignore("shuffle", "h1tune's trainer shuffles every epoch with training.seed")
    sec.ignore("seed", "h1tune shuffles and samples with training.seed")
    sec.ignore("shuffle_buffer_size", "streaming only")
    sec.agree("trust_remote_code", {False}, "no dataset code runs, as h1tune",
              otherwise="h1tune never runs a dataset's loading script; save the rows to a file")
    sec.ignore("transform_num_workers", "speed only")


def _map_mixture(train: Section) -> None:
    proportions = [d.get("mixture_proportion") for d in train.get("datasets") or []]
    if all(p is None for p in proportions):
        train.ignore("mixture_strategy", "no mixture_proportion: OUMI concatenates the datasets, as h1tune does "
                     "(weight 1.0 each)")
        return
    train.note(NOT_HONOURED, "mixture_strategy", value=train.get("mixture_strategy", "first_exhausted"),
               default="mixture_strategy" not in train.values,
               reason=f"OUMI samples the datasets with probabilities {proportions}; h1tune mixes by weight (rows = "
               "round(weight * n)) and needs each dataset's size to match them: set data.train.I.weight = "
               "p_I * T / n_I, with T = min (first_exhausted) or max (all_exhausted) of n_I / p_I. Each source "
               "keeps weight 1.0 (concatenation) until then")


def _map_loss_target(train: Section) -> None:
    """OUMI's collator decides which tokens carry loss; h1tune's data.assistant_only_loss."""
    name = train.get("collator_name")
    target = train.get("train_target")
    kwargs_only = any((d.get("dataset_kwargs") or {}).get("assistant_only") for d in train.get("datasets") or [])
    if name in (None, *COLLATORS):
        assistant_only = COLLATORS.get(name, False) or kwargs_only
        why = ("the loss is on the assistant tokens" if assistant_only else
               "OUMI's collator trains on every token, prompts included; --set data.assistant_only_loss=true for "
               "h1tune's assistant-only loss")
        train.map("collator_name", "data.assistant_only_loss", default=None, convert=lambda _: assistant_only,
                  note=why)
    else:
        train.note(NOT_HONOURED, "collator_name", f"{name!r} is not a text collator h1tune has; it builds its own "
                   "batches (data.assistant_only_loss, data.packing)")
    train.agree("train_target", lambda v: v is None or str(v).lower() == "all_assistant_turns",
                "every assistant turn carries loss, as h1tune's data.assistant_only_loss",
                otherwise="h1tune trains on every assistant turn, not only the final one")
