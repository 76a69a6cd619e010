"""Supervised fine-tuning data: sources, formats, chat-template rendering, assistant-only labels.

    from h1tune.data import prepare_datasets
    prepared = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)
    print(prepared.summary.format())      # train/eval examples: prepared.train, prepared.eval

Layout: `sources.py` reads files / hub datasets and mixes them by weight, `formats.py` turns
rows of each format into a `Conversation`, `render.py` renders with the tokenizer's chat template
and labels the assistant tokens, `summary.py` prints the validation table, `prepare.py` ties them
together, `collate.py` pads batches (packing: `packing.py`). No torch import at this level.
"""

from h1tune.data.collate import pad_collate
from h1tune.data.conversation import Conversation
from h1tune.data.prepare import PreparedData, prepare_datasets, validate_data
from h1tune.data.render import IGNORE_INDEX, TokenizedExample, tokenize_conversation
from h1tune.data.sources import load_conversations
from h1tune.data.summary import DataSummary

__all__ = [
    "IGNORE_INDEX", "Conversation", "DataSummary", "PreparedData", "TokenizedExample",
    "load_conversations", "pad_collate", "prepare_datasets", "tokenize_conversation", "validate_data",
]
