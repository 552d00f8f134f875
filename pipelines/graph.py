"""The build graph: source records -> stages of the profile -> shards, rejects and tallies.

```
records -> Reshuffle -> decode -> vad -> asr -> labelers... -> metrics -> filter
        -> reply -> tts -> (speech tokens) -> encode -> WriteShards      -> OUT/data/
every stage's rejects (and the source's) ------------------------> OUT/rejects/
per-source tallies (files, segments, rows, rejects, seconds) ----> OUT/_work/tallies.json
```
The Reshuffle right after the source spreads files over workers while records are still light;
from there the stages fuse, so waveforms pass between them in memory and are never serialised.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import apache_beam as beam

from echat.labelers.filters import QualityFilter

from .profile import Profile
from .rows import EncodeRow
from .shards import WriteShards
from .stage_transform import ApplyStage, StageSpec

# Stages whose models gain from batching: BatchElements feeds them lists of records.
BATCHED_STAGES = frozenset({"asr", "gender", "age", "emotion", "events", "style", "reply", "tts", "speech_tokens"})


def stage_specs(profile: Profile) -> list[StageSpec]:
    """The profile's stages in build order, the quality filter right after the labelers.

    The filter runs before anything is spent on replies and speech, and runs whether or not
    the profile has a reply stage at all.
    """
    chosen = [StageSpec(stage, choice.backend, _with_cache_dir(stage, choice, profile.cache_dir))
              for stage, choice in profile.stage_choices()]
    labelers = [s for s in chosen if s.stage not in Profile.SYNTH_ORDER]
    synth = [s for s in chosen if s.stage in Profile.SYNTH_ORDER]
    quality_filter = StageSpec("filter", None, profile.filters.model_dump(), factory=QualityFilter)
    return [*labelers, quality_filter, *synth, StageSpec("encode", None, {}, factory=EncodeRow)]


def _with_cache_dir(stage: str, choice, cache_dir: str) -> dict[str, Any]:
    """The profile's cache folder goes to every backend that takes one (slow or paid calls)."""
    import inspect
    import os

    from .backends import backend_path, load_class

    params = dict(choice.params)
    accepts = inspect.signature(load_class(backend_path(stage, choice.backend))).parameters
    if "cache_dir" in accepts and "cache_dir" not in params and cache_dir:
        params["cache_dir"] = os.path.expanduser(cache_dir)
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


def build_graph(
    pipeline: beam.Pipeline,
    records: list[dict[str, Any]],
    source_rejects: list[dict[str, Any]],
    profile: Profile,
    *,
    data_dir: str,
    rejects_prefix: str,
    tallies_path: str,
):
    """Add the build to `pipeline`. Returns the PCollection of written-shard descriptions."""
    current = (
        pipeline
        | "Sources" >> beam.Create(records, reshuffle=False)
        | "SpreadFiles" >> beam.Reshuffle()
    )
    tallies = [current | "TallyFiles" >> beam.Map(_tally("file"))]
    # Inputs rejected by the source (bad manifest rows, duplicates) are tallied by the driver,
    # which knows each one apart even when two share a path; here they are only written out.
    source_rejects_pcoll = pipeline | "SourceRejects" >> beam.Create(source_rejects)
    rejects = []

    for spec in stage_specs(profile):
        current, stage_rejects = current | ApplyStage(spec, batched=spec.stage in BATCHED_STAGES)
        rejects.append(stage_rejects)
        if spec.stage == "decode":
            tallies.append(current | "TallySourceAudio" >> beam.Map(_tally("decoded", "_source_duration")))
        elif spec.stage == "vad":
            tallies.append(current | "TallySegments" >> beam.Map(_tally("segments")))

    rows = current
    tallies.append(rows | "TallyRows" >> beam.Map(_tally("written", "duration")))
    tallies.append(rows | "TallyReplies" >> beam.Map(_tally("reply", "reply_duration")))

    stage_rejects = rejects | "StageRejects" >> beam.Flatten()
    tallies.append(stage_rejects | "TallyRejects" >> beam.Map(_reject_tally))
    all_rejects = (source_rejects_pcoll, stage_rejects) | "AllRejects" >> beam.Flatten()
    (
        all_rejects
        | "RejectsJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True))
        | "WriteRejects" >> beam.io.WriteToText(rejects_prefix, file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN")
    )
    (
        tallies
        | "AllTallies" >> beam.Flatten()
        | "PerSource" >> beam.CombinePerKey(_merge_counters)
        | "TallyList" >> beam.combiners.ToList()
        | "WriteTallies" >> beam.Map(lambda items: _write_json({uri: dict(c) for uri, c in items}, tallies_path))
    )
    return rows | "Shards" >> WriteShards(data_dir, profile.output.rows_per_shard, profile.output.max_shard_bytes)


def write_list(pcoll, path: str, label: str):
    """Gather a (small) PCollection into one JSON list file."""
    return pcoll | f"{label}List" >> beam.combiners.ToList() | f"{label}Write" >> beam.Map(_write_json, path)
