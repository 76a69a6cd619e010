"""One OUMI section at a time: each field is mapped, checked against what h1tune does, or ignored.

    sec = Section(oumi["training"], "training.", tree, report)
    sec.map("learning_rate", "training.learning_rate", default=5e-05)
    sec.agree("logging_strategy", {"steps"}, "h1tune logs every training.logging_steps",
              otherwise="h1tune logs by steps only")
    sec.ignore("dataloader_num_workers", "speed only")

Every call records the field as consulted, so a test can prove that each field of OUMI's schema
has a rule, and every present field lands in the report exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from h1tune.oumi.report import IGNORED, MAPPED, NOT_HONOURED, MappingReport

_UNSET = object()
NEUTRAL = (None, {}, [], "")  # values that ask for nothing


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way (`data.train.0.path`: an existing list item)."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


class Section:
    """The fields of one OUMI section and the rules that turn them into h1tune fields."""

    def __init__(self, values: dict[str, Any] | None, prefix: str, tree: dict[str, Any], report: MappingReport):
        self.values = values or {}
        self.prefix = prefix
        self.tree = tree
        self.report = report
        self.consulted: set[str] = set()
        self.children: list[Section] = []  # the sections nested in this one (data's datasets)

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        """Read a field for a rule that spans fields (no report entry)."""
        return self.values.get(key, default)

    def _value(self, key: str, default: Any) -> tuple[Any, bool] | None:
        """(value, is_default), or None when the file leaves it out and there is no default to report."""
        self.consulted.add(key)
        if key in self.values:
            return self.values[key], False
        return None if default is _UNSET else (default, True)

    def map(self, key: str, h1tune: str, default: Any = _UNSET, convert: Callable[[Any], Any] | None = None,
            note: str = "") -> Any:
        """Copy a field (or OUMI's default, when it differs from h1tune's) onto an h1tune field."""
        found = self._value(key, default)
        if found is None:
            return None
        raw, is_default = found
        value = convert(raw) if convert else raw
        set_path(self.tree, h1tune, value)
        self.report.add(MAPPED, self.prefix + key, raw, h1tune, value, note, default=is_default)
        return value

    def agree(self, key: str, ok: Collection[Any] | Callable[[Any], bool], reason: str, otherwise: str,
              default: Any = _UNSET, ok_kind: str = MAPPED) -> bool | None:
        """A field h1tune has no setting for: fine when its value is what h1tune does anyway.

        Returns whether it agreed (None when absent and no default is reported).
        """
        found = self._value(key, default)
        if found is None:
            return None
        value, is_default = found
        agreed = ok(value) if callable(ok) else _member(value, ok)
        kind = ok_kind if agreed else NOT_HONOURED
        self.report.add(kind, self.prefix + key, value, reason=reason if agreed else otherwise, default=is_default)
        return agreed

    def refuse(self, key: str, otherwise: str, neutral: Collection[Any] = NEUTRAL) -> None:
        """A field h1tune cannot honour: harmless when it asks for nothing, else reported as not honoured."""
        self.agree(key, neutral, "empty: nothing to apply", otherwise, ok_kind=IGNORED)

    def ignore(self, key: str, reason: str) -> None:
        """A field of OUMI's machinery that does not change the job under h1tune."""
        found = self._value(key, _UNSET)
        if found is not None:
            self.report.add(IGNORED, self.prefix + key, found[0], reason=reason)

    def note(self, kind: str, key: str, reason: str, value: Any = _UNSET, default: bool = False, **mapped) -> None:
        """Record a field that a cross-field rule handled."""
        self.consulted.add(key)
        self.report.add(kind, self.prefix + key, self.values.get(key) if value is _UNSET else value,
                        reason=reason, default=default, **mapped)


def _member(value: Any, allowed: Collection[Any]) -> bool:
    """`value in allowed`, tolerant of unhashable values and OUMI's case-insensitive enum names."""
    for item in allowed:
        if value == item or (isinstance(value, str) and isinstance(item, str) and value.lower() == item.lower()):
            return True
    return False


def enum_value(value: Any) -> Any:
    """OUMI enums are written by name (TRL_SFT) or value (trl_sft); compare them in lower case."""
    return value.lower() if isinstance(value, str) else value
