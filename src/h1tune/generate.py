"""Generate from a Falcon-H1 model directory (or base + adapter) with its chat template, streaming.

    h1tune generate runs/tiny --prompt "What is Falcon-H1?"
"""

from __future__ import annotations

from dataclasses import dataclass

from h1tune.config import ModelConfig


@dataclass
class SamplingConfig:
    """Greedy when temperature == 0; otherwise nucleus sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


def load_for_generation(model_cfg: ModelConfig, adapter: str | None = None):
    """The model (with its adapter attached when given), in eval mode, and its tokenizer."""
    from h1tune.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def generate_reply(model, tokenizer, messages: list[dict], sampling: SamplingConfig, stream: bool = True,
                   tools: list[dict] | None = None) -> str:
    """Render `messages` with the chat template, generate until the end-of-turn token, return the reply."""
    import torch
    from transformers import TextStreamer

    input_ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    input_ids = input_ids.to(model.device)
    torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        eos_token_id=_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=sampling.repetition_penalty,
    )
    if sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, streamer=streamer, **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def _stop_ids(tokenizer) -> list[int]:
    """Stop at the end of the assistant turn (<|im_end|>) and at the end-of-text token."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|end_of_text|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
