"""Plain-text corpora (issue 22): .txt/.md files and folders of them, read as documents by
data.text_unit, every token kept (long documents in pieces)."""

from __future__ import annotations

import pytest

from h1tune.config import DataConfig
from h1tune.data import prepare_datasets
from h1tune.errors import DataError

TEXT = "First line of a legal text.\nSecond line.\n\nA new paragraph\nspanning two lines.\n"


@pytest.fixture()
def corpus(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text(TEXT)
    (tmp_path / "corpus" / "sub" / "b.md").write_text("# Title\n\nMarkdown body.\n")
    (tmp_path / "corpus" / "notes.json").write_text("{}")  # not text: a folder is read as a text corpus
    return tmp_path / "corpus"


def documents(tokenizer, source, **data) -> list[str]:
    prepared = prepare_datasets(DataConfig(train=[source], max_length=data.pop("max_length", 256), **data),
                                tokenizer, seed=0)
    return [tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in prepared.train], prepared


@pytest.mark.parametrize("unit, expected", [
    ("line", ["First line of a legal text.", "Second line.", "A new paragraph", "spanning two lines.", "# Title",
              "Markdown body."]),
    ("paragraph", ["First line of a legal text.\nSecond line.", "A new paragraph\nspanning two lines.", "# Title",
                   "Markdown body."]),
    ("file", [TEXT.strip("\n"), "# Title\n\nMarkdown body."]),
])
def test_a_folder_reads_every_text_file_by_the_unit(tiny_tokenizer, corpus, unit, expected):
    docs, prepared = documents(tiny_tokenizer, str(corpus), text_unit=unit)
    assert docs == expected
    assert prepared.summary.sources[0].format == "text" and prepared.summary.train.trainable_tokens == \
        prepared.summary.train.tokens


def test_a_source_may_set_its_own_unit_and_long_documents_keep_every_token(tiny_tokenizer, corpus, tmp_path):
    docs, _ = documents(tiny_tokenizer, {"path": str(corpus / "a.txt"), "text_unit": "file"}, text_unit="line")
    assert docs == [TEXT.strip("\n")]
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"word{i}" for i in range(400)))
    _, prepared = documents(tiny_tokenizer, str(long), max_length=64)
    ids = tiny_tokenizer(long.read_text(), add_special_tokens=False)["input_ids"]
    assert sum(len(e["input_ids"]) for e in prepared.train) >= len(ids) and prepared.summary.train.split_pieces > 0


def test_a_folder_without_text_files_is_refused(tiny_tokenizer, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="is a directory with no .txt or .md files"):
        documents(tiny_tokenizer, str(tmp_path / "data"))
