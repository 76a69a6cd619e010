"""`h1tune check`: everything that can be wrong before training, found without training.

Validates the config (already done by loading it), the data files, the chat template, loads the
model, applies the adapter and runs the adapter probe on a real batch on the training path.
"""

from __future__ import annotations

from h1tune.config import H1tuneConfig
from h1tune.errors import H1tuneError

_PROBE_CONVERSATION = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def check_chat_template(tokenizer) -> None:
    """The template must render every turn's content, so assistant-only labels can be found."""
    try:
        text = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    except Exception as exc:  # a broken Jinja template raises many kinds of errors
        raise H1tuneError(f"the tokenizer's chat template fails to render a conversation: {exc}") from None
    if not all(turn["content"] in text for turn in _PROBE_CONVERSATION):
        raise H1tuneError("the tokenizer's chat template drops some turns' content; use a Falcon-H1 Instruct "
                          "tokenizer or an h1tune preset")


def run_check(cfg: H1tuneConfig) -> None:
    """Raise H1tuneError on the first problem; print what was checked."""
    from h1tune.adapters import apply_adapter
    from h1tune.batching import make_batches
    from h1tune.data import prepare_datasets
    from h1tune.model import load_model, load_tokenizer
    from h1tune.probe import probe_adapters

    tokenizer = load_tokenizer(cfg.model)
    check_chat_template(tokenizer)
    print("chat template: ok")
    data = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)
    print(data.summary.format())
    batches = make_batches(cfg.data, tokenizer, data.train, data.eval)
    model = apply_adapter(load_model(cfg.model), cfg)
    print(probe_adapters(model, batches.probe_batch()).format_table())
