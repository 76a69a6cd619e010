"""Did the fine-tune help? Held-out loss, samples and harness tasks, for several models side by side.

    h1tune eval tiny runs/sft --data heldout.jsonl --output eval.json

Layout: `models.py` resolves a MODEL argument (run, adapter or model directory, hub id, preset)
and loads it as it was trained; `loss.py` is the held-out loss (the training pipeline's data and
its one token-weighted loss); `samples.py` generations on a prompts file; `harness.py`
lm-evaluation-harness tasks on the loaded model; `report.py` the table and the JSON file;
`run.py` ties them together for the CLI. No torch import at this level.
"""

from h1tune.evaluation.harness import HarnessOptions, HarnessResult, run_tasks
from h1tune.evaluation.loss import LossResult, heldout_loss, read_eval_conversations, token_weighted_loss
from h1tune.evaluation.models import ModelSpec, load_eval_model, resolve_model
from h1tune.evaluation.report import ModelResult, format_table, write_report
from h1tune.evaluation.run import EvalOptions, EvalReport, run_eval
from h1tune.evaluation.samples import Prompt, generate_samples, read_prompts

__all__ = [
    "EvalOptions", "EvalReport", "HarnessOptions", "HarnessResult", "LossResult", "ModelResult", "ModelSpec",
    "Prompt", "format_table", "generate_samples", "heldout_loss", "load_eval_model", "read_eval_conversations",
    "read_prompts", "resolve_model", "run_eval", "run_tasks", "token_weighted_loss", "write_report",
]
