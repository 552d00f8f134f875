"""`echat report OUT`: the quality report of a build, OUT/report/index.html with PNG plots beside it.

One static page that opens from disk (no server, no script): audio hours by source, language and
kind (real or synthetic); the duration histogram; every label's distribution and the share of each
label source (manifest, model, heuristic); label accuracy against a reference manifest where one
is given; SNR, pitch and speaking-rate distributions; reply length and diversity (distinct replies,
distinct-1/2 of replies and of both reasoning forms, the most repeated replies, reply language
against query language); rejects by stage and reason; LLM tokens and cost; a table of sample rows
with audio players for the user's turn and the reply (FLAC files under report/audio/).

Nothing on the page names a path of the machine that built the corpus: shards are named relative
to OUT, inputs and rejected sources by their file name.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from . import corpus
from .stats import HEURISTIC, LABELS, MANIFEST, MODEL, UNKNOWN, CorpusStats, collect, label_source

REPORT_DIR = "report"
# Diversity below these marks is flagged on the page (the offline template engine measured 321
# distinct replies of 720 and a reply distinct-2 of 0.055 on a 720-row build).
LOW_DISTINCT_REPLY_SHARE = 0.8
LOW_DISTINCT2 = 0.3
PLOT_DPI = 80


# ---------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    _plt().close(fig)
    return path.name


def _hours_label(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _barh(ax, counts: Counter | dict, title: str, fmt=str, limit: int = 15) -> None:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit][::-1]
    names = [str(k) for k, _ in items]
    values = [v for _, v in items]
    bars = ax.barh(names, values, color="#4c78a8")
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {fmt(value)}", va="center", fontsize=8)
    ax.set_title(title)
    ax.margins(x=0.25)


def plot_hours(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.6))
    for ax, (key, title) in zip(axes, [("source", "by source"), ("language", "by language"), ("kind", "by kind")]):
        _barh(ax, {k: v for k, v in stats.seconds_by[key].items()}, f"audio {title}", fmt=_hours_label)
        ax.set_xticks([])
    return _save(fig, path)


def plot_durations(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    data = [d for d in (stats.durations, stats.reply_durations) if d]
    top = max(max(d) for d in data) if data else 1.0
    bins = [top * i / 30 for i in range(31)]
    ax.hist(stats.durations, bins=bins, alpha=0.75, label=f"user turn ({len(stats.durations)})", color="#4c78a8")
    if stats.reply_durations:
        ax.hist(stats.reply_durations, bins=bins, alpha=0.55, label=f"reply ({len(stats.reply_durations)})", color="#f58518")
    ax.set_xlabel("seconds")
    ax.set_ylabel("rows")
    ax.set_title("duration")
    ax.legend()
    return _save(fig, path)


def plot_labels(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    names = [*LABELS, "reply_emotion"]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.4))
    for ax, name in zip(axes.flat, names):
        _barh(ax, stats.labels.get(name, Counter()), name)
        ax.set_xticks([])
    return _save(fig, path)


SOURCE_COLOURS = {MANIFEST: "#54a24b", MODEL: "#4c78a8", HEURISTIC: "#f58518", UNKNOWN: "#bab0ac"}


def plot_label_sources(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    labels = list(LABELS)[::-1]
    left = [0.0] * len(labels)
    for source, colour in SOURCE_COLOURS.items():
        shares = [stats.label_share(label).get(source, 0.0) for label in labels]
        ax.barh(labels, shares, left=left, color=colour, label=source)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of rows")
    ax.set_title("label source")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return _save(fig, path)


def plot_acoustics(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    panels = [("snr_db", "SNR (dB)"), ("pitch_mean_hz", "mean pitch (Hz)"), ("speaking_rate", "speaking rate (words or chars / s)")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.6))
    for ax, (name, title) in zip(axes, panels):
        values = stats.metrics.get(name) or []
        if values:
            ax.hist(values, bins=20, color="#4c78a8")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}, {len(values)} rows")
    return _save(fig, path)


def plot_replies(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
    if stats.reply_lengths:
        axes[0].hist(stats.reply_lengths, bins=20, color="#4c78a8")
    axes[0].set_title("reply length (words; Chinese: characters)")
    axes[0].set_ylabel("replies")
    bars = {
        "distinct replies": len(stats.replies) / max(1, sum(stats.replies.values())),
        "reply distinct-1": stats.reply_diversity.distinct1 or 0.0,
        "reply distinct-2": stats.reply_diversity.distinct2 or 0.0,
        "think_text distinct-2": stats.reasoning_diversity["think_text"].distinct2 or 0.0,
        "think_tags distinct-2": stats.reasoning_diversity["think_tags"].distinct2 or 0.0,
    }
    _barh(axes[1], bars, "diversity (1.0 = nothing repeated)", fmt=lambda v: f"{v:.3f}")
    axes[1].set_xlim(0, 1.2)
    return _save(fig, path)


def plot_rejects(by_stage_reason: Counter, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, max(1.6, 0.3 * len(by_stage_reason) + 0.8)))
    _barh(ax, {f"{s} / {r}": n for (s, r), n in by_stage_reason.items()}, "rejects by stage / reason", limit=30)
    return _save(fig, path)


def plot_tasks(stats: CorpusStats, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(stats.supported_tasks) + 1.0))
    _barh(ax, stats.supported_tasks, "rows supporting each OSUM task (schemas/tasks.py)", limit=30)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# label accuracy against a reference manifest


def read_reference(path: Path) -> dict[str, dict[str, Any]]:
    """Manifest rows keyed by their audio path made absolute (relative paths: to the manifest)."""
    rows: list[dict[str, Any]] = []
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
    out = {}
    for row in rows:
        audio = row.get("path") or row.get("audio") or row.get("wav")
        if isinstance(audio, str) and audio:
            key = audio if "://" in audio or os.path.isabs(audio) else os.path.normpath(path.parent / audio)
            out[str(key)] = row
    return out


def _reference_key(source_uri: str, reference: dict[str, dict], root: Path) -> str | None:
    if source_uri in reference:
        return source_uri
    candidate = os.path.normpath(root / source_uri)
    return candidate if candidate in reference else None


def label_accuracy(out: Path, reference_path: Path) -> tuple[list[dict[str, Any]], int]:
    """(one row per label field: rows scored, correct, accuracy, labelers; rows matched).

    Only labels that did not come from the manifest are scored (a manifest label is the reference).
    """
    from echat.schemas import labels as label_norm

    reference = read_reference(reference_path)
    fields = [*LABELS, "language"]
    counts = {f: Counter() for f in fields}
    models: dict[str, Counter] = {f: Counter() for f in fields}
    matched = 0
    columns = ["source_uri", *fields, *(f"{f}_model" for f in LABELS), "language_origin"]
    for path in corpus.shard_files(out):
        for row in corpus.iter_rows(path, columns):
            key = _reference_key(str(row.get("source_uri") or ""), reference, reference_path.parent)
            if key is None:
                continue
            matched += 1
            ref = reference[key]
            for f in fields:
                model = row.get(f"{f}_model") if f != "language" else row.get("language_origin")
                value, truth = row.get(f), ref.get(f)
                if value is None or truth in (None, "") or model == MANIFEST:
                    continue
                try:
                    if f == "events":
                        truth = sorted(label_norm.normalise_events(truth if isinstance(truth, list) else json.loads(truth)))
                        value = sorted(value)
                    else:
                        truth = label_norm.normalise(f, truth)
                except (ValueError, TypeError):
                    continue
                counts[f]["scored"] += 1
                counts[f]["correct"] += int(value == truth)
                models[f][model or UNKNOWN] += 1
    table = [
        {"field": f, "scored": c["scored"], "correct": c["correct"], "accuracy": c["correct"] / c["scored"],
         "labelers": ", ".join(f"{m} ({label_source(m) or UNKNOWN})" for m in models[f])}
        for f, c in counts.items() if c["scored"]
    ]
    return table, matched


def default_reference(summary: dict[str, Any] | None) -> Path | None:
    """The build's own input when it was a manifest that is still there (its labels are the reference)."""
    raw = (summary or {}).get("input")
    if raw and "://" not in str(raw) and str(raw).endswith((".jsonl", ".csv")) and Path(raw).is_file():
        return Path(raw)
    return None


# ---------------------------------------------------------------------------------------------
# the page


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1150px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:#f4f4f4} .num{text-align:right} .warn{background:#fff4e5;border-left:4px solid #f58518;padding:6px 10px;margin:6px 0}
.ok{color:#2a7a2a} .bad{color:#b00} .muted{color:#777} img{max-width:100%} audio{width:210px;height:32px}
.kv td:first-child{font-weight:bold}
"""


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td class=num>{escape(str(v))}</td>" if i in numeric else f"<td>{v if isinstance(v, _Raw) else escape(str(v))}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """Markup that goes into a table cell as is."""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _img(name: str, alt: str) -> str:
    return f'<img src="{escape(name)}" alt="{escape(alt)}">'


def diversity_warnings(stats: CorpusStats) -> list[str]:
    warnings = []
    total = sum(stats.replies.values())
    if total:
        share = len(stats.replies) / total
        if share < LOW_DISTINCT_REPLY_SHARE:
            warnings.append(f"Only {len(stats.replies)} distinct replies of {total} ({_pct(share)}): replies repeat.")
    d2 = stats.reply_diversity.distinct2
    if d2 is not None and d2 < LOW_DISTINCT2:
        warnings.append(f"Reply distinct-2 is {d2:.3f} (below {LOW_DISTINCT2}): the replies reuse the same word pairs.")
    llm = stats.provenance.get("llm_model", Counter())
    if any(str(m).startswith("template") for m in llm):
        warnings.append("Replies come from the offline template engine (llm_model template-*): they are drawn from a fixed "
                        "set of phrasings, so expect low diversity; switch reply.backend to an LLM for a real corpus.")
    return warnings


def write_report(out_dir: str | os.PathLike, *, reference: str | os.PathLike | None = None, samples: int = 8) -> Path:
    """Write OUT/report/index.html (and its PNGs and sample audio); returns the page's path."""
    out = Path(out_dir)
    summary = corpus.read_summary(out)
    stats = collect(out, samples=samples)
    report = out / REPORT_DIR
    (report / "audio").mkdir(parents=True, exist_ok=True)
    plots = {
        "hours": plot_hours(stats, report / "hours.png"),
        "durations": plot_durations(stats, report / "durations.png"),
        "labels": plot_labels(stats, report / "labels.png"),
        "sources": plot_label_sources(stats, report / "label_sources.png"),
        "acoustics": plot_acoustics(stats, report / "acoustics.png"),
        "replies": plot_replies(stats, report / "replies.png"),
        "tasks": plot_tasks(stats, report / "tasks.png"),
    }
    rejects = Counter()
    reject_examples: dict[tuple[str, str], dict] = {}
    for r in corpus.iter_rejects(out):
        key = (str(r.get("stage")), str(r.get("reason")))
        rejects[key] += 1
        reject_examples.setdefault(key, r)
    if rejects:
        plots["rejects"] = plot_rejects(rejects, report / "rejects.png")
    else:
        (report / "rejects.png").unlink(missing_ok=True)
    ref_path = Path(reference) if reference else default_reference(summary)
    accuracy = label_accuracy(out, ref_path) if ref_path and ref_path.is_file() else None
    html = _page(out, summary, stats, plots, rejects, reject_examples, accuracy, ref_path, report)
    page = report / "index.html"
    page.write_text(html, encoding="utf-8")
    return page


def _sample_audio(report: Path, sample: dict[str, Any], column: str, suffix: str) -> str:
    audio = sample.get(column) or {}
    data = audio.get("bytes") if isinstance(audio, dict) else None
    if not data:
        return "<span class=muted>none</span>"
    name = f"audio/{sample['id']}{suffix}.flac"
    (report / name).write_bytes(data)
    return f'<audio controls preload="none" src="{escape(name)}"></audio>'


def _page(out, summary, stats: CorpusStats, plots, rejects: Counter, reject_examples, accuracy, ref_path, report: Path) -> str:
    s = summary or {}
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>echat-forge quality report</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>Quality report</h1>")
    built = s.get("started_at", "")
    parts.append(f"<p class=muted>profile <b>{escape(str(s.get('profile', '?')))}</b>, input {escape(str(corpus.input_name(s) or '?'))}, "
                 f"built {escape(str(built))}, schema {escape(_first(stats.provenance, 'schema_version') or '1.0')}</p>")
    vresult = out / "validation" / "results.json"
    verdict = ""
    if vresult.exists():
        v = json.loads(vresult.read_text(encoding="utf-8"))
        verdict = (f"<span class={'ok' if v.get('success') else 'bad'}>{'passed' if v.get('success') else 'FAILED'}</span> "
                   f"({v.get('expectations')} expectations, {len(v.get('failures', []))} failed)")
    overview = [
        ["rows", f"{stats.rows:,}"], ["shards", f"{stats.shards} ({stats.shard_bytes / 1e6:.1f} MB)"],
        ["user audio", _hours_label(stats.seconds)], ["reply audio", _hours_label(stats.reply_seconds)],
        ["languages", ", ".join(f"{k} {v}" for k, v in stats.languages.most_common())],
        ["speakers", str(len(stats.speakers))], ["multi-turn rows", str(stats.multi_turn)],
        ["rows with reply speech tokens", str(stats.with_speech_tokens)],
        ["rejects", str(sum(rejects.values()))],
    ]
    if verdict:
        overview.append(["validation", _Raw(verdict)])
    parts.append("<table class=kv>" + "".join(f"<tr><td>{escape(k)}</td><td>{v if isinstance(v, _Raw) else escape(v)}</td></tr>"
                                              for k, v in overview) + "</table>")
    for w in diversity_warnings(stats):
        parts.append(f"<div class=warn>{escape(w)}</div>")

    parts.append("<h2>Audio</h2>")
    kind_note = "" if stats.has_source_kind else " (the shards have no <code>source_kind</code> column: all counted as real speech)"
    parts.append(f"<p>Hours of user audio by source, language and kind{kind_note}.</p>" + _img(plots["hours"], "audio hours"))
    parts.append(_img(plots["durations"], "duration histogram"))

    parts.append("<h2>Labels</h2>" + _img(plots["labels"], "label distributions"))
    parts.append("<p>Where each row's label came from (<code>*_model</code>: the manifest, a model, or a heuristic; unknown: no label).</p>")
    parts.append(_img(plots["sources"], "label sources"))
    rows = []
    for label in LABELS:
        share = stats.label_share(label)
        rows.append([label, *(_pct(share.get(k, 0.0)) for k in (MANIFEST, MODEL, HEURISTIC, UNKNOWN)),
                     ", ".join(f"{m} ({n})" for m, n in stats.provenance.get(f"{label}_model", Counter()).most_common()
                               if m != UNKNOWN) or "-"])
    parts.append(_table(["label", MANIFEST, MODEL, HEURISTIC, "unknown", "producers (rows)"], rows, {1, 2, 3, 4}))
    parts.append("<h3>Label accuracy</h3>")
    parts.append(_accuracy_html(accuracy, ref_path))

    parts.append("<h2>Acoustics</h2>" + _img(plots["acoustics"], "acoustic metrics"))

    parts.append("<h2>Replies</h2>" + _img(plots["replies"], "reply length and diversity"))
    total = sum(stats.replies.values())
    div = [
        ["replies", total, "", ""],
        ["distinct replies", len(stats.replies), _pct(len(stats.replies) / total) if total else "n/a", ""],
        ["replies", "", _f3(stats.reply_diversity.distinct1), _f3(stats.reply_diversity.distinct2)],
        ["reasoning, natural language (think_text)", "", _f3(stats.reasoning_diversity["think_text"].distinct1),
         _f3(stats.reasoning_diversity["think_text"].distinct2)],
        ["reasoning, tag form (think_tags)", "", _f3(stats.reasoning_diversity["think_tags"].distinct1),
         _f3(stats.reasoning_diversity["think_tags"].distinct2)],
    ]
    parts.append(_table(["", "count", "distinct-1 / share", "distinct-2"], div, {1, 2, 3}))
    repeated = [[n, text] for text, n in stats.replies.most_common(10) if n > 1]
    parts.append("<h3>Most repeated replies</h3>" + (_table(["rows", "reply"], repeated, {0}) if repeated
                                                      else "<p>No reply occurs twice.</p>"))
    pairs = [[q, r, n, "" if q == r else _Raw("<span class=bad>differs</span>")] for (q, r), n in stats.language_pairs.most_common()]
    parts.append("<h3>Reply language against query language</h3>" + _table(["query (row language)", "reply (detected)", "rows", ""], pairs, {2}))

    parts.append("<h2>Tasks</h2>" + _img(plots["tasks"], "tasks supported"))
    parts.append(_table(["row task tag", "rows"], [[t, n] for t, n in stats.tasks.most_common()], {1}))

    parts.append("<h2>Models and prompts</h2>")
    prov = [[name, ", ".join(f"{v} ({n})" for v, n in c.most_common())] for name, c in stats.provenance.items()]
    parts.append(_table(["field", "values (rows)"], prov))
    parts.append("<h3>LLM tokens and cost</h3>" + _usage_html(s))

    parts.append("<h2>Rejects</h2>")
    if rejects:
        parts.append(_img(plots["rejects"], "rejects by stage and reason"))
        rows = [[stage, reason, n, Path(str(reject_examples[(stage, reason)].get("source_uri") or "")).name,
                 scrub_paths(str(reject_examples[(stage, reason)].get("detail") or ""))[:160]] for (stage, reason), n in rejects.most_common()]
        parts.append(_table(["stage", "reason", "count", "e.g. source", "detail"], rows, {2}))
    else:
        parts.append("<p>No rejects: every input became rows.</p>")

    parts.append("<h2>Sample rows</h2>")
    rows = []
    for sample in stats.samples:
        rows.append([
            sample["id"], sample.get("language") or "", f"{sample.get('emotion') or '?'} / {sample.get('reply_emotion') or '?'}",
            sample.get("transcript") or "", _Raw(_sample_audio(report, sample, "audio", "")),
            sample.get("reply_text") or "", _Raw(_sample_audio(report, sample, "reply_audio", "-reply")),
        ])
    parts.append(_table(["id", "lang", "emotion / reply", "user said", "user audio", "reply", "reply audio"], rows))
    parts.append("<p class=muted>Made by <code>echat report</code> (echat-forge).</p></body></html>")
    return "\n".join(parts)


_ABSOLUTE_PATH = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"()]+|(?<![\w.])/(?:[^\s/'"():,;]+/)+[^\s/'"():,;]*""")


def scrub_paths(text: str) -> str:
    """`text` with every absolute path or URI cut down to its last component (a reject's detail
    often quotes the file it could not read)."""
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name or m.group(0), text)


def _first(provenance: dict[str, Counter], name: str) -> str | None:
    c = provenance.get(name)
    return str(c.most_common(1)[0][0]) if c else None


def _accuracy_html(accuracy, ref_path: Path | None) -> str:
    if accuracy is None:
        return ("<p>Not available: no reference was given (<code>echat report OUT --reference manifest.jsonl</code>, "
                "a manifest whose labels are the truth) and the build's input is not a manifest on this machine.</p>")
    table, matched = accuracy
    name = escape(ref_path.name if ref_path else "?")
    if not table:
        return (f"<p>Not available: {matched} rows matched the reference <code>{name}</code>, but none holds a label that "
                "a model or heuristic produced where the reference has one (every such label came from the manifest itself: "
                "build with <code>--set trust_manifest=false</code> to score the labelers against it).</p>")
    rows = [[r["field"], r["scored"], r["correct"], _pct(r["accuracy"]), r["labelers"]] for r in table]
    return f"<p>Against <code>{name}</code> ({matched} rows matched).</p>" + _table(["label", "rows scored", "correct", "accuracy", "labelers"], rows, {1, 2, 3})


def _usage_html(summary: dict[str, Any]) -> str:
    rows = []
    for slot, st in (summary.get("stages") or {}).items():
        usage = st.get("usage") if isinstance(st, dict) else None
        if not usage:
            continue
        cost = usage.get("cost_micro_usd")
        rows.append([slot, usage.get("requests", 0), usage.get("cache_hits", 0), usage.get("prompt_tokens", 0),
                     usage.get("completion_tokens", 0), f"${cost / 1e6:.4f}" if cost is not None else "n/a",
                     ", ".join(f"{k} {v}" for k, v in usage.items() if k not in
                               ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_micro_usd"))])
    if not rows:
        return "<p>No LLM calls in this build (no stage reported usage; the offline template engine makes none).</p>"
    return _table(["stage", "requests", "cache hits", "prompt tokens", "completion tokens", "est. cost", "other"], rows, {1, 2, 3, 4, 5})


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="a build folder (the --output of `echat build`)")
    parser.add_argument("--reference", help="a manifest (.jsonl/.csv) whose labels are the truth, for the label accuracy table "
                                            "(default: the build's input, when it is a manifest on this machine)")
    parser.add_argument("--samples", type=int, default=8, help="sample rows with audio players (default 8)")


def run(args: argparse.Namespace) -> int:
    try:
        page = write_report(args.out, reference=args.reference, samples=args.samples)
    except corpus.CorpusError as exc:
        print(f"echat report: {exc}", file=sys.stderr)
        return 2
    print(f"echat report: {page}")
    return 0
