"""The `h1tune` command: one small function per subcommand, heavy imports inside each.

    h1tune init-model runs/tiny --preset tiny
    h1tune generate runs/tiny --prompt "Hello"
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from h1tune import __version__
from h1tune.errors import H1tuneError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="a LoRA adapter directory to attach to the model")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with sections model, data, adapter, training, output_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.learning_rate=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="h1tune",
        description="Fine-tune Falcon-H1 (hybrid attention + Mamba-2) with safe adapter defaults, "
        "exact packing, and proof that every adapter trains.",
    )
    parser.add_argument("--version", action="version", version=f"h1tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="supervised fine-tuning (LoRA, QLoRA or full) from a YAML config",
                       description="Validate the data, load the model, apply the adapter, prove every adapter "
                       "trains (the probe), then train with progress, eval, atomic checkpoints and automatic "
                       "resume. Writes the adapter (PEFT format) or full model to OUTPUT_DIR/final.")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an output_dir that holds another run")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint (automatic when the config is unchanged)")

    p = sub.add_parser("check", help="validate config, data, chat template and adapters without training",
                       description="Validate the config, the data files and the chat template, load the model, "
                       "apply the adapter and run the adapter probe on a real batch. Exits non-zero on any "
                       "problem.")
    _add_config_args(p)

    p = sub.add_parser("init-model", help="write a random-weight Falcon-H1 checkpoint + tokenizer (offline)",
                       description="Write an embedded Falcon-H1 preset (random weights, safetensors) with a locally "
                       "built tokenizer and Falcon-H1's chat template. `tiny` trains a step in about a second "
                       "on CPU; `0.5b` and `1.5b` have the published architecture shapes.")
    p.add_argument("out_dir", help="directory to write (must be empty or absent)")
    p.add_argument("--preset", default="tiny", help="tiny, 0.5b or 1.5b (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")

    p = sub.add_parser("generate", help="generate a reply with the chat template, streaming",
                       description="Generate a reply from a model directory, hub id or preset (optionally with a "
                       "LoRA adapter), using the model's chat template; stops at the end-of-turn token.")
    p.add_argument("model", help="model directory, hub id, or preset name")
    p.add_argument("--prompt", required=True, help="the user message")
    _add_sampling(p)
    return parser


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from h1tune.config import load_config

    cfg = load_config(args.config, args.overrides)
    from h1tune.train import run_training

    result = run_training(cfg, overwrite=args.overwrite, resume=args.resume)
    print(f"done: {result.steps} steps, train loss {result.train_loss:.4f}" if result.train_loss is not None
          else f"done: {result.steps} steps")
    if result.eval_metrics:
        print(f"eval loss {result.eval_metrics['eval_loss']:.4f}, perplexity {result.eval_metrics['eval_perplexity']:.2f}")
    print(f"saved to {result.final_dir}" + (f"; loss curve {result.loss_curve}" if result.loss_curve else ""))
    return 0


@command("check")
def cmd_check(args: argparse.Namespace) -> int:
    from h1tune.config import load_config

    cfg = load_config(args.config, args.overrides)
    from h1tune.check import run_check

    run_check(cfg)
    print("check passed")
    return 0


@command("init-model")
def cmd_init_model(args: argparse.Namespace) -> int:
    from h1tune.tiny import init_model

    path = init_model(args.out_dir, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote Falcon-H1 preset {args.preset!r} (seed {args.seed}) to {path}")
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from h1tune.config import ModelConfig
    from h1tune.generate import SamplingConfig, generate_reply, load_for_generation

    model, tokenizer = load_for_generation(ModelConfig(name_or_path=args.model, dtype=args.dtype), args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, seed=args.seed)
    generate_reply(model, tokenizer, messages, sampling, stream=True)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="h1tune: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except H1tuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
