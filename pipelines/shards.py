"""Parquet shards of a bounded size: `OUT/data/train-NNNNN-of-MMMMM.parquet`, made from the saved
row parts of every run of the build (pipelines/parts.py).

Rows are assigned to shards by a plan made from every row's id and size: ids in sorted order are
cut into consecutive shards whenever the next row would pass `rows_per_shard` or
`max_shard_bytes`. The plan is small (an id and a number per row) and gives shards that are
deterministic for the same input, never empty, and exactly within both bounds (a single row
larger than the byte bound gets a shard of its own).
"""

from __future__ import annotations

from typing import Any, Iterable

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


def write_shard(index: int, rows: Iterable[dict[str, Any]], data_dir: str, num_shards: int) -> dict[str, Any]:
    """Write one shard from `rows` in id order, a row group at a time, atomically (temp name, then
    rename); returns what was written. Memory: one row group, whatever the shard's size.

    Counts its rows, time and audio like a stage (`write.*` counters), so the summary shows it.
    """
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics

    from .stage_transform import METRICS_NAMESPACE, counter_name

    started = time.perf_counter()
    schema = rec.arrow_schema()
    final = shard_path(data_dir, index, num_shards)
    temp = FileSystems.join(data_dir, f".tmp-{index:05d}-of-{num_shards:05d}.parquet")
    count, nbytes, audio_seconds, group = 0, 0, 0.0, []
    with FileSystems.create(temp) as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for row in rows:
            group.append(row)
            count, nbytes, audio_seconds = count + 1, nbytes + row_bytes(row), audio_seconds + float(row.get("duration") or 0)
            if len(group) == ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                group = []
        if group or not count:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temp], [final])
    for what, value in (("in", count), ("out", 1), ("micros", int((time.perf_counter() - started) * 1e6)),
                        ("audio_ms_in", int(audio_seconds * 1000))):
        Metrics.counter(METRICS_NAMESPACE, counter_name(WRITE_SLOT, what)).inc(value)
    return {"path": final, "rows": count, "bytes": nbytes}


def plan_from_index(index: list[tuple[str, str, int]], rows_per_shard: int, max_shard_bytes: int) -> dict[str, Any]:
    """The shard plan over the rows of all parts, given as (id, part path, bytes). A row id found in
    several parts (an input redone after a kill) is planned once, read from the first such part."""
    chosen: dict[str, tuple[str, int]] = {}
    for row_id, part, nbytes in index:
        if row_id not in chosen or part < chosen[row_id][0]:
            chosen[row_id] = (part, nbytes)
    plan = plan_shards([(row_id, nbytes) for row_id, (_, nbytes) in chosen.items()], rows_per_shard, max_shard_bytes)
    plan["part"] = {row_id: part for row_id, (part, _) in chosen.items()}
    return plan


def spill_part(path: str, plan: dict[str, Any], spill_dir: str):
    """Sort the rows of one part by the shard they go to, into one spill file per shard on disk;
    yields (shard index, spill path). Only the small paths are then grouped, never rows, so no
    runner holds the corpus in memory (the local runner keeps what it groups in memory)."""
    from apache_beam.io.filesystems import FileSystems

    from .parts import read_rows, write_rows

    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in read_rows(path):
        if plan["part"].get(row["id"]) == path:  # a row kept once, whatever parts hold copies
            by_shard.setdefault(plan["assignment"][row["id"]], []).append(row)
    name = path.rsplit("/", 1)[-1]
    for index, rows in sorted(by_shard.items()):
        spill = FileSystems.join(spill_dir, f"{index:05d}-{name}")
        write_rows(spill, rows)
        yield index, spill


def write_shard_from_spills(item: tuple[int, list[str]], data_dir: str, num_shards: int) -> dict[str, Any]:
    """Write shard `index` by merging its spill files, each already in id order, as a stream."""
    import heapq

    from apache_beam.io.filesystems import FileSystems

    from .parts import read_rows

    index, spills = item
    merged = heapq.merge(*(read_rows(spill) for spill in sorted(spills)), key=lambda r: r["id"])
    written = write_shard(index, merged, data_dir, num_shards)
    FileSystems.delete(sorted(spills))
    return written


class ShardsFromParts(beam.PTransform):
    """(paths of row parts (pipelines/parts.py), their index of (part, id, source_uri, share, bytes)
    per row) -> one dict per written shard (path, rows, bytes).

    A shard holds consecutive ids, and the rows of one shard are spread over many parts: each part
    is cut into per-shard spill files in `spill_dir`, and each shard is written from its spills."""

    def __init__(self, data_dir: str, spill_dir: str, rows_per_shard: int, max_shard_bytes: int):
        super().__init__()
        self.data_dir, self.spill_dir = data_dir, spill_dir
        self.rows_per_shard, self.max_shard_bytes = rows_per_shard, max_shard_bytes

    def expand(self, parts_and_index):
        part_paths, row_index = parts_and_index
        plan = (
            row_index
            | "SizeOfRow" >> beam.MapTuple(lambda part, row_id, uri, share, nbytes: (row_id, part, nbytes))
            | "WholeIndex" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(plan_from_index, self.rows_per_shard, self.max_shard_bytes)
        )
        plan_view = beam.pvalue.AsSingleton(plan)
        data_dir, spill_dir = self.data_dir, self.spill_dir
        return (
            part_paths
            | "SpreadParts" >> beam.Reshuffle()
            | "Spill" >> beam.FlatMap(spill_part, plan_view, spill_dir)
            | "GroupShards" >> beam.GroupByKey()
            | "Write" >> beam.Map(lambda kv, p: write_shard_from_spills((kv[0], list(kv[1])), data_dir, p["num_shards"]),
                                  plan_view)
        )
