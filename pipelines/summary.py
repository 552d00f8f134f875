"""The run summary: counts per stage, audio hours, speed, and per-source reconciliation.

Every input (an audio file, or a manifest row) must be accounted for: either it was rejected
whole (one file-level reject, nothing else), or it was cut into segments and every segment was
either written or rejected. `reconciliation.ok` is false, and the mismatching sources are listed,
when that does not hold.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .stage_transform import METRICS_NAMESPACE

PER_SOURCE_LIMIT = 10_000  # beyond this many sources the per-source table goes only to its own file


def reconcile(tallies: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per source with its counts and whether inputs = outputs + rejects holds."""
    rows = []
    for uri in sorted(tallies):
        t = Counter(tallies[uri])
        files = int(t["file"])
        file_rejects = int(t["rejected_file"])
        # Segments the VAD made: those it passed on plus those it dropped as too short. (A
        # file-level VAD reject, no speech at all, made none.)
        segments = int(t["segments"]) + (0 if file_rejects else int(t["rejected_at_vad"]))
        written = int(t["written"])
        segment_rejects = int(t["rejected_segment"])
        if file_rejects:
            status = "rejected"
            ok = file_rejects == files and written == 0 and segment_rejects == 0 and int(t["segments"]) == 0
        else:
            status = "written" if written else "all_segments_rejected"
            ok = files == 1 and segments >= 1 and segments == written + segment_rejects
        rows.append(
            {
                "source_uri": uri,
                "status": status,
                "segments": segments,
                "written": written,
                "rejected_segments": segment_rejects,
                "rejected_file": file_rejects,
                "source_seconds": round(float(t["decoded_seconds"]), 3),
                "ok": ok,
            }
        )
    return rows


def stage_stats(counters: dict[str, int], stage_order: list[str]) -> dict[str, dict[str, float]]:
    """Per-stage in/out/rejected, busy seconds and x real time, from the Beam counters."""
    stats = {}
    for stage in stage_order:
        seconds = counters.get(f"{stage}.micros", 0) / 1e6
        audio = counters.get(f"{stage}.audio_ms_in", 0) / 1000
        stats[stage] = {
            "in": counters.get(f"{stage}.in", 0),
            "out": counters.get(f"{stage}.out", 0),
            "rejected": counters.get(f"{stage}.rejected", 0),
            "busy_seconds": round(seconds, 3),
            "audio_seconds_in": round(audio, 3),
            # below a millisecond of busy time the ratio says nothing
            "x_real_time": round(audio / seconds, 1) if seconds >= 1e-3 else None,
        }
    return stats


def read_counters(result) -> dict[str, int]:
    """Beam counters of the echat namespace, committed values where the runner has them."""
    from apache_beam.metrics.metric import MetricsFilter

    counters: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
    return counters


def make_summary(
    *,
    tallies: dict[str, dict[str, float]],
    shards: list[dict[str, Any]],
    counters: dict[str, int],
    stage_order: list[str],
    wall_seconds: float,
    context: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    per_source = reconcile(tallies)
    totals = Counter()
    for t in tallies.values():
        totals.update(t)
    by_reason = {k.split(":", 1)[1]: int(v) for k, v in sorted(totals.items()) if k.startswith("reason:")}
    audio_in = float(totals["decoded_seconds"])
    mismatches = [row for row in per_source if not row["ok"]]
    summary = {
        **context,
        "wall_seconds": round(wall_seconds, 2),
        "inputs": {"sources": int(totals["file"]), "decoded": int(totals["decoded"]), "audio_hours": round(audio_in / 3600, 4)},
        "outputs": {
            "rows": int(totals["written"]),
            "shards": len(shards),
            "shard_files": sorted(s["path"] for s in shards),
            "audio_hours": round(float(totals["written_seconds"]) / 3600, 4),
            "reply_audio_hours": round(float(totals["reply_seconds"]) / 3600, 4),
        },
        "rejects": {
            "total": int(totals["rejected_file"] + totals["rejected_segment"]),
            "files": int(totals["rejected_file"]),
            "segments": int(totals["rejected_segment"]),
            "by_stage_reason": by_reason,
        },
        "x_real_time": round(audio_in / wall_seconds, 2) if wall_seconds else None,
        "audio_hours_per_hour": round(audio_in / wall_seconds, 2) if wall_seconds else None,
        "stages": stage_stats(counters, stage_order),
        "reconciliation": {
            "ok": not mismatches,
            "sources_checked": len(per_source),
            "rule": "per source: rejected whole, or segments = written + rejected segments",
            "mismatches": mismatches[:100],
        },
    }
    if len(per_source) <= PER_SOURCE_LIMIT:
        summary["per_source"] = per_source
    return summary, per_source
