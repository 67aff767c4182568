"""Text data sets for ``lorafast finetune``: read CSV, TSV or JSONL, find the text / label columns, map labels.

A file is a table of rows (CSV/TSV with a header line, or JSONL with one JSON object per line).
The text column and (for classification) the label column are given by name or detected from
common names, in any column order. Labels are either integer class ids ``0 … n-1`` or class
names (strings), which map to ids in sorted order so the mapping does not depend on row order.
Every problem raises ``ValueError`` (``FileNotFoundError`` for a missing file) with a one-line
message naming the file, and the row or column at fault.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_COLUMN_NAMES = ("text", "sentence", "content", "review", "document", "input", "prompt")
LABEL_COLUMN_NAMES = ("label", "labels", "sentiment", "target", "class", "category", "y")
FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}

_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` / ``.tsv`` / ``.jsonl`` file, each a dict keyed by column name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .tsv or .jsonl")
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = _read_jsonl(handle, path) if FORMATS[suffix] is None else _read_delimited(handle, path, FORMATS[suffix])
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8") from None
    if not rows:
        raise ValueError(f"{path}: the data set is empty (no rows)")
    return rows


def _read_delimited(handle, path: Path, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(handle, delimiter=delimiter)
    rows = []
    for row in reader:
        if None in row or None in row.values():
            raise ValueError(
                f"{path}: line {reader.line_num} has a different number of fields than the header {reader.fieldnames}"
            )
        rows.append(row)
    return rows


def _read_jsonl(handle, path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_number} is a JSON {type(row).__name__}, expected an object")
        rows.append(row)
    return rows


def column_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every column name, in order of first appearance."""
    return list(dict.fromkeys(name for row in rows for name in row))


def pick_column(rows: list[dict[str, Any]], given: str | None, role: str, path: str | Path) -> str:
    """The column holding the ``role`` (``"text"`` or ``"label"``): ``given``, or the first common name present."""
    columns = column_names(rows)
    if given is not None:
        if given not in columns:
            raise ValueError(f"{path}: unknown {role} column {given!r}; the columns are {columns}")
        return given
    by_lower_name = {name.lower(): name for name in columns}
    candidates = TEXT_COLUMN_NAMES if role == "text" else LABEL_COLUMN_NAMES
    found = next((by_lower_name[name] for name in candidates if name in by_lower_name), None)
    if found is None:
        raise ValueError(
            f"{path}: cannot tell which column holds the {role} (columns: {columns}); pass --{role}-column"
        )
    return found


def _column_values(rows: list[dict[str, Any]], column: str, path: str | Path) -> list[Any]:
    missing = next((index for index, row in enumerate(rows, start=1) if column not in row), None)
    if missing is not None:
        raise ValueError(f"{path}: row {missing} has no {column!r} field")
    return [row[column] for row in rows]


def read_texts(rows: list[dict[str, Any]], column: str, path: str | Path) -> list[str]:
    """The non-empty strings of ``column``."""
    texts = _column_values(rows, column, path)
    for index, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {index} has {column!r} = {text!r}; texts must be non-empty strings")
    return texts


@dataclass(frozen=True)
class LabelSet:
    """The classes of a classification data set: ``names[i]`` is class id ``i``.

    ``integer`` says the file gave class ids (``names`` are then ``"0" … "n-1"``); otherwise it
    gave class names, sorted to fix the ids.
    """

    names: tuple[str, ...]
    integer: bool

    @classmethod
    def from_labels(cls, labels: list[Any], path: str | Path) -> LabelSet:
        integer = _labels_are_integers(labels, path)
        classes = {int(v) for v in labels} if integer else set(labels)
        if len(classes) < 2:
            raise ValueError(f"{path}: every label is {labels[0]!r}; classification needs at least two classes")
        if integer:
            if max(classes) >= 2 * len(classes):  # the head gets max + 1 outputs: 1e9 would not fit in memory
                raise ValueError(
                    f"{path}: integer labels are class ids 0 … n-1, but {len(classes)} classes go up to "
                    f"{max(classes)}; renumber them, or give class names as strings"
                )
            return cls(names=tuple(str(i) for i in range(max(classes) + 1)), integer=True)
        return cls(names=tuple(sorted(classes)), integer=False)

    def encode(self, labels: list[Any], path: str | Path) -> list[int]:
        """Class ids ``[len(labels)]`` for ``labels``, which must be of this set's kind and classes."""
        integer = _labels_are_integers(labels, path)
        if integer != self.integer:
            kind = "integers" if integer else "strings"
            raise ValueError(f"{path}: labels are {kind} but the training labels are not; use the same kind in both")
        if integer:
            ids = [int(v) for v in labels]
            too_large = next((i for i in ids if i >= len(self.names)), None)
            if too_large is not None:
                raise ValueError(f"{path}: label {too_large} is not a training class id (0 … {len(self.names) - 1})")
            return ids
        unknown = sorted(set(labels) - set(self.names))
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} do not occur in the training labels {list(self.names)}")
        index = {name: i for i, name in enumerate(self.names)}
        return [index[v] for v in labels]


def _labels_are_integers(labels: list[Any], path: str | Path) -> bool:
    """True for integer class ids (ints, or strings of digits from CSV), False for class names; else raise."""
    kinds = {}
    for row, label in enumerate(labels, start=1):
        kinds.setdefault(_label_kind(label, row, path), row)
    if len(kinds) > 1:
        raise ValueError(
            f"{path}: labels mix integers (row {kinds['integer']}) and strings (row {kinds['string']}); "
            "use integer class ids or class names throughout"
        )
    return "integer" in kinds


def _label_kind(label: Any, row: int, path: str | Path) -> str:
    if isinstance(label, int) and not isinstance(label, bool):
        kind, value = "integer", label
    elif isinstance(label, str) and _INTEGER.fullmatch(label.strip()):
        kind, value = "integer", int(label)
    elif isinstance(label, str) and label.strip() and not _NUMBER.fullmatch(label.strip()):
        return "string"
    else:
        raise ValueError(
            f"{path}: row {row} has label {label!r}, which is neither an integer class id nor a class name"
        )
    if value < 0:
        raise ValueError(f"{path}: row {row} has label {value}; integer labels must be class ids 0 … n-1")
    return kind


@dataclass
class TextData:
    """Texts read from one file, with class ids for classification (``labels is None`` otherwise)."""

    texts: list[str]
    labels: list[int] | None = None


def load_text_data(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    with_labels: bool = True,
    label_set: LabelSet | None = None,
) -> tuple[TextData, LabelSet | None]:
    """Read ``path``; with labels, build the ``LabelSet`` (or encode against the given one, e.g. the training set's)."""
    rows = read_rows(path)
    texts = read_texts(rows, pick_column(rows, text_column, "text", path), path)
    if not with_labels:
        return TextData(texts), None
    raw_labels = _column_values(rows, pick_column(rows, label_column, "label", path), path)
    label_set = label_set or LabelSet.from_labels(raw_labels, path)
    return TextData(texts, label_set.encode(raw_labels, path)), label_set
