"""Read a task's rows from JSONL, CSV or Parquet files, keeping where each row came from.

Every row is returned, including the ones that cannot be used: a line that is not JSON, or text that
is not UTF-8, becomes a :class:`RawRow` with ``error`` set, so the caller can report it (file and
line) or drop it on request, never silently. Bytes that are not UTF-8 are decoded with
``surrogateescape``; :func:`non_utf8_fields` then names the fields that hold them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "RawRow", "find_split_file", "non_utf8_fields", "read_rows"]

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class RawRow:
    """One data row as read from a file.

    Attributes:
        file: the file's path as shown in messages.
        line: 1-based line of the row (JSONL: its line; CSV: the line the record starts on;
            Parquet: its 1-based row number).
        index: 0-based position among the file's data rows (blank JSONL lines do not count).
        data: the row's fields, or ``None`` when the row could not be read.
        error: why the row could not be read (not JSON, not an object, ...), else ``None``.

    """

    file: str
    line: int
    index: int
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def where(self) -> str:
        """``file:line`` (``file row N`` for Parquet)."""
        if self.file.endswith((".parquet", ".pq")):
            return f"{self.file} row {self.line}"
        return f"{self.file}:{self.line}"


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def non_utf8_fields(data: dict[str, Any]) -> list[str]:
    """Names of the fields whose text held bytes that are not UTF-8 (decoded as surrogates)."""
    bad = []
    for k, v in data.items():
        if isinstance(v, str) and _has_surrogates(v):
            bad.append(str(k))
        elif isinstance(v, list) and any(isinstance(x, str) and _has_surrogates(x) for x in v):
            bad.append(str(k))
    return bad


def _read_bytes(path: Path | Traversable) -> bytes:
    with path.open("rb") as fh:
        return fh.read()


def _jsonl(name: str, raw: bytes) -> list[RawRow]:
    rows: list[RawRow] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        text = line.decode("utf-8", errors="surrogateescape").strip()
        if lineno == 1:
            text = text.lstrip("\ufeff")
        if not text:
            continue
        index = len(rows)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            what = "not valid UTF-8" if _has_surrogates(text) else f"not valid JSON ({e.msg}, column {e.colno})"
            rows.append(RawRow(name, lineno, index, None, what))
            continue
        if not isinstance(obj, dict):
            rows.append(RawRow(name, lineno, index, None, f"not a JSON object (got {type(obj).__name__})"))
            continue
        rows.append(RawRow(name, lineno, index, obj))
    return rows


def _csv(name: str, raw: bytes) -> list[RawRow]:
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[RawRow] = []
    header: list[str] | None = None
    start = 1
    for record in reader:
        if header is None:
            header = [h.strip() for h in record]
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        index = len(rows)
        if len(record) != len(header):
            rows.append(RawRow(name, line, index, None,
                               f"has {len(record)} columns, the header has {len(header)}"))
            continue
        rows.append(RawRow(name, line, index, dict(zip(header, record, strict=True))))
    return rows


def _parquet(name: str, raw: bytes) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(raw))
    rows = []
    for i, rec in enumerate(table.to_pylist()):
        fixed = {}
        for k, v in rec.items():
            if isinstance(v, bytes):  # a binary column: decode like the text formats
                v = v.decode("utf-8", errors="surrogateescape")
            fixed[k] = v
        rows.append(RawRow(name, i + 1, i, fixed))
    return rows


def read_rows(path: Path | Traversable, shown: str | None = None) -> list[RawRow]:
    """Every row of a ``.jsonl``/``.json`` (one object per line), ``.csv`` or ``.parquet`` file.

    Args:
        path: a file path, or a packaged resource (built-in tasks).
        shown: the name used in messages (default: the path).

    Raises:
        ValueError: the file's extension is not one of :data:`FORMATS`.
        FileNotFoundError: no such file.

    """
    name = shown or str(path)
    suffix = "." + path.name.rsplit(".", 1)[-1].lower() if "." in path.name else ""
    kind = FORMATS.get(suffix)
    if kind is None:
        raise ValueError(f"{name}: unknown file type {suffix or '(none)'!r}; use .jsonl, .csv or .parquet")
    raw = _read_bytes(path)
    if kind == "jsonl":
        return _jsonl(name, raw)
    if kind == "csv":
        return _csv(name, raw)
    return _parquet(name, raw)


def find_split_file(folder: Path, split: str) -> Path | None:
    """``folder/<split>.<ext>`` for one supported extension; ``None`` when there is none.

    Raises ValueError when more than one format is present (``train.jsonl`` and ``train.csv``).
    """
    found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder}: more than one {split} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def package_file(relative: str) -> Traversable:
    """A file shipped under ``trprompt/data/files`` (built-in tasks)."""
    node = resources.files("trprompt.data").joinpath("files")
    for part in relative.split("/"):
        node = node.joinpath(part)
    return node
