"""The build graph: source records -> the profile's stages -> shards, rejects and tallies.

```
records -> Reshuffle -> decode -> vad -> Reshuffle -> asr -> labelers... -> filter
        -> reply -> tts -> encode -> parts -> shards                        -> OUT/data/
every stage's rejects (and the source's) --------------------------------> OUT/rejects/
per-source tallies (each stage's in/out/rejects, rows, seconds) ---------> OUT/_work/tallies.json
```
The first Reshuffle spreads files over workers while records are still light. After a stage that
splits records (VAD, diarization) a second one spreads the segments, each holding only its own
slice of audio, so one long recording keeps every worker busy. Elsewhere stages fuse, and
waveforms pass between them in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import apache_beam as beam

from echat.schemas import shares
from echat.schemas.stage_runner import RetryPolicy

from .accuracy import LabelAccuracyAccumulator
from .dedup import AUDIO_SLOT, STEPS, TRANSCRIPT_SLOT, Dedup
from .profile import Profile
from .read_sources import GivenSources
from .parts import REJECTS, ROWS, WriteParts, read_rejects, read_row_index
from .resume import Resume
from .rows import EncodeRow
from .shards import ShardsFromParts
from .stage_transform import ApplyStage, StageSpec

ENCODE_SLOT = "encode"


def stage_specs(profile: Profile) -> list[StageSpec]:
    """The profile's enabled stages in order, then the row encoder."""
    import os

    from .backends import backend_path

    specs = []
    precedence = tuple(profile.precedence)
    for entry in profile.enabled_stages():
        path = backend_path(entry.backend_kind, entry.backend)
        retry = entry.retry or profile.retry
        specs.append(StageSpec(
            entry.slot, path, _with_cache_dir(path, entry.params, os.path.expanduser(profile.cache_dir)),
            batch_size=entry.batch_size, max_in_flight=entry.max_in_flight,
            retry=RetryPolicy(**retry.model_dump()), precedence=precedence, resources=entry.resources,
        ))
    specs.append(StageSpec(ENCODE_SLOT, None, {}, factory=EncodeRow, precedence=precedence))
    return specs


def stage_order(profile: Profile) -> list[str]:
    """Every step that counts and tallies like a stage, in build order (the lineage rule's chain)."""
    specs = stage_specs(profile)
    slots = [spec.slot for spec in specs]
    if profile.dedup.transcripts:  # before the audio step is inserted: the place is a stage's slot
        slots.insert(slots.index(_transcript_dedup_place(specs)), TRANSCRIPT_SLOT)
    if profile.dedup.audio:
        slots.insert(1, AUDIO_SLOT)
    return slots


def _transcript_dedup_place(specs: list[StageSpec]) -> str:
    """The slot the transcript dedup runs before: the quality filter if there is one, else encode."""
    slots = [spec.slot for spec in specs]
    return "filter" if "filter" in slots else ENCODE_SLOT


def _dedup(current, kind: str, rejects: list, tallies: list):
    slot, key_of, reason, what = STEPS[kind]
    current, step_rejects, step_tallies = current | Dedup(slot, key_of, reason, what)
    rejects.append(step_rejects)
    tallies.append(step_tallies)
    return current


def _with_cache_dir(class_path: str, params: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """The profile's cache folder goes to every backend that takes one (slow or paid calls)."""
    import inspect

    from .backends import load_class

    params = dict(params)
    accepts = inspect.signature(load_class(class_path)).parameters
    if "cache_dir" in accepts and "cache_dir" not in params and cache_dir:
        params["cache_dir"] = cache_dir
    return params


def _tally(kind: str, seconds_key: str | None = None):
    def tally(element: dict[str, Any]) -> tuple[str, Counter]:
        counts = Counter({kind: 1})
        if seconds_key and element.get(seconds_key):
            counts[f"{kind}_seconds"] = float(element[seconds_key])
        return element.get("source_uri", ""), counts

    return tally


def reject_counts(reject: dict[str, Any]) -> Counter:
    """What one reject adds to its source's tally."""
    level = "rejected_file" if reject.get("segment_start") is None else "rejected_segment"
    return Counter({level: 1, f"rejected_at_{reject['stage']}": 1, f"reason:{reject['stage']}/{reject['reason']}": 1})


def _reject_tally(reject: dict[str, Any]) -> tuple[str, Counter]:
    return reject.get("source_uri", ""), reject_counts(reject)


def _merge_counters(counters) -> Counter:
    total = Counter()
    for c in counters:
        total.update(c)
    return total


def _write_json(obj: Any, path: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return path


def _write_pickle(obj: Any, path: str) -> str:
    import pickle

    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write(pickle.dumps(obj))
    return path


def build_graph(
    pipeline: beam.Pipeline,
    sources,
    source_rejects: list[dict[str, Any]],
    profile: Profile,
    *,
    data_dir: str,
    rejects_prefix: str,
    tallies_path: str,
    accuracy_path: str | None = None,
    progress_dir: str | None = None,
    done_inputs: frozenset[str] | None = None,
    resume: Resume,
    shares_path: str | None = None,
    final: bool = True,
):
    """Add the build to `pipeline`. Returns the PCollection of written-shard descriptions.

    `sources`: the `ReadSources` of `--input` (pipelines/read_sources.py: listed and read in the
    pipeline), or a list of records already in hand (tests, small callers) whose rejects are
    `source_rejects` (ignored with `ReadSources`, which finds its own). `done_inputs`: source_uris
    an earlier run finished, dropped right after listing.

    Rows and rejects are saved in parts as they finish (`resume.parts_dir`, pipelines/parts.py);
    the shards and the rejects output are made from these and the parts of earlier runs, unless
    not `final` (a chunk before the last of a build in chunks): then it returns None.
    `accuracy_path` gets the label-accuracy accumulator (pickled), which chunks merge."""
    if not isinstance(sources, beam.PTransform):
        sources = GivenSources(sources, source_rejects)
    records, source_rejects_pcoll, source_tallies = pipeline | "Sources" >> sources.configured(
        progress_dir=progress_dir, done_inputs=done_inputs)
    current = records | "SpreadFiles" >> beam.Reshuffle()
    # Inputs the source rejected whole (bad manifest rows, duplicates) have a tally each, keyed by
    # their place, which tells each apart even when two share a path.
    tallies = [current | "TallyFiles" >> beam.Map(_tally("file")), source_tallies]
    rejects = []

    specs = stage_specs(profile)
    transcript_dedup_before = _transcript_dedup_place(specs) if profile.dedup.transcripts else None
    for i, spec in enumerate(specs):
        if spec.slot == transcript_dedup_before:
            current = _dedup(current, "transcripts", rejects, tallies)
        if spec.slot == ENCODE_SLOT and accuracy_path:  # labels are final here; encoding drops `_reference`
            (current
             | "LabelAccuracy" >> beam.CombineGlobally(LabelAccuracyAccumulator())
             | "WriteLabelAccuracy" >> beam.Map(_write_pickle, accuracy_path))
        current, stage_rejects, stage_tallies = current | ApplyStage(spec, progress_dir)
        rejects.append(stage_rejects)
        tallies.append(stage_tallies)
        if i == 0:  # the decoder: what each source file held
            tallies.append(current | "TallySourceAudio" >> beam.Map(_tally("decoded", "_source_duration")))
            if profile.dedup.audio:
                current = _dedup(current, "audio", rejects, tallies)
        if spec.splits:
            current = current | f"SpreadAfter[{spec.slot}]" >> beam.Reshuffle()

    rows = current
    tallies.append(rows | "TallyRows" >> beam.Map(_tally("written", "duration")))
    tallies.append(rows | "TallyReplies" >> beam.Map(_tally("reply", "reply_duration")))

    stage_rejects = rejects | "StageRejects" >> beam.Flatten()
    tallies.append(stage_rejects | "TallyRejects" >> beam.Map(_reject_tally))
    all_rejects = (source_rejects_pcoll, stage_rejects) | "AllRejects" >> beam.Flatten()
    (
        tallies
        | "AllTallies" >> beam.Flatten()
        | "PerSource" >> beam.CombinePerKey(_merge_counters)
        | "TallyList" >> beam.combiners.ToList()
        | "WriteTallies" >> beam.Map(lambda items: _write_json({uri: dict(c) for uri, c in items}, tallies_path))
    )
    part_rows = profile.output.part_rows
    new_row_parts = rows | "SaveRows" >> beam.ParDo(WriteParts(resume.parts_dir, ROWS, part_rows))
    new_reject_parts = all_rejects | "SaveRejects" >> beam.ParDo(WriteParts(resume.parts_dir, REJECTS, part_rows))
    if not final:  # one chunk of several: its work is saved; the last chunk makes the output
        return None
    row_parts = (
        (new_row_parts, pipeline | "EarlierRowParts" >> beam.Create(resume.row_parts))
        | "AllRowParts" >> beam.Flatten()
    )
    reject_lines = (
        (new_reject_parts, pipeline | "EarlierRejectParts" >> beam.Create(resume.reject_parts))
        | "AllRejectParts" >> beam.Flatten()
        | "ReadRejects" >> beam.FlatMap(read_rejects)
        | "EachRejectOnce" >> beam.Distinct()  # an input redone after a kill rejects the same pieces again
    )
    # skip_if_empty: no rejects, no file (S3 cannot hold Beam's empty file, apache/beam#21369)
    reject_lines | "WriteRejects" >> beam.io.WriteToText(rejects_prefix, file_name_suffix=".jsonl",
                                                         shard_name_template="-SSSSS-of-NNNNN", skip_if_empty=True)
    # (part, id, source_uri, share, bytes) of every saved row: read once, for the shard plan and the shares
    row_index = row_parts | "IndexParts" >> beam.FlatMap(lambda p: [(p, *entry) for entry in read_row_index(p)])
    if shares_path:
        _write_shares(row_index, reject_lines, shares_path)
    return (row_parts, row_index) | "Shards" >> ShardsFromParts(data_dir, resume.spill_dir, profile.output.rows_per_shard,
                                                                profile.output.max_shard_bytes)


def _source_and_share(reject_line: str) -> tuple[str, str | None]:
    reject = json.loads(reject_line)
    return reject["source_uri"], reject.get("share")


def _write_shares(row_index, reject_lines, path: str) -> None:
    """source_uri -> the share of it that the final rows and rejects stand for (schemas/shares.py)."""
    row_shares = (
        row_index
        | "RowShares" >> beam.MapTuple(lambda part, row_id, uri, share, nbytes: (row_id, (uri, share)))
        | "EachRowOnce" >> beam.CombinePerKey(lambda copies: next(iter(copies)))  # copies of one id are alike
        | "ShareOfRow" >> beam.Values()
    )
    reject_shares = reject_lines | "ShareOfReject" >> beam.Map(_source_and_share)
    (
        (row_shares, reject_shares)
        | "AllShares" >> beam.Flatten()
        | "AsFraction" >> beam.MapTuple(lambda uri, share: (uri, shares.total([share])))
        | "SharePerSource" >> beam.CombinePerKey(sum)
        | "ShareList" >> beam.combiners.ToList()
        | "WriteShares" >> beam.Map(lambda items: _write_json({uri: shares.text(t) for uri, t in items}, path))
    )


def write_list(pcoll, path: str, label: str):
    """Gather a (small) PCollection into one JSON list file."""
    return pcoll | f"{label}List" >> beam.combiners.ToList() | f"{label}Write" >> beam.Map(_write_json, path)
