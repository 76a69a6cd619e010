"""Run a GGUF file in llama.cpp and compare it with transformers on the checkpoint it came from.

    check = verify_gguf(Path("model.gguf"), Path("runs/sft-merged"), "f32")
    print(check.format()); assert check.passed

Four things must hold, or the export fails:
- metadata: the chat template and the BOS/EOS/pad ids in the file are the checkpoint's;
- tokenization: llama.cpp, rendering each chat with the template read from the file (as llama-cpp-
  python's chat mode does), yields the same ids as transformers' apply_chat_template; so do the
  converter's own pre-tokenizer test text and a code + tool-call text (the check behind a
  --pre-tokenizer name);
- next-token log-probabilities at every prompt position within the outtype's tolerance;
- greedy decodes: token for token identical for f32 (the weights are the checkpoint's, up to the
  μP multipliers folded in fp32); for f16/bf16/q8_0 the agreement is reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h1tune.errors import H1tuneError
from h1tune.export.verify import FIXED_CONVERSATIONS, Outputs

# Max |Δ log-prob| (nats, any vocabulary entry, any prompt position) between llama.cpp on the file
# (fp32 KV cache) and transformers in fp32 on the checkpoint. Measured on the tiny preset + LoRA
# (bench/gguf_export.py): f32 2.6e-6 (summation order), f16 2.5e-3, bf16 2.0e-2, q8_0 7.0e-2. The
# limits leave room for deeper models; a dropped μP multiplier moves log-probs by whole nats.
LOGPROB_TOLERANCE = {"f32": 1e-3, "f16": 0.1, "bf16": 0.3, "q8_0": 0.3}
EXACT_GREEDY = ("f32",)

# llama.cpp's fixed pre-tokenizer text (convert_hf_to_gguf.py, get_vocab_base_pre): the converter
# names a pre-tokenizer by the ids of this text, so the same ids in llama.cpp prove the name right.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Code and a tool call, where the rules for digits after a space and for newline + indent differ
# between pre-tokenizers (on the presets' small vocabulary, llama-bpe and gpt-2 agree on the text above).
CODE_TEXT = ('def add(a, b):\n    return a + b\n\n<tool_call>\n{"name": "get_weather", "arguments": {"days": 21}}'
             '\n</tool_call>')
INSTALL_HINT = (
    "llama-cpp-python is not installed, and the export is verified by running the file in llama.cpp. "
    "Install it with `pip install -e '.[gguf]'` in the h1tune checkout, as the README says (or "
    "`pip install llama-cpp-python gguf`): pip builds "
    "llama.cpp for the CPU from source, which needs cmake and a C++ compiler and takes minutes "
    "(see the README's GGUF section)"
)


@dataclass
class GGUFCheck:
    """llama.cpp on the GGUF file vs transformers (fp32) on the checkpoint it was converted from."""

    outtype: str
    prompts: int
    greedy_same: int  # prompts whose greedy decode is identical
    greedy_tokens_same: int  # decoded tokens equal before the first divergence, summed over prompts
    greedy_tokens: int  # tokens transformers decoded, summed over prompts
    top1_agreement: float  # fraction of prompt positions with the same most likely next token
    max_dlogprob: float
    mean_dlogprob: float
    tolerance: float
    pre_tokenizer: str = ""
    problems: list[str] = field(default_factory=list)  # metadata or tokenization mismatches

    @property
    def passed(self) -> bool:
        exact = self.greedy_same == self.prompts if self.outtype in EXACT_GREEDY else True
        return not self.problems and exact and self.max_dlogprob <= self.tolerance

    def format(self) -> str:
        lines = [f"llama.cpp ({self.outtype}) vs transformers (fp32) on {self.prompts} chat prompts:",
                 f"  greedy decodes identical {self.greedy_same}/{self.prompts}, tokens "
                 f"{self.greedy_tokens_same}/{self.greedy_tokens}; top-1 agreement {self.top1_agreement:.1%}",
                 f"  max |Δ logprob| {self.max_dlogprob:.3g} (mean {self.mean_dlogprob:.3g}; tolerance "
                 f"{self.tolerance:.3g})" + ("; greedy must match token for token" if self.outtype in EXACT_GREEDY
                                              else ""),
                 f"  metadata and tokenization: {'; '.join(self.problems) if self.problems else 'identical'}"
                 f" (tokenizer.ggml.pre = {self.pre_tokenizer!r})"]
        lines.append(f"  {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        keys = ("outtype", "prompts", "greedy_same", "greedy_tokens_same", "greedy_tokens", "top1_agreement",
                "max_dlogprob", "mean_dlogprob", "tolerance", "pre_tokenizer", "problems")
        return {k: getattr(self, k) for k in keys} | {"passed": self.passed}


def require_llama_cpp():
    """The llama_cpp module, or an error that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise H1tuneError(INSTALL_HINT) from None
    return llama_cpp


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string fields of a GGUF file, through the `gguf` package's reader."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise H1tuneError("the `gguf` package is needed to read the file's metadata: `pip install -e '.[gguf]'` "
                          "in the h1tune checkout, as the README says") from None
    fields = GGUFReader(str(path)).fields
    return {k: f.contents() for k, f in fields.items() if len(f.types) == 1}  # arrays (tokens, merges) left out


def metadata_problems(meta: dict[str, Any], tokenizer) -> list[str]:
    """The chat template and special token ids must travel, or llama.cpp's chat mode breaks."""
    problems = []
    if tokenizer.chat_template and meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("tokenizer.chat_template differs from the checkpoint's chat template")
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("padding", tokenizer.pad_token_id)):
        if token_id is not None and meta.get(f"tokenizer.ggml.{key}_token_id") != token_id:
            problems.append(f"tokenizer.ggml.{key}_token_id is {meta.get(f'tokenizer.ggml.{key}_token_id')}, "
                            f"the tokenizer's is {token_id}")
    return problems


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first differs at token {i} (transformers {a[i:i + 3]}, llama.cpp {b[i:i + 3]})"


def tokenization_problems(llm, tokenizer, conversations: list[list[dict]]) -> tuple[list[str], list[list[int]]]:
    """Render each chat from the file's own template as llama-cpp-python's chat mode does; same ids?"""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    problems, prompts = [], []
    template = llm.metadata.get("tokenizer.chat_template")
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    for i, conv in enumerate(conversations):
        add_gen = conv[-1]["role"] != "assistant"
        want = list(tokenizer.apply_chat_template(conv, add_generation_prompt=add_gen, tokenize=True,
                                                  return_dict=True)["input_ids"])
        prompts.append(want)
        if template is None:
            continue
        text = Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=add_gen)(messages=conv).prompt
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            problems.append(f"chat prompt {i + 1} tokenizes differently in llama.cpp: {_first_difference(want, got)}")
    for name, text in (("the converter's pre-tokenizer test text", PRE_TOKENIZER_TEXT),
                       ("code + tool call", CODE_TEXT)):
        want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            problems.append(f"{name} tokenizes differently: {_first_difference(want, got)}; the file's pre-tokenizer "
                            "does not split text as this tokenizer does")
    return problems, prompts


def llama_outputs(llm, prompts: list[list[int]], greedy_tokens: int, eos_ids: list[int]) -> Outputs:
    """Logits at every prompt position (logits_all) and an argmax decode, state reset per prompt."""
    import numpy as np
    import torch

    logits, greedy = [], []
    for row in prompts:
        llm.reset()
        llm.eval(row)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
        seq: list[int] = []
        while len(seq) < greedy_tokens:
            seq.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if seq[-1] in eos_ids:
                break
            llm.eval([seq[-1]])
        greedy.append(seq)
    return Outputs(logits, greedy)


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_logprobs(outtype: str, reference: Outputs, got: Outputs, tolerance: float) -> GGUFCheck:
    """Log-softmax both sides over the whole vocabulary; count agreeing greedy tokens."""
    import torch

    deltas = [(torch.log_softmax(a.double(), -1) - torch.log_softmax(b.double(), -1)).abs()
              for a, b in zip(reference.logits, got.logits)]
    positions = sum(d.shape[0] for d in deltas)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference.logits, got.logits))
    return GGUFCheck(
        outtype=outtype, prompts=len(deltas),
        greedy_same=sum(a == b for a, b in zip(reference.greedy, got.greedy)),
        greedy_tokens_same=sum(_prefix(a, b) for a, b in zip(reference.greedy, got.greedy)),
        greedy_tokens=sum(len(a) for a in reference.greedy),
        top1_agreement=agree / max(positions, 1),
        max_dlogprob=float(max(d.max() for d in deltas)),
        mean_dlogprob=float(sum(d.sum() for d in deltas) / sum(d.numel() for d in deltas)),
        tolerance=tolerance,
    )


def verify_gguf(gguf_path: Path, model_dir: Path, outtype: str, *, greedy_tokens: int = 16,
                conversations: list[list[dict]] | None = None, threads: int | None = None,
                tolerance: float | None = None) -> GGUFCheck:
    """Load `gguf_path` in llama.cpp and `model_dir` in transformers (fp32); compare as described above."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h1tune.export.verify import model_outputs
    from h1tune.generate import stop_ids

    llama_cpp = require_llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise H1tuneError(f"{model_dir}: the tokenizer has no chat template; the GGUF export verifies on chat "
                          "prompts and ships the template for llama.cpp's chat mode")
    meta = read_metadata(gguf_path)
    problems = metadata_problems(meta, tokenizer)
    try:
        # An fp32 KV cache: llama.cpp's default f16 cache rounds K and V (~1e-3 in log-probs on the tiny
        # model), which would hide what the file itself computes.
        llm = llama_cpp.Llama(str(gguf_path), n_ctx=1024, n_batch=512, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                              n_threads=threads or max(1, (os.cpu_count() or 2) // 2))
    except ValueError as exc:  # llama-cpp-python's "Failed to load model"; llama.cpp's reason went to its log
        raise H1tuneError(f"llama.cpp cannot load the converted file ({exc}): architecture "
                          f"{meta.get('general.architecture')!r}, tokenizer.ggml.pre "
                          f"{meta.get('tokenizer.ggml.pre')!r} (an unknown pre-tokenizer name is a common cause; "
                          "--pre-tokenizer takes the names in llama.cpp's src/llama-vocab.cpp)") from None
    try:
        tok_problems, prompts = tokenization_problems(llm, tokenizer, conversations or FIXED_CONVERSATIONS)
        eos = stop_ids(tokenizer)
        got = llama_outputs(llm, prompts, greedy_tokens, eos)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = model_outputs(model, prompts, greedy_tokens, eos)
    check = compare_logprobs(outtype, reference, got,
                             tolerance if tolerance is not None else LOGPROB_TOLERANCE[outtype])
    check.pre_tokenizer = str(meta.get("tokenizer.ggml.pre", ""))
    check.problems = problems + tok_problems
    return check
