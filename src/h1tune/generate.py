"""Generate from a Falcon-H1 model (merged, or base + adapter, 4-bit base too) with its chat template.

    h1tune generate runs/merged --prompt "What is Falcon-H1?"
    h1tune generate tiny --adapter runs/sft/adapter --quantization 4bit --prompt "Hi"
    h1tune chat runs/merged --system "Be brief."          # /reset, /exit, /help

Replies stream as they are generated and stop at the end-of-turn token (<|im_end|>).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from h1tune.config import ModelConfig
from h1tune.errors import H1tuneError

CHAT_HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help"


@dataclass
class SamplingConfig:
    """Greedy when temperature == 0; otherwise temperature / top-p / top-k sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if problems:
            raise H1tuneError("sampling: " + "; ".join(problems))


def load_for_generation(model_cfg: ModelConfig, adapter: str | None = None, quantization: str | None = None):
    """The model (with its adapter attached when given), in eval mode, and its tokenizer.

    `model_cfg.name_or_path` may itself be an adapter directory: its base is then read from
    adapter_config.json. `quantization="4bit"` (or model_cfg.quantization) loads the base exactly
    as QLoRA training did (NF4, double quant, out_proj and lm_head whole), which is the model a
    QLoRA adapter was trained against.
    """
    from h1tune.adapters import checkpoint
    from h1tune.model import load_model, load_tokenizer

    if adapter is None and checkpoint.is_adapter_dir(model_cfg.name_or_path):
        adapter = model_cfg.name_or_path
        model_cfg = model_cfg.model_copy(update={"name_or_path": checkpoint.adapter_base(adapter)})
    if adapter is not None:
        adapter = str(checkpoint.find_adapter_dir(adapter) or adapter)  # a run directory means its final/
    trained = checkpoint.run_model_config(Path(adapter)) if adapter is not None else None
    if trained is not None:  # a preset base is rebuilt with the seed the run used
        model_cfg = model_cfg.model_copy(update={"seed": trained.seed})
    if trained is not None and quantization is None:  # a QLoRA adapter runs on the 4-bit base it trained on
        if trained.quantization != "none":
            quantization = trained.quantization
            model_cfg = model_cfg.model_copy(update={"llm_int8_skip_modules": trained.llm_int8_skip_modules})
    if quantization is not None:
        model_cfg = model_cfg.model_copy(update={"quantization": quantization})
    if adapter is not None:
        checkpoint.read_adapter_config(Path(adapter))
        checkpoint.refuse_bypassed(Path(adapter), checkpoint.bypassed_in_adapter(Path(adapter)))
    source = checkpoint.tokenizer_source(adapter, model_cfg.name_or_path)
    tokenizer = load_tokenizer(model_cfg.model_copy(update={"name_or_path": source}))
    model = load_model(model_cfg)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def read_tools(path: str | Path) -> list[dict]:
    """Tool signatures from a JSON file: a list of {"name", "description", "parameters"} objects (or
    OpenAI-style {"type": "function", "function": {...}}), as the training data's `tools` field."""
    import json

    path = Path(path)
    expected = ('a JSON list of tool signatures, e.g. [{"name": "get_weather", "description": ..., '
                '"parameters": {"type": "object", "properties": {...}}}]')
    if not path.is_file():
        raise H1tuneError(f"--tools: {str(path)!r} does not exist; give {expected}")
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise H1tuneError(f"--tools: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(tools, list) or not tools:
        raise H1tuneError(f"--tools: {path} holds {type(tools).__name__ if tools else 'nothing'}; it must be {expected}")
    for index, tool in enumerate(tools, 1):
        problem = _tool_schema_problem(tool)
        if problem:
            raise H1tuneError(f"--tools: {path} tool {index} {problem}; the file must be {expected}")
    return tools


def _tool_schema_problem(tool) -> str | None:
    """What makes `tool` not a tool signature, or None."""
    if not isinstance(tool, dict):
        return f"is a {type(tool).__name__}, not an object"
    spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        return "has no `name`"
    if "parameters" in spec and not isinstance(spec["parameters"], dict):
        return "has `parameters` that is not a JSON-schema object"
    return None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """A reply decoded with its special tokens -> (its text without the calls, the calls as {name, arguments}).

    Falcon-H1 wraps each call in <tool_call>...</tool_call>: one JSON object (H1-Instruct) or a JSON
    list of them (Falcon-H1-Tiny). The markers are special tokens, so a plain decode shows bare JSON.
    A call that is not valid JSON is kept as {"name": None, "raw": text}, so nothing is hidden.
    """
    import json
    import re

    calls: list[dict] = []
    for body in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S):
        try:
            parsed = json.loads(body.strip())
        except json.JSONDecodeError:
            calls.append({"name": None, "raw": body.strip()})
            continue
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call = call["function"]
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
            else:
                calls.append({"name": None, "raw": json.dumps(call)})
    content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S).strip()
    return content, calls


def format_tool_calls(calls: list[dict]) -> str:
    """`tool call: get_weather({"city": "Paris"})`, one line per call."""
    import json

    return "\n".join(f"tool call: {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" if c["name"]
                     else f"tool call (not valid JSON): {c['raw']}" for c in calls)


def _streamer(tokenizer, output: TextIO):
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            output.write(text + ("\n" if stream_end else ""))
            output.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_reply(model, tokenizer, messages: list[dict], sampling: SamplingConfig, stream: bool = True,
                   tools: list[dict] | None = None, output: TextIO | None = None) -> str:
    """Render `messages` with the chat template, generate until the end-of-turn token, return the reply.

    With `stream`, text is written to `output` (default stdout) as it is decoded.
    """
    import torch

    encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    input_ids = encoded["input_ids"].to(model.device)
    torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    stops = stop_ids(tokenizer)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        repetition_penalty=sampling.repetition_penalty,
    )
    if sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    streamer = _streamer(tokenizer, output or sys.stdout) if stream else None
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   streamer=streamer, **kwargs)
    new_tokens = generated[0, input_ids.shape[1]:]
    reply = tokenizer.decode(new_tokens, skip_special_tokens=True)
    if tools:  # the call markers are special tokens: show the calls structured, not as bare JSON
        _, calls = parse_tool_calls(tokenizer.decode(new_tokens, skip_special_tokens=False))
        if calls and stream:
            (output or sys.stdout).write("\n" + format_tool_calls(calls) + "\n")
    return reply


def chat_loop(model, tokenizer, sampling: SamplingConfig, input_fn: Callable[[str], str] = input,
              output: TextIO = sys.stdout, system: str | None = None, tools: list[dict] | None = None) -> list[dict]:
    """Multi-turn chat in the terminal; returns the conversation as it stands when the user leaves.

    Each turn sends the whole conversation through the chat template. `/reset` forgets it (the
    system prompt stays), `/exit` or end of input (Ctrl-D) leaves. `input_fn` is replaceable, so
    tests drive the loop with a script.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    output.write(CHAT_HELP + "\n")
    turn = 0
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            output.write("(conversation reset)\n")
            continue
        if text == "/help":
            output.write(CHAT_HELP + "\n")
            continue
        if text.startswith("/"):
            output.write(f"unknown command {text.split()[0]!r}; {CHAT_HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        output.write("assistant: ")
        turn_sampling = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + turn})
        reply = generate_reply(model, tokenizer, messages, turn_sampling, stream=True, tools=tools, output=output)
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return messages


def stop_ids(tokenizer) -> list[int]:
    """Stop at the end of the assistant turn (<|im_end|>) and at the end-of-text token."""
    from h1tune.presets import END_OF_TURN_TOKENS

    ids = {tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)

