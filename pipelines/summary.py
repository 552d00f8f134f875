"""The run summary: counts per stage, audio hours, speed, and per-source reconciliation.

Every input (an audio file, or a manifest row) must be accounted for, whatever the stages split or
drop. Each stage reports, per source, the records it took in, how many of them produced outputs,
the outputs, and the rejects (of inputs, and of pieces it cut off). Lineage then has to hold:
  - the first stage took in the source's one input;
  - at every stage, inputs = inputs that produced something + inputs rejected;
  - each stage took in exactly what the stage before it put out, and the rows written are what the
    last stage put out;
  - every reject a stage counted reached the rejects output.
A source rejected by the source reader itself has no stage counts and one file-level reject.
Then, whatever the run: the final rows and rejects of each source must stand for all of it (their
shares, schemas/shares.py, add up to at least 1); a resumed build checks the sources that earlier
runs finished this way alone.
`reconciliation.ok` is false, and the mismatching sources are listed with the broken rule, when
any of that does not hold.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

from .shards import WRITE_SLOT
from .stage_transform import METRICS_NAMESPACE

PER_SOURCE_LIMIT = 10_000  # beyond this many sources the per-source table goes only to its own file
RULE = ("per source: the first stage took in its input; at each stage inputs = inputs that produced "
        "something + inputs rejected, and inputs = the previous stage's outputs; rows written = the "
        "last stage's outputs; every counted reject was written")


def lineage_problem(t: Counter, stage_order: list[str]) -> str | None:
    """The first lineage rule a source's tally breaks, as text; None when it reconciles."""
    files = int(t["file"])
    if files != 1:
        return f"{files} inputs under one source key"
    if not any(t[f"in:{slot}"] for slot in stage_order):  # rejected by the source reader
        if int(t["rejected_file"]) == 1 and int(t["written"]) == 0 and int(t["rejected_segment"]) == 0:
            return None
        return "never reached a stage, yet is not one file-level reject"
    expected, previous = 1, "the source"
    counted_rejects = 0
    for slot in stage_order:
        taken = int(t[f"in:{slot}"])
        if taken != expected:
            return f"{slot} took in {taken} record(s) but {previous} put out {expected}"
        produced, rejected = int(t[f"parents:{slot}"]), int(t[f"rejected:{slot}"])
        if taken != produced + rejected:
            return f"{slot}: {taken} in, but {produced} produced output and {rejected} were rejected"
        counted_rejects += rejected + int(t[f"pieces_rejected:{slot}"])
        expected, previous = int(t[f"out:{slot}"]), slot
    if int(t["written"]) != expected:
        return f"{int(t['written'])} row(s) written but {previous} put out {expected}"
    written_rejects = int(t["rejected_file"] + t["rejected_segment"])
    if written_rejects != counted_rejects:
        return f"stages counted {counted_rejects} reject(s) but {written_rejects} reached the rejects output"
    return None


def share_problem(share: str | None) -> str | None:
    """Whether the final rows and rejects of a source stand for all of it (schemas/shares.py)."""
    if share is None:
        return "no row or reject of it reached the output"
    if Fraction(share) < 1:
        return f"its rows and rejects stand for only {share} of it"
    return None


def reconcile(tallies: dict[str, dict[str, float]], stage_order: list[str],
              shares: dict[str, str] | None = None, earlier: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per source with its counts and whether its lineage holds (`lineage_problem`) and,
    given the final `shares`, whether its rows and rejects stand for all of it. `earlier`: the
    sources finished by the runs a resumed build continues, checked by their shares alone."""
    rows = []
    for uri, done in sorted((earlier or {}).items()):
        problem = share_problem((shares or {}).get(uri, done["share"]))
        row = {"source_uri": uri, "status": "written" if done["rows"] else "rejected", "earlier_run": True,
               "segments": done["rows"] + done["rejects"], "written": done["rows"], "ok": problem is None}
        if problem:
            row["problem"] = problem
        rows.append(row)
    for uri in sorted(tallies):
        t = Counter(tallies[uri])
        written, segment_rejects, file_rejects = int(t["written"]), int(t["rejected_segment"]), int(t["rejected_file"])
        problem = lineage_problem(t, stage_order)
        # A source reject's tally is keyed apart from its uri and reached no stage: lineage checked it whole.
        if problem is None and shares is not None and any(t[f"in:{slot}"] for slot in stage_order):
            problem = share_problem(shares.get(uri))
        if written:
            status = "written"
        elif file_rejects and not segment_rejects:
            status = "rejected"
        else:
            status = "all_segments_rejected"
        row = {
            "source_uri": uri,
            "status": status,
            "segments": written + segment_rejects,
            "written": written,
            "rejected_segments": segment_rejects,
            "rejected_file": file_rejects,
            "source_seconds": round(float(t["decoded_seconds"]), 3),
            "ok": problem is None,
        }
        if problem:
            row["problem"] = problem
        rows.append(row)
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
            "skipped": counters.get(f"{stage}.skipped", 0),
            "retried": counters.get(f"{stage}.retried", 0),
            "busy_seconds": round(seconds, 3),
            # loading models and other per-worker set-up, once per worker process
            "setup_seconds": round(counters.get(f"{stage}.setup_micros", 0) / 1e6, 3),
            "audio_seconds_in": round(audio, 3),
            # below a millisecond of busy time the ratio says nothing
            "x_real_time": round(audio / seconds, 1) if seconds >= 1e-3 else None,
        }
        prefix = f"{stage}.usage."
        usage = {k[len(prefix):]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}
        if usage:
            stats[stage]["usage"] = usage
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
    shares: dict[str, str] | None = None,
    earlier: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`earlier`: for a resumed build, the sources finished before (pipelines/resume.py); the
    stage counts and speed are this run's, the rows, rejects and reconciliation the whole output's."""
    earlier = earlier or {}
    per_source = reconcile(tallies, stage_order, shares, earlier)
    totals = Counter()
    for t in tallies.values():
        totals.update(t)
    earlier_rows = sum(d["rows"] for d in earlier.values())
    earlier_rejects = sum(d["rejects"] for d in earlier.values())
    by_reason = {k.split(":", 1)[1]: int(v) for k, v in sorted(totals.items()) if k.startswith("reason:")}
    audio_in = float(totals["decoded_seconds"])
    mismatches = [row for row in per_source if not row["ok"]]
    summary = {
        **context,
        "wall_seconds": round(wall_seconds, 2),
        "inputs": {"sources": int(totals["file"]), "decoded": int(totals["decoded"]), "audio_hours": round(audio_in / 3600, 4)},
        "outputs": {
            "rows": int(totals["written"]) + earlier_rows,
            "shards": len(shards),
            "shard_files": sorted(s["path"] for s in shards),
            "audio_hours": round(float(totals["written_seconds"]) / 3600, 4),
            "reply_audio_hours": round(float(totals["reply_seconds"]) / 3600, 4),
        },
        "rejects": {
            "total": int(totals["rejected_file"] + totals["rejected_segment"]) + earlier_rejects,
            "files": int(totals["rejected_file"]),
            "segments": int(totals["rejected_segment"]),
            "by_stage_reason": by_reason,
        },
        "x_real_time": round(audio_in / wall_seconds, 2) if wall_seconds else None,
        "audio_hours_per_hour": round(audio_in / wall_seconds, 2) if wall_seconds else None,
        # the stages in build order, then the shard writer (its "in" is rows, its "out" shards)
        "stages": stage_stats(counters, [*stage_order, WRITE_SLOT]),
        "reconciliation": {
            "ok": not mismatches,
            "sources_checked": len(per_source),
            "rule": RULE,
            "mismatches": mismatches[:100],
        },
    }
    if earlier:
        summary["resumed"] = {"sources_finished_before": len(earlier), "rows_from_before": earlier_rows,
                              "rejects_from_before": earlier_rejects}
    if len(per_source) <= PER_SOURCE_LIMIT:
        summary["per_source"] = per_source
    return summary, per_source
