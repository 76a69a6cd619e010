"""OUMI's config schema (oumi-ai/oumi at d8ed07778d79, the commit of the shared Falcon-H1 recipes).

    kind = config_kind(tree)          # "training", "evaluation", "inference" or None (not OUMI)
    problems = schema_problems(tree)  # unknown keys (OUMI's OmegaConf schema rejects them too), missing model_name

Field names only, copied from OUMI's dataclasses (`TrainingConfig`, `ModelParams`, `DataParams`,
`DatasetSplitParams`, `DatasetParams`, `TrainingParams`, `PeftParams`, `FSDPParams`,
`DeepSpeedParams`, `EvaluationConfig`, `InferenceConfig`): OUMI itself is not a dependency.
"""

from __future__ import annotations

import difflib
from typing import Any

TRAINING_TOP = ("data", "model", "training", "peft", "fsdp", "deepspeed")
EVALUATION_TOP = ("tasks", "model", "generation", "inference_engine", "inference_remote_params", "run_name",
                  "enable_wandb", "output_dir")
INFERENCE_TOP = ("model", "generation", "input_path", "output_path", "progress_path", "engine", "remote_params")

MODEL = (
    "model_name", "adapter_model", "tokenizer_name", "tokenizer_pad_token", "tokenizer_kwargs", "processor_kwargs",
    "model_max_length", "load_pretrained_weights", "trust_remote_code", "torch_dtype_str", "compile",
    "chat_template", "chat_template_kwargs", "attn_implementation", "device_map", "model_kwargs",
    "enable_liger_kernel", "shard_for_eval", "freeze_layers", "model_revision", "tool_call_parser",
)
DATA = ("train", "test", "validation")
SPLIT = ("datasets", "collator_name", "collator_kwargs", "train_target", "pack", "stream", "target_col",
         "mixture_strategy", "seed", "use_torchdata")
DATASET = ("dataset_name", "dataset_path", "subset", "split", "dataset_kwargs", "sample_count", "mixture_proportion",
           "shuffle", "seed", "shuffle_buffer_size", "trust_remote_code", "transform_num_workers")
TRAINING = (
    "use_peft", "trainer_type", "enable_gradient_checkpointing", "gradient_checkpointing_kwargs", "output_dir",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "save_epoch", "save_steps", "save_final_model", "seed", "data_seed", "use_deterministic",
    "full_determinism", "run_name", "metrics_function", "reward_functions", "reward_function_kwargs", "grpo", "gkd",
    "gold", "log_level", "dep_log_level", "log_examples", "enable_wandb", "enable_mlflow", "enable_tensorboard",
    "logging_strategy", "logging_dir", "logging_steps", "logging_first_step", "eval_strategy", "eval_steps",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "optimizer",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "sgd_momentum", "mixed_precision_dtype", "compile",
    "include_performance_metrics", "include_alternative_mfu_metrics", "log_model_summary", "resume_from_checkpoint",
    "try_resume_from_last_checkpoint", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_main_process_only", "ddp_find_unused_parameters", "max_grad_norm",
    "trainer_kwargs", "verl_config_overrides", "profiler", "telemetry", "empty_device_cache_steps",
    "nccl_default_timeout_minutes", "label_ignore_index",
)
PEFT = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_exclude_modules", "lora_target_parameters",
    "lora_modules_to_save", "lora_bias", "lora_init_weights", "lora_task_type", "q_lora", "q_lora_bits",
    "bnb_4bit_quant_type", "llm_int8_skip_modules", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
    "bnb_4bit_compute_dtype", "peft_save_mode",
)
FSDP = ("enable_fsdp", "sharding_strategy", "cpu_offload", "mixed_precision", "backward_prefetch", "forward_prefetch",
        "use_orig_params", "state_dict_type", "auto_wrap_policy", "min_num_params", "transformer_layer_cls",
        "sync_module_states")
DEEPSPEED = (
    "enable_deepspeed", "deepspeed_config_path", "zero_stage", "offload_optimizer", "offload_param", "precision",
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "allgather_partitions",
    "reduce_scatter", "round_robin_gradients", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "sub_group_size", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "memory_efficient_linear", "steps_per_print", "wall_clock_breakdown",
)
SECTIONS = {"model": ("ModelParams", MODEL), "training": ("TrainingParams", TRAINING), "peft": ("PeftParams", PEFT),
            "fsdp": ("FSDPParams", FSDP), "deepspeed": ("DeepSpeedParams", DEEPSPEED), "data": ("DataParams", DATA)}

# Keys only OUMI files have at the top level (h1tune's are model, data, adapter, training, output_dir).
_OUMI_ONLY_TOP = {"peft", "fsdp", "deepspeed", "tasks", "generation", "engine", "inference_engine", "input_path",
                  "output_path", "remote_params", "inference_remote_params"}


def config_kind(tree: Any) -> str | None:
    """Which OUMI config a parsed YAML file is, or None when it is not an OUMI file (an h1tune one)."""
    if not isinstance(tree, dict):
        return None
    model = tree.get("model")
    data = tree.get("data")
    oumi_model = isinstance(model, dict) and "model_name" in model
    oumi_data = isinstance(data, dict) and isinstance(data.get("train"), dict) and "datasets" in data["train"]
    if not (oumi_model or oumi_data or _OUMI_ONLY_TOP & set(tree)):
        return None
    if "tasks" in tree or "inference_engine" in tree or "inference_remote_params" in tree:
        return "evaluation"
    if set(tree) & {"generation", "engine", "input_path", "output_path", "progress_path", "remote_params"}:
        return "inference"
    return "training"


def _unknown(keys: Any, valid: tuple[str, ...], where: str, cls: str) -> list[str]:
    problems = []
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{where}{key}: not a field of OUMI's {cls}; {hint}valid keys here: {', '.join(valid)}")
    return problems


def schema_problems(tree: dict[str, Any]) -> list[str]:
    """Every key of an OUMI training config that OUMI's schema does not have (with the valid ones),
    and the required fields it lacks."""
    problems = _unknown(tree, TRAINING_TOP, "", "TrainingConfig")
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("model_name"):
        problems.append("model.model_name: required (OUMI's ModelParams has no default); name the Falcon-H1 "
                        "checkpoint (hub id or directory)")
    for name, (cls, fields) in SECTIONS.items():
        section = tree.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{name}: must be a mapping of {cls} fields, got {type(section).__name__}")
            continue
        problems += _unknown(section, fields, f"{name}.", cls)
    for split in DATA:
        problems += _split_problems((tree.get("data") or {}).get(split), f"data.{split}")
    return problems


def _split_problems(split: Any, where: str) -> list[str]:
    if split is None:
        return []
    if not isinstance(split, dict):
        return [f"{where}: must be a mapping of DatasetSplitParams fields (datasets: [...]), "
                f"got {type(split).__name__}"]
    problems = _unknown(split, SPLIT, f"{where}.", "DatasetSplitParams")
    datasets = split.get("datasets") or []
    if not isinstance(datasets, list):
        return problems + [f"{where}.datasets: must be a list of datasets, got {type(datasets).__name__}"]
    for i, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            problems.append(f"{where}.datasets.{i}: must be a mapping with dataset_name, got {type(dataset).__name__}")
            continue
        problems += _unknown(dataset, DATASET, f"{where}.datasets.{i}.", "DatasetParams")
        if not dataset.get("dataset_name"):
            problems.append(f"{where}.datasets.{i}.dataset_name: required (OUMI's DatasetParams has no default)")
    return problems
