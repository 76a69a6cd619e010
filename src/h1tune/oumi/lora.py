"""OUMI's `peft` section onto h1tune's `adapter` and `model.quantization`.

h1tune's guarantee applies on top: under QLoRA the modules in policy.ALWAYS_UNQUANTIZED stay
whole whatever the file's skip list says (transformers *replaces* its default list with the
given one, so a list of only one of them quantizes the other).
"""

from __future__ import annotations

from h1tune.config import DEFAULT_TARGETS
from h1tune.oumi.mapper import Section, set_path
from h1tune.oumi.model_data import dtype_name
from h1tune.oumi.report import MAPPED, SAFETY
from h1tune.policy import ALWAYS_UNQUANTIZED

KEPT_WHOLE = " + ".join(ALWAYS_UNQUANTIZED)
FOUR_BIT = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage", "bnb_4bit_compute_dtype")


def map_peft(sec: Section, use_peft: bool, dtype: str, fsdp: bool) -> None:
    """LoRA hyperparameters and QLoRA settings; all ignored under full fine-tuning (use_peft false)."""
    if not use_peft:
        for key in sec.values:
            sec.ignore(key, "training.use_peft is false: full fine-tuning")
        sec.consulted.update(sec.values)
        return
    sec.map("lora_r", "adapter.r", default=8)
    sec.map("lora_alpha", "adapter.lora_alpha", default=8)
    sec.map("lora_dropout", "adapter.lora_dropout", default=0.0)
    if sec.get("lora_target_modules"):
        sec.map("lora_target_modules", "adapter.target_modules")
    else:
        sec.map("lora_target_modules", "adapter.target_modules", default=None, convert=lambda _: list(DEFAULT_TARGETS),
                note="PEFT has no default targets for Falcon-H1 (OUMI would stop); h1tune's default groups")
    if sec.get("lora_exclude_modules"):
        sec.map("lora_exclude_modules", "adapter.exclude_modules")
    else:
        sec.refuse("lora_exclude_modules", "")
    sec.refuse("lora_target_parameters", "targets bare parameters (MoE experts); Falcon-H1 has none")
    sec.refuse("lora_modules_to_save", "under LoRA h1tune trains only the adapters (the probe checks each); to "
               "train whole modules use adapter.method: full with adapter.freeze")
    sec.agree("lora_bias", {"none"}, "no bias training, as h1tune", otherwise="h1tune's LoRA trains no biases")
    sec.agree("lora_init_weights", {"default"}, "PEFT's default init, as h1tune",
              otherwise="h1tune uses PEFT's default LoRA init (Kaiming A, zero B)")
    sec.agree("lora_task_type", {"causal_lm"}, "causal LM, as h1tune", otherwise="h1tune trains causal LMs only")
    sec.agree("peft_save_mode", {"adapter_only"}, "h1tune saves the adapter to OUTPUT_DIR/final",
              otherwise="h1tune saves the adapter only; merge it with h1tune merge OUTPUT_DIR/final OUT")
    _map_quantization(sec, dtype, fsdp)


def _map_quantization(sec: Section, dtype: str, fsdp: bool) -> None:
    q_lora, bits = bool(sec.get("q_lora", False)), sec.get("q_lora_bits", 4)
    level = f"{bits}bit" if q_lora else "none"
    sec.map("q_lora", "model.quantization", default=False, convert=lambda _: level)
    if not q_lora:
        for key in ("q_lora_bits", "llm_int8_skip_modules", *FOUR_BIT):
            sec.ignore(key, "peft.q_lora is false")
        return
    sec.agree("q_lora_bits", {4, 8}, f"model.quantization: {level}", otherwise="bitsandbytes quantizes to 4 or 8 bits")
    _map_skip_list(sec)
    if bits != 4:
        for key in FOUR_BIT:
            sec.ignore(key, "4-bit quantization only")
        return
    sec.agree("bnb_4bit_quant_type", {"nf4"}, "NF4, as h1tune", default="fp4",
              otherwise="h1tune quantizes to NF4 (QLoRA's data type), not fp4")
    sec.agree("use_bnb_nested_quant", {True}, "nested quantization, as h1tune", default=False,
              otherwise="h1tune always uses nested (double) quantization: the per-block scales are stored in 8 bits "
              "(about 0.4 bit/param less memory; tiny differences in the dequantized weights)")
    storage = dtype if fsdp else "uint8"
    sec.agree("bnb_4bit_quant_storage", lambda v: dtype_name(v) == storage, f"{storage}, as h1tune", default="uint8",
              otherwise=f"h1tune stores the packed 4-bit weights as {storage} (in the compute dtype only under "
              "training.distributed: fsdp, which shards floating-point tensors only); the values are the same")
    sec.agree("bnb_4bit_compute_dtype", lambda v: dtype_name(v) == dtype, f"h1tune computes in model.dtype ({dtype})",
              default="float32", otherwise=f"h1tune computes the 4-bit matmuls in model.dtype ({dtype})")


def _map_skip_list(sec: Section) -> None:
    """The file's skip list plus h1tune's never-quantized modules: extras are kept, none are dropped."""
    given = sec.get("llm_int8_skip_modules")
    extras = [m for m in given or [] if m not in ALWAYS_UNQUANTIZED]
    effective = [*ALWAYS_UNQUANTIZED, *extras]
    missing = [m for m in ALWAYS_UNQUANTIZED if m not in (given or [])]
    kind = SAFETY if missing else MAPPED
    if given is None:
        why = f"transformers' default skip list would quantize {' and '.join(missing)}"
    else:
        why = (f"a skip list replaces transformers' default one, so this one would quantize {' and '.join(missing)}"
               if missing else "as given")
    sec.note(kind, "llm_int8_skip_modules", f"kept whole: {' + '.join(effective)} (h1tune always keeps "
             f"{KEPT_WHOLE} unquantized: the fused Mamba kernel reads that weight raw and the output head carries "
             f"μP's multiplier); {why}", value=given, default=given is None and not sec.has("llm_int8_skip_modules"),
             h1tune="model.llm_int8_skip_modules", h1tune_value=extras)
    set_path(sec.tree, "model.llm_int8_skip_modules", extras)
