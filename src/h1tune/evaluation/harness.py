"""lm-evaluation-harness tasks on the model h1tune already loaded (`pip install 'h1tune[eval]'`).

    options = HarnessOptions(tasks=["arc_easy", "tests/fixtures/eval_tasks/h1tune_mc.yaml"])
    scores = run_tasks(model, tokenizer, options)        # {"arc_easy": {"acc": 0.61, ...}, ...}

The harness gets the loaded model object (`HFLM(pretrained=model, tokenizer=tokenizer)`), so it
scores exactly what `h1tune eval` loaded: base + adapter, a QLoRA adapter on its 4-bit base, a
merged model, in the dtype chosen. A task is a registered harness name or a task YAML file; a
YAML file's relative `dataset_kwargs.data_files` are resolved against the YAML's folder, so a
local task (`dataset_path: json`) runs offline from any working directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h1tune.errors import H1tuneError

log = logging.getLogger("h1tune")
INSTALL_HINT = "pip install 'h1tune[eval]'"
# HFLM warns whenever it is handed a model object, which is how h1tune always calls it
EXPECTED_NOTICES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def _drop_expected_notices(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(EXPECTED_NOTICES)


@dataclass
class HarnessOptions:
    """What to run and how; `limit` caps the documents per task (an int, or a fraction below 1)."""

    tasks: list[str]
    batch_size: int = 1
    num_fewshot: int | None = None
    limit: float | None = None
    apply_chat_template: bool = False
    system_instruction: str | None = None
    log_samples: bool = False
    seed: int = 0


@dataclass
class TaskSet:
    """The tasks as lm_eval loads them, checked once, before any model loads, and reused for every model."""

    specs: list[str | dict[str, Any]]
    manager: Any  # lm_eval.tasks.TaskManager


@dataclass
class HarnessResult:
    """Per-task metrics (`acc`, `acc_norm`, their stderr, ...), and per-document records when logged."""

    scores: dict[str, dict[str, float]]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def require_lm_eval():
    """The `lm_eval` module, or an error that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails when the install is incomplete)
    except ImportError as exc:
        raise H1tuneError(f"--tasks runs lm-evaluation-harness, which is not installed ({exc}); install it with "
                          f"{INSTALL_HINT}") from None
    return lm_eval


def task_specs(tasks: list[str]) -> list[str | dict[str, Any]]:
    """Harness names as they are; YAML files as task dicts with their data files made absolute.

    Raises:
        H1tuneError: a `.yaml` path that does not exist or has no `task` key.
    """
    specs: list[str | dict[str, Any]] = []
    for task in tasks:
        if not task.endswith((".yaml", ".yml")):
            specs.append(task)
            continue
        path = Path(task).expanduser()
        if not path.is_file():
            raise H1tuneError(f"--tasks {task!r}: no such task file (cwd: {Path.cwd()})")
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(path)
        if "task" not in config:
            raise H1tuneError(f"--tasks {task!r}: a task YAML needs a `task:` name (a group file is not supported "
                              "here; list its tasks instead)")
        specs.append(_resolve_data_files(config, path.parent))
    return specs


def _resolve_data_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`data_files` relative to the YAML, as `h1tune train` reads data paths relative to its config."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return config

    def resolve(name: Any) -> Any:
        if isinstance(name, list):
            return [resolve(n) for n in name]
        candidate = folder / str(name)
        return str(candidate) if not Path(str(name)).is_absolute() and candidate.exists() else name

    kwargs["data_files"] = {k: resolve(v) for k, v in files.items()} if isinstance(files, dict) else resolve(files)
    return {**config, "dataset_kwargs": kwargs}


def load_task_set(tasks: list[str]) -> TaskSet:
    """Every task found (a harness name, or a YAML file), or one error naming each that is not.

    Raises:
        H1tuneError: lm_eval is missing, no task is given, or a task is unknown.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise H1tuneError("--tasks: empty; give harness task names or task YAML files, comma-separated")
    specs = task_specs(tasks)
    names = [s for s in specs if isinstance(s, str)]
    # indexing the built-in task folders takes seconds; skip it when every task is a local file
    manager = TaskManager(include_defaults=bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise H1tuneError(f"--tasks: unknown task(s) {', '.join(map(repr, unknown))}; give harness task names "
                          "(`lm_eval ls tasks`) or task YAML files")
    return TaskSet(specs, manager)


def run_tasks(model, tokenizer, options: HarnessOptions, task_set: TaskSet | None = None) -> HarnessResult:
    """Run `options.tasks` through lm_eval's `simple_evaluate` on the loaded model."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    task_set = task_set or load_task_set(options.tasks)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    if _drop_expected_notices not in hf_log.filters:
        hf_log.addFilter(_drop_expected_notices)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=task_set.specs, num_fewshot=options.num_fewshot, limit=options.limit,
            apply_chat_template=options.apply_chat_template, system_instruction=options.system_instruction,
            log_samples=options.log_samples, task_manager=task_set.manager, random_seed=options.seed,
            numpy_random_seed=options.seed, torch_random_seed=options.seed, fewshot_random_seed=options.seed)
    except OSError as exc:  # datasets' ConnectionError / DatasetNotFoundError for a task's data
        raise H1tuneError(f"--tasks: cannot load a task's data ({type(exc).__name__}: {exc}). Built-in tasks "
                          "download their data from the Hugging Face Hub: run once online (it is cached), or use "
                          "a local task YAML (dataset_path: json, dataset_kwargs.data_files)") from None
    return HarnessResult(scores={task: _metrics(values) for task, values in results["results"].items()},
                         samples=results.get("samples", {}) if options.log_samples else {})


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """`{"acc,none": 0.5, "alias": ...}` -> `{"acc": 0.5}`; a filter other than `none` stays in the name."""
    out = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
    return out
