"""The `h1tune eval` subcommand: its options here, the work in h1tune.evaluation.run.

    h1tune eval tiny runs/sft --data heldout.jsonl --output eval.json

Kept beside the evaluation rather than in cli.py (which registers it) so cli.py stays small; only
argparse is imported at the top, so `h1tune --help` stays instant.
"""

from __future__ import annotations

import argparse


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="held-out loss and perplexity, samples and lm-eval tasks; several models side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Did the fine-tune help? Token-weighted loss and perplexity on held-out data (the assistant\n"
        "tokens, as training scores them), generations on a prompts file, and lm-evaluation-harness tasks,\n"
        "for one or more models, printed as one table (a column per model).\n\n"
        "A MODEL is a preset, hub id or model directory (merged or fully fine-tuned), an adapter directory\n"
        "(base + adapter; a QLoRA adapter on the 4-bit base it trained on), or a run directory (its final/).",
        epilog="examples:\n"
        "  h1tune eval tiny runs/sft --data heldout.jsonl --output eval.json\n"
        "  h1tune eval tiny runs/sft --config run.yaml --set data.packing=true   # the run's eval set, packed\n"
        "  h1tune eval runs/sft runs/merged --samples prompts.txt --temperature 0.7 --seed 1\n"
        "  h1tune eval runs/sft --tasks arc_easy,my_task.yaml --limit 200 --chat-template")
    p.add_argument("models", nargs="+", metavar="MODEL", help="preset, hub id, model directory, adapter "
                   "directory, or run directory")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="held-out data in any supported format (repeatable); default: the config's data.eval, "
                   "or the data.eval_fraction of data.train that its run held out")
    p.add_argument("--config", help="a run's YAML config: its data options (max_length, truncation, packing, "
                   "system_prompt, ...), its eval data, and how to load the base (dtype, quantization); "
                   "default: the data section of the first MODEL that is a run (its saved config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as for train, e.g. --set data.packing=true (repeatable)")
    p.add_argument("--batch-size", type=int, help="default: training.per_device_eval_batch_size")
    p.add_argument("--output", metavar="FILE.json", help="write every number and the settings as JSON")
    g = p.add_argument_group("samples")
    g.add_argument("--samples", metavar="PROMPTS_FILE", help="a .txt file (one prompt per line) or data file; "
                   "each model's replies are shown side by side and written as JSON lines")
    g.add_argument("--samples-output", metavar="FILE.jsonl",
                   help="default: the --output name with .samples.jsonl, else eval_samples.jsonl")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples, seeded")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i) and harness seed")
    g = p.add_argument_group("lm-evaluation-harness tasks (pip install 'h1tune[eval]')")
    g.add_argument("--tasks", help="comma-separated harness task names or task YAML files (a local "
                   "`dataset_path: json` task runs offline), e.g. arc_easy,hellaswag")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    g.add_argument("--limit", type=float, help="documents per task (a fraction of each task when below 1)")
    g.add_argument("--chat-template", action="store_true", help="render task prompts with the model's chat template")
    g.add_argument("--system", help="system instruction for the task prompts")


def cmd_eval(args: argparse.Namespace) -> int:
    from h1tune.config import load_config

    cfg = load_config(args.config, args.overrides) if args.config else run_data_config(args.models, args.overrides)
    from h1tune.evaluation import EvalOptions, HarnessOptions, run_eval
    from h1tune.generate import SamplingConfig

    harness = None
    if args.tasks is not None:
        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        harness = HarnessOptions(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                                 batch_size=args.batch_size or cfg.training.per_device_eval_batch_size,
                                 num_fewshot=args.num_fewshot, limit=limit, apply_chat_template=args.chat_template,
                                 system_instruction=args.system, seed=args.seed)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, seed=args.seed)
    run_eval(args.models, cfg, EvalOptions(data=args.data, batch_size=args.batch_size, output=args.output,
                                           prompts=args.samples, samples_output=args.samples_output,
                                           sampling=sampling, harness=harness))
    return 0


DATA_SETTINGS = ("max_length", "truncation", "packing", "system_prompt", "assistant_only_loss")


def run_data_config(models: list[str], overrides: list[str]):
    """Without --config: the data section (and seed, eval batch size) of the first MODEL that is a training
    run, so its held-out loss is scored as the run scored it; the defaults when none is. Says which."""
    import logging

    from h1tune.config import apply_overrides, config_from_dict, load_config
    from h1tune.evaluation.models import resolve_model, run_config_path

    found = next((p for p in (run_config_path(resolve_model(m)) for m in models) if p is not None), None)
    if found is None:
        return load_config(None, overrides)
    run = load_config(found)
    tree = {"data": run.data.model_dump(mode="json"),
            "training": {"seed": run.training.seed,
                         "per_device_eval_batch_size": run.training.per_device_eval_batch_size}}
    cfg = config_from_dict(tree, apply_overrides(tree, list(overrides)))
    settings = ", ".join(f"{name} {getattr(cfg.data, name)}" for name in DATA_SETTINGS)
    logging.getLogger("h1tune").info("eval: data settings of the run %s (no --config): %s", found, settings)
    return cfg
