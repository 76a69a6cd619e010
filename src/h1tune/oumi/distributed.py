"""OUMI's `fsdp` and `deepspeed` sections onto h1tune's `training.distributed` strategies.

h1tune ships one setting per strategy (h1tune/resources/accelerate: FSDP2 with one unit per
decoder layer, sharded checkpoints; ZeRO-2 and ZeRO-3 JSON files), launched with
`h1tune train --nproc N`. OUMI's knobs that agree with them are mapped; speed-only knobs are
ignored; the others (CPU offload, other wrap policies) are reported as not honoured.
"""

from __future__ import annotations

from h1tune.oumi.mapper import Section, enum_value
from h1tune.oumi.report import IGNORED, MAPPED, NOT_HONOURED
from h1tune.train.strategies import fsdp_settings

LAUNCH = "launch with h1tune train --nproc N (one process per GPU)"
SPEED_ONLY = "speed only (communication tuning); h1tune's shipped setting chooses its own"
ZERO_STAGES = {"0": "ddp", "1": "deepspeed_zero2", "2": "deepspeed_zero2", "3": "deepspeed_zero3"}


def _disabled(sec: Section, switch: str) -> bool:
    if sec.get(switch, False):
        return False
    for key in sec.values:
        sec.ignore(key, f"{sec.prefix}{switch} is false")
    sec.consulted.update(sec.values)
    return True


def map_fsdp(sec: Section) -> None:
    """FSDP onto h1tune's FSDP2 setting: full sharding, one unit per decoder layer, sharded checkpoints."""
    if _disabled(sec, "enable_fsdp"):
        return
    ours = fsdp_settings(False)
    layer = ours["transformer_layer_cls_to_wrap"]
    sec.map("enable_fsdp", "training.distributed", convert=lambda _: "fsdp",
            note=f"FSDP2, parameters, gradients and optimizer state sharded over all GPUs; {LAUNCH}")
    strategy = enum_value(sec.get("sharding_strategy", "FULL_SHARD"))
    reason = ("full sharding, as h1tune (parameters resharded after forward)" if strategy == "full_shard" else
              "on one machine (h1tune launches on one) hybrid sharding shards like FULL_SHARD, as h1tune")
    sec.agree("sharding_strategy", {"full_shard", "hybrid_shard"}, reason,
              otherwise="h1tune shards fully (FULL_SHARD: parameters resharded after forward); for replication "
              "without sharding use training.distributed: ddp")
    sec.agree("cpu_offload", {False}, "no offload, as h1tune", otherwise="h1tune's fsdp keeps parameters, gradients "
              "and optimizer state on the GPUs (no CPU offload): a full fine-tune needs about 16 bytes per parameter "
              "across all GPUs; use more GPUs, LoRA or QLoRA")
    sec.agree("mixed_precision", {None}, "none: FSDP runs in model.dtype, as h1tune",
              otherwise="h1tune's fsdp runs in model.dtype (no FSDP mixed precision); set model.dtype")
    for key in ("backward_prefetch", "forward_prefetch", "use_orig_params"):
        sec.ignore(key, "an FSDP1 option; FSDP2 prefetches and keeps the original parameters itself")
    sec.agree("state_dict_type", {"sharded_state_dict"}, "sharded checkpoints, as h1tune",
              otherwise="h1tune writes sharded checkpoints (no rank gathers the model at each save) and gathers "
              "the full weights once, for OUTPUT_DIR/final")
    sec.agree("auto_wrap_policy", {"transformer_based_wrap"}, f"one FSDP unit per {layer}, as h1tune",
              otherwise=f"h1tune wraps one FSDP unit per {layer} (TRANSFORMER_BASED_WRAP)")
    sec.ignore("min_num_params", "SIZE_BASED_WRAP only")
    sec.agree("transformer_layer_cls", {layer}, f"{layer}, as h1tune", otherwise=f"h1tune wraps {layer}")
    sec.ignore("sync_module_states", "every h1tune process loads the checkpoint itself")


def map_deepspeed(sec: Section) -> None:
    """DeepSpeed onto h1tune's ZeRO-2 / ZeRO-3 settings (ZeRO-0 is data parallelism: ddp)."""
    if _disabled(sec, "enable_deepspeed"):
        return
    stage = str(enum_value(sec.get("zero_stage", "0"))).removeprefix("zero_")
    strategy = ZERO_STAGES.get(stage)
    if strategy is None:
        sec.note(NOT_HONOURED, "enable_deepspeed", f"zero_stage {stage!r} is not a ZeRO stage h1tune knows")
        return
    note = {"0": "ZeRO-0 is plain data parallelism", "1": "h1tune ships ZeRO-2 and ZeRO-3; ZeRO-2 also shards "
            "gradients (same result, less memory)"}.get(stage, "")
    sec.map("enable_deepspeed", "training.distributed", convert=lambda _: strategy,
            note=f"{note}; {LAUNCH}".lstrip("; "))
    sec.note(MAPPED, "zero_stage", f"training.distributed: {strategy}", value=sec.get("zero_stage", "0"),
             default=not sec.has("zero_stage"))
    sec.refuse("deepspeed_config_path", "h1tune uses its shipped zero2.json / zero3.json")
    for key in ("offload_optimizer", "offload_param"):
        sec.refuse(key, "h1tune's ZeRO settings do not offload to CPU or NVMe")
    sec.refuse("activation_checkpointing", "h1tune uses training.gradient_checkpointing")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        sec.agree(key, {"auto"}, "auto: from training.*, as h1tune", ok_kind=IGNORED,
                  otherwise="h1tune takes it from training.* ('auto'); set the h1tune field instead")
    sec.ignore("precision", "h1tune's ZeRO settings follow model.dtype (bf16/fp16 'auto')")
    for key in sec.values:
        if key not in sec.consulted:
            sec.ignore(key, SPEED_ONLY)
    sec.consulted.update(k for k in _DEEPSPEED_TUNING)


_DEEPSPEED_TUNING = (
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "allgather_partitions",
    "reduce_scatter", "round_robin_gradients", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "sub_group_size", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "memory_efficient_linear",
    "steps_per_print", "wall_clock_breakdown",
)
