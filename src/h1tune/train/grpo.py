"""GRPO (online RL with verifiable rewards) on TRL's GRPOTrainer: `training.objective: grpo`.

    h1tune train examples/grpo_arithmetic.yaml      # prompts + training.rewards

TRL owns the algorithm (group-relative advantages, the clipped objective and every `loss_type`, the
KL term, its metrics). h1tune adds, beside everything every run gets (data checked before weights,
the probe, atomic checkpoints, resume, metrics.jsonl, NaN stop):

- rewards by name or from the user's file, each called on real prompts before the first step;
- the reference is the base with the adapter disabled (TRL's own choice for a PEFT model): no copy;
- rollouts on CPU through transformers' generate with h1tune's kernels (left-padded, batched), which
  also return each sampled token's log-prob; every step compares them with the training forward
  (`sampling/logp_parity/{mean,max}`): the cached generation path (attention KV and Mamba states)
  and the training path must agree, and a gap above PARITY_WARN names the cause;
- with `data.packing`, the policy and reference forwards run on packed rows (prompt + completion
  sequences of different lengths sharing rows, boundary-aware kernels), the log-probs scattered
  back to TRL's padded layout: the loss and every gradient equal the padded ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl import GRPOTrainer

from h1tune.config import H1tuneConfig
from h1tune.train.packed_pairs import packed_forward
from h1tune.train.trainer import H1TrainerMixin

log = logging.getLogger("h1tune")
PARITY_WARN = 1e-3  # fp32; under bf16 autocast the two paths round differently (see the warning)


def reward_functions(cfg: H1tuneConfig) -> list:
    """The configured rewards as callables named for TRL's metrics (`rewards/<name>/mean`)."""
    from h1tune import rewards

    functions = []
    for i, spec in enumerate(cfg.training.rewards):
        if spec.function:
            fn = rewards.load_function(spec.function, f"training.rewards[{i}].function")
        elif spec.name == "length":
            fn = rewards.length_reward(spec.target or 200)
        else:
            fn = rewards.BUILTINS[spec.name]
        functions.append(fn)
    return functions


def check_rewards(functions: list, rows: list[dict[str, Any]]) -> None:
    """Every reward called on the first prompts with placeholder completions: a user function that fails or
    returns the wrong shape stops here, before any weights load, not after the first rollout."""
    from h1tune.rewards import check_reward

    sample_rows = rows[:2]
    completions = [[{"role": "assistant", "content": text}] for text in ("<think>1 + 1</think> 2", "")][:len(sample_rows)]
    columns = {key: [row.get(key) for row in sample_rows] for key in {k for r in sample_rows for k in r} - {"prompt"}}
    sample = {"prompts": [row["prompt"] for row in sample_rows], "completions": completions, "columns": columns}
    for fn in functions:
        check_reward(fn, getattr(fn, "__name__", repr(fn)), sample)


def make_grpo_batches(cfg: H1tuneConfig, tokenizer, data):
    """The prompt dataset for TRL, and a probe batch: prompts as an LM loss (the log-likelihood GRPO's
    objective is made of), in windows like every probe."""
    from functools import partial

    from datasets import Dataset

    from h1tune.data import pad_collate
    from h1tune.data.packing import collate_packed, pack_examples
    from h1tune.lm.batching import Batches, probe_examples

    pad_id = tokenizer.pad_token_id
    probe = probe_examples([{"input_ids": ids, "labels": ids} for ids in data.prompt_ids])
    longest = max(map(len, data.prompt_ids)) + cfg.training.max_completion_length
    mean = sum(map(len, data.prompt_ids)) / len(data.prompt_ids) + cfg.training.max_completion_length
    collate = partial(pad_collate, pad_token_id=pad_id)
    if cfg.data.packing:
        from h1tune import ssm

        ssm.install()
        probe, collate = pack_examples(probe, sum(len(e["input_ids"]) for e in probe))[0], partial(
            collate_packed, pad_token_id=pad_id)
    evaluation = Dataset.from_list(data.eval) if data.eval else None
    return Batches(Dataset.from_list(data.train), evaluation, None, mean, probe, collate,
                   item_tokens=lambda _: longest)


def grpo_arguments(cfg: H1tuneConfig, kwargs: dict[str, Any], opt: dict[str, Any]):
    from trl import GRPOConfig

    from h1tune.train.vllm_rollouts import vllm_arguments

    t = cfg.training
    return GRPOConfig(**kwargs, beta=opt["beta"], loss_type=opt["loss_type"][0], num_generations=t.num_generations,
                      max_completion_length=t.max_completion_length, temperature=t.temperature, top_p=t.top_p,
                      reward_weights=[r.weight for r in t.rewards], log_completions=False,
                      epsilon_high=opt["epsilon_high"], mask_truncated_completions=opt["mask_truncated_completions"],
                      **vllm_arguments(cfg))


def build_grpo_trainer(cfg: H1tuneConfig, ready, tokenizer, kwargs: dict, opt: dict, callbacks: list):
    if cfg.training.rollouts == "vllm":
        from h1tune.train.vllm_rollouts import require_vllm, without_prefix_caching

        require_vllm()
        without_prefix_caching()
    functions = reward_functions(cfg)
    log.info("grpo: %d completions per prompt, up to %d tokens%s, temperature %g, top_p %g, on %s; loss %s, clip "
             "0.2 to %g, beta %g (reference: %s); rewards %s", cfg.training.num_generations,
             cfg.training.max_completion_length, " (cut ones masked)" if opt["mask_truncated_completions"] else "",
             cfg.training.temperature, cfg.training.top_p, cfg.training.rollouts, opt["loss_type"][0],
             opt["epsilon_high"] or 0.2, opt["beta"], "the base with the adapter disabled" if opt["beta"] else "none (beta 0)",
             ", ".join(f"{getattr(f, '__name__', f)} x{r.weight:g}" for f, r in zip(functions, cfg.training.rewards)))
    return H1GRPOTrainer(model=ready.model, reward_funcs=functions, args=grpo_arguments(cfg, kwargs, opt),
                         train_dataset=ready.batches.train, eval_dataset=ready.batches.eval, processing_class=tokenizer,
                         callbacks=callbacks, wsd_exponential=opt["wsd_exponential"], packing=cfg.data.packing)


def sampled_logps(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled tokens under the model's own distribution at generation (temperature only:
    top-p/top-k truncate the sampler, not the policy the loss scores)."""
    stacked = torch.stack(logits, dim=1).float() / temperature
    return torch.log_softmax(stacked, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def mask_layout(attention_mask: torch.Tensor, max_length: int) -> dict[str, torch.Tensor]:
    """packed_pairs' layout for rows whose real tokens are one contiguous run anywhere (left-padded prompts)."""
    from h1tune.train.packed_pairs import pack_layout

    lengths = attention_mask.sum(dim=1).tolist()
    layout = pack_layout(lengths, max(max_length, max(lengths)))
    starts = attention_mask.int().argmax(dim=1)
    index = torch.full(attention_mask.shape, -1, dtype=torch.long)
    for i, (start, n) in enumerate(zip(starts.tolist(), lengths)):
        index[i, start:start + n] = layout["pack_index"][i, :n]
    return {**layout, "pack_index": index}


class H1GRPOTrainer(H1TrainerMixin, GRPOTrainer):
    """GRPOTrainer with rollouts that report their log-probs, the parity metric, and packed forwards."""

    def __init__(self, *args, packing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.packing = packing

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        import time

        from trl.models import unwrap_model_for_generation
        from trl.trainer.utils import pad

        started, device = time.perf_counter(), self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        mask = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left").to(device)
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator, generation_kwargs=self.generation_kwargs,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                                         ) as unwrapped, torch.no_grad():
            out = unwrapped.generate(input_ids=ids, attention_mask=mask, generation_config=self.generation_config,
                                     return_dict_in_generate=True, output_logits=True)
        completions = out.sequences[:, ids.size(1):]
        logps = sampled_logps(out.logits, completions, self.temperature)
        is_eos = torch.isin(completions, torch.tensor(self.eos_token_ids, device=device))
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completions.size(1))
        self._metrics["train" if self.model.training else "eval"]["timing/generation_s"].append(
            time.perf_counter() - started)  # beside TRL's step_time: what share the rollouts take
        return ([c[: e + 1].tolist() for c, e in zip(completions.cpu(), ends.tolist())],
                [lp[: e + 1].tolist() for lp, e in zip(logps.cpu(), ends.tolist())])

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        sampled = output.get("sampling_per_token_logps")
        if sampled is not None and self.model.training:
            self._log_parity(output, sampled)
        return output

    def _log_parity(self, output: dict, sampled: torch.Tensor) -> None:
        """|generation log-prob - training-forward log-prob| over the sampled tokens."""
        prompt_completion = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            trained, _, _ = self._get_per_token_logps_and_entropies(self.model, prompt_completion, attention,
                                                                    output["completion_ids"].size(1))
        mask = output["completion_mask"].bool()
        delta = (trained - sampled).abs()[mask]
        mean, worst = (float(delta.mean()), float(delta.max())) if delta.numel() else (0.0, 0.0)
        self._metrics["train"]["sampling/logp_parity/mean"].append(mean)
        self._metrics["train"]["sampling/logp_parity/max"].append(worst)
        if worst > PARITY_WARN and not self.args.bf16:
            log.warning("rollout log-probs differ from the training forward by up to %.2e (mean %.2e): generation "
                        "(cached attention and Mamba states, left padding) and training do not compute the same "
                        "model; the ratio TRL optimises is then biased. Check custom kernels or the cache", worst, mean)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        if not self.packing or any(v is not None for v in extra.values()) or compute_aux_loss:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **extra)
        layout = mask_layout(attention_mask.cpu(), int(attention_mask.size(1)))
        batch = {"input_ids": input_ids, **{k: v.to(input_ids.device) for k, v in layout.items()}}
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        unwrapped = self.accelerator.unwrap_model(model)
        modules = list({id(m): m for m in (model, unwrapped) if m is not None}.values())
        with packed_forward(modules, batch, self._tokenizer.pad_token_id), self.accelerator.autocast():
            outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -logits_to_keep:]
        entropies = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
        return logps, entropies, None

