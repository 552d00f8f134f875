"""Reading a built corpus folder (`echat build --output OUT`) for validation, report, card and push.

Everything streams: shards are read batch by batch (`iter_batches`), and a batch's audio bytes are
dropped as soon as the caller has used them, so memory stays flat however many shards there are.
Paths shown to a reader (report, card, console) are relative to OUT, never absolute paths of the
machine that built the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_DIR = "data"
SHARD_GLOB = "train-*.parquet"
SUMMARY = "summary.json"
REJECTS_DIR = "rejects"
BATCH_ROWS = 64  # rows per read batch; a shard's row group is 64 rows (model/data_sources.py)


class CorpusError(ValueError):
    """OUT is not a built corpus (no shards), or a shard cannot be read; names the path."""


def shard_files(out: str | os.PathLike) -> list[Path]:
    """The parquet shards of a build, in name order; CorpusError when there are none."""
    out = Path(out)
    if not out.is_dir():
        raise CorpusError(f"{out}: no such folder (expected the --output folder of `echat build`)")
    files = sorted((out / DATA_DIR).glob(SHARD_GLOB)) or sorted((out / DATA_DIR).glob("*.parquet"))
    if not files:
        raise CorpusError(f"{out}: no shards under {DATA_DIR}/ (expected {DATA_DIR}/{SHARD_GLOB} from `echat build`)")
    return files


def read_summary(out: str | os.PathLike) -> dict[str, Any] | None:
    """The build's summary.json, or None when the folder has none."""
    path = Path(out) / SUMMARY
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def iter_rejects(out: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every reject of the build (rejects/*.jsonl), one dict per line."""
    for path in sorted((Path(out) / REJECTS_DIR).glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def columns_of(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise CorpusError(f"{path}: cannot read the parquet footer ({err})") from err


def iter_batches(path: Path, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS):
    """pyarrow RecordBatches of one shard; `columns` that the shard lacks are left out."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if columns is not None:
        have = set(pf.schema_arrow.names)
        columns = [c for c in columns if c in have]
    yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def iter_rows(path: Path, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, Any]]:
    """The rows of one shard as dicts (only `columns`), batch by batch."""
    for batch in iter_batches(path, columns, batch_rows):
        yield from batch.to_pylist()


def display_path(path: str | os.PathLike, out: str | os.PathLike) -> str:
    """`path` relative to OUT when it lies inside it, else its file name: never an absolute path."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(out)).as_posix()
    except ValueError:
        return Path(str(path)).name


def input_name(summary: dict[str, Any] | None) -> str | None:
    """The build's input as a reader may see it: its last path component (no machine paths)."""
    raw = (summary or {}).get("input")
    if not raw:
        return None
    return Path(str(raw).rstrip("/")).name or str(raw)
