"""Work saved as it finishes: row and reject parts under OUT/_work/parts/, so a killed build resumes.

Rows leave the last stage one by one; `WriteParts` buffers them and writes a part every
`part_rows` rows and at the end of each bundle. A part is written atomically (a temp name, then a
rename) and named by a hash of what it holds, so a bundle that Beam retries rewrites its own part
instead of adding a copy. Rejects are saved the same way as JSON lines. Every row and reject keeps
its share of its input (schemas/shares.py), which is how a rerun tells finished inputs from
half-done ones (pipelines/resume.py).

The final shards and the rejects output are then made from all parts, those of this run and of
the runs before it, with each row id and each reject kept once (an input cut off by the kill is
done again, and gives the same ids).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import apache_beam as beam

from echat.schemas import record as rec
from echat.schemas.shares import SHARE_KEY

PARTS_DIR = "parts"
ROWS, REJECTS = "rows", "rejects"
SUFFIX = {ROWS: ".parquet", REJECTS: ".jsonl"}
SIZE_KEY = "_row_bytes"  # a row's size in a shard (pipelines/rows.py row_bytes), kept so the plan never reads audio
INDEX_COLUMNS = ("id", "source_uri", SHARE_KEY, SIZE_KEY)  # what resume and the shard plan read of a row part


def part_schema():
    import pyarrow as pa

    return rec.arrow_schema().append(pa.field(SHARE_KEY, pa.string())).append(pa.field(SIZE_KEY, pa.int64()))


def part_name(kind: str, keys: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:24]
    return f"{kind}-{digest}{SUFFIX[kind]}"


def is_part(path: str, kind: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(f"{kind}-") and name.endswith(SUFFIX[kind])


def write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Rows (with their shares) as a parquet file at `path`, sorted by id."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from .rows import row_bytes

    sized = [{**r, SIZE_KEY: row_bytes(r)} for r in sorted(rows, key=lambda r: r["id"])]
    with FileSystems.create(path) as handle:
        pq.write_table(pa.Table.from_pylist(sized, schema=part_schema()), handle, row_group_size=16, compression="zstd")


def write_part(parts_dir: str, kind: str, items: list[dict[str, Any]]) -> str:
    """Write one part atomically; returns its path."""
    import uuid

    from apache_beam.io.filesystems import FileSystems

    if kind == ROWS:
        keys = [r["id"] for r in items]
    else:
        keys = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in items]
    final = FileSystems.join(parts_dir, part_name(kind, keys))
    temp = FileSystems.join(parts_dir, f".tmp-{uuid.uuid4().hex}{SUFFIX[kind]}")
    if kind == ROWS:
        write_rows(temp, items)
    else:
        with FileSystems.create(temp) as handle:
            handle.write("".join(k + "\n" for k in sorted(keys)).encode("utf-8"))
    if FileSystems.exists(final):  # the same rows again (a retried bundle): same content
        FileSystems.delete([final])
    FileSystems.rename([temp], [final])
    return final


class WriteParts(beam.DoFn):
    """items -> paths of the parts they were saved in (`kind`: rows or rejects)."""

    def __init__(self, parts_dir: str, kind: str, part_rows: int):
        self.parts_dir, self.kind, self.part_rows = parts_dir, kind, part_rows

    def start_bundle(self):
        self._buffer: list[dict[str, Any]] = []

    def process(self, item: dict[str, Any]) -> Iterator[str]:
        self._buffer.append(item)
        if len(self._buffer) >= self.part_rows:
            yield self._flush()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        if self._buffer:
            yield WindowedValue(self._flush(), GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _flush(self) -> str:
        items, self._buffer = self._buffer, []
        return write_part(self.parts_dir, self.kind, items)


def list_parts(parts_dir: str, kind: str) -> list[str]:
    """The finished parts of `kind` in `parts_dir` (temp files of a killed write are not parts)."""
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(parts_dir) and "://" not in parts_dir:
        return []
    pattern = FileSystems.join(parts_dir, f"{kind}-*{SUFFIX[kind]}")
    return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list if is_part(m.path, kind))


def read_row_index(path: str) -> list[tuple[str, str, str | None, int]]:
    """(id, source_uri, share, bytes) of every row of a row part, reading only those columns."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        table = pq.read_table(handle, columns=list(INDEX_COLUMNS))
    return list(zip(*(table.column(c).to_pylist() for c in INDEX_COLUMNS)))


def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """The rows of a row part, one row group at a time (a part is small, but rows hold audio)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        for group in range(parquet.num_row_groups):
            for row in parquet.read_row_group(group).to_pylist():
                row.pop(SIZE_KEY, None)
                yield row


def read_rejects(path: str) -> Iterator[str]:
    """The reject lines (JSON text) of a reject part."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        for line in handle.read().decode("utf-8").split("\n"):
            if line:
                yield line
