"""Atomic artifact writing and the run-directory layout.

Every file is written to a temporary sibling and renamed into place, so a crash
never leaves a half-written artifact; a stage is finished exactly when its marker
file exists, which is what makes runs resumable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON lines atomically."""
    return write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_parquet(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write a list of flat dicts as a parquet table atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = _tmp_sibling(path)
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Read a parquet table back as a list of dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def publish_dir(src: str | Path, dest: str | Path) -> Path:
    """Move a finished folder ``src`` to ``dest`` atomically (replacing an old ``dest``)."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
    return dest
