"""Parquet shards of a bounded size: `OUT/data/train-NNNNN-of-MMMMM.parquet`.

Rows are assigned to shards by a plan made from every row's id and size: ids in sorted order are
cut into consecutive shards whenever the next row would pass `rows_per_shard` or
`max_shard_bytes`. The plan is small (an id and a number per row) and gives shards that are
deterministic for the same input, never empty, and exactly within both bounds (a single row
larger than the byte bound gets a shard of its own).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from echat.schemas import record as rec

from .rows import row_bytes

ROW_GROUP_ROWS = 64  # keeps a streaming reader's memory small: audio makes rows heavy
WRITE_SLOT = "write"  # the name of the shard writer's counters in the run summary


def plan_shards(sizes: list[tuple[str, int]], rows_per_shard: int, max_shard_bytes: int) -> dict[str, Any]:
    """{'assignment': id -> shard index, 'num_shards': M} for rows given as (id, bytes)."""
    assignment: dict[str, int] = {}
    shard, rows, size = 0, 0, 0
    for row_id, nbytes in sorted(sizes):
        if rows and (rows + 1 > rows_per_shard or size + nbytes > max_shard_bytes):
            shard, rows, size = shard + 1, 0, 0
        assignment[row_id] = shard
        rows, size = rows + 1, size + nbytes
    return {"assignment": assignment, "num_shards": shard + 1 if assignment else 0}


def shard_path(data_dir: str, index: int, num_shards: int) -> str:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(data_dir, f"train-{index:05d}-of-{num_shards:05d}.parquet")


def write_shard(item: tuple[int, list[dict[str, Any]]], data_dir: str, num_shards: int) -> dict[str, Any]:
    """Write one shard atomically (temp name, then rename); returns what was written.

    Counts its rows, time and audio like a stage (`write.*` counters), so the summary shows it.
    """
    import time

    from apache_beam.metrics import Metrics

    from .stage_transform import METRICS_NAMESPACE, counter_name

    started = time.perf_counter()
    written = _write_shard(item, data_dir, num_shards)
    rows = item[1]
    for what, value in (("in", len(rows)), ("out", 1), ("micros", int((time.perf_counter() - started) * 1e6)),
                        ("audio_ms_in", int(sum(float(r.get("duration") or 0) for r in rows) * 1000))):
        Metrics.counter(METRICS_NAMESPACE, counter_name(WRITE_SLOT, what)).inc(value)
    return written


def _write_shard(item: tuple[int, list[dict[str, Any]]], data_dir: str, num_shards: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    index, rows = item
    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist(rows, schema=rec.arrow_schema())
    final = shard_path(data_dir, index, num_shards)
    temp = FileSystems.join(data_dir, f".tmp-{index:05d}-of-{num_shards:05d}.parquet")
    with FileSystems.create(temp) as handle:
        pq.write_table(table, handle, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temp], [final])
    return {"path": final, "rows": len(rows), "bytes": sum(row_bytes(r) for r in rows)}


class WriteShards(beam.PTransform):
    """rows -> one dict per written shard (path, rows, bytes)."""

    def __init__(self, data_dir: str, rows_per_shard: int, max_shard_bytes: int):
        super().__init__()
        self.data_dir, self.rows_per_shard, self.max_shard_bytes = data_dir, rows_per_shard, max_shard_bytes

    def expand(self, rows):
        plan = (
            rows
            | "Sizes" >> beam.Map(lambda r: (r["id"], row_bytes(r)))
            | "AllSizes" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(plan_shards, self.rows_per_shard, self.max_shard_bytes)
        )
        plan_view = beam.pvalue.AsSingleton(plan)
        data_dir = self.data_dir
        return (
            rows
            | "Assign" >> beam.Map(lambda r, p: (p["assignment"][r["id"]], r), plan_view)
            | "GroupShards" >> beam.GroupByKey()
            | "Write" >> beam.Map(lambda kv, p: write_shard((kv[0], list(kv[1])), data_dir, p["num_shards"]), plan_view)
        )
