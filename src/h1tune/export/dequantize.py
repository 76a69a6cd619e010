"""The weights a QLoRA adapter actually trained against: the base's dequantized 4-bit (or 8-bit) values."""

from __future__ import annotations


def copy_dequantized_weights(quantized_model, target_model) -> int:
    """Overwrite `target_model`'s Linear weights with the dequantized weights of `quantized_model`.

    The adapter was trained against these values (NF4 codes x absmax), not against the 16-bit
    originals. Module names are matched after dropping peft's `base_model.model.` / `.base_layer`.
    Returns how many Linears were replaced.
    """
    import bitsandbytes as bnb
    import torch

    count = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            from peft.utils.integrations import dequantize_bnb_weight

            weight = dequantize_bnb_weight(module.weight, state=module.state)
        else:
            continue
        path = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        target = _plain_module(target_model, path)
        with torch.no_grad():
            target.weight.copy_(weight.to(target.weight.dtype).reshape(target.weight.shape))
        count += 1
    return count


def _plain_module(model, path: str):
    """The nn.Linear at `path` of a model that may be wrapped by peft (its base_layer when wrapped)."""
    root = model.base_model.model if hasattr(model, "peft_config") else model
    module = root.get_submodule(path)
    return getattr(module, "base_layer", module)
