"""Corpus statistics in one streaming pass over the shards: what the report plots and the card states.

Audio bytes are not read except for the few sample rows the report plays; everything else is
counters, a few float arrays (one value per row) and the n-gram sets behind distinct-n.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echat.schemas import record as rec
from echat.schemas import tasks as task_table
from echat.schemas.text import CJK_OR_WORD, count_cjk

from . import corpus

LABELS = ("gender", "age", "emotion", "events", "style")  # user-turn labels, each with *_score and *_model
UNKNOWN = "(unknown)"
NONE_HEARD = "(none heard)"
REAL, SYNTHETIC = "real", "synthetic"
MANIFEST, MODEL, HEURISTIC = "manifest", "model", "heuristic"
# `*_model` names of the offline rule-based labelers (labelers/gender.py, labelers/emotion.py) and
# any name that says it is a heuristic; everything else that is not the manifest is a model.
HEURISTIC_NAMES = re.compile(r"heuristic|threshold|rule|template", re.IGNORECASE)
METRICS = ("snr_db", "pitch_mean_hz", "speaking_rate", "speech_ratio", "loudness_dbfs")
PROVENANCE_FIELDS = ("transcript_origin", "language_origin", *(f"{label}_model" for label in LABELS),
                     "llm_model", "tts_model", "speech_tokenizer_model", "prompt_version", "schema_version", "pipeline_version")
TEXT_COLUMNS = [f.name for f in rec.FIELDS if f.kind not in (rec.AUDIO,)]
SAMPLE_ROWS = 8


def label_source(model: str | None) -> str | None:
    """manifest, model or heuristic for a `*_model` value (None: no label)."""
    if not model:
        return None
    if model == MANIFEST:
        return MANIFEST
    return HEURISTIC if HEURISTIC_NAMES.search(model) else MODEL


def tokens(text: str | None) -> list[str]:
    """Words (lower case, punctuation dropped) and single Chinese characters."""
    out = []
    for tok in CJK_OR_WORD.findall((text or "").lower()):
        tok = tok.strip(".,!?;:\"'()[]{}，。！？；：、“”‘’…-—~～")
        if tok:
            out.append(tok)
    return out


def text_language(text: str | None) -> str:
    """zh when at least a third of the tokens are Chinese characters, else en."""
    toks = tokens(text)
    if not toks:
        return UNKNOWN
    return "zh" if count_cjk(text) * 3 >= len(toks) else "en"


@dataclass
class Distinct:
    """distinct-1 and distinct-2 over a set of texts: distinct n-grams / all n-grams."""

    uni: set = field(default_factory=set)
    bi: set = field(default_factory=set)
    n_uni: int = 0
    n_bi: int = 0
    texts: int = 0

    def add(self, text: str | None) -> None:
        toks = tokens(text)
        if not toks:
            return
        self.texts += 1
        self.uni.update(toks)
        self.n_uni += len(toks)
        pairs = list(zip(toks, toks[1:]))
        self.bi.update(pairs)
        self.n_bi += len(pairs)

    @property
    def distinct1(self) -> float | None:
        return len(self.uni) / self.n_uni if self.n_uni else None

    @property
    def distinct2(self) -> float | None:
        return len(self.bi) / self.n_bi if self.n_bi else None


@dataclass
class CorpusStats:
    rows: int = 0
    shards: int = 0
    shard_bytes: int = 0
    seconds: float = 0.0
    reply_seconds: float = 0.0
    seconds_by: dict[str, Counter] = field(default_factory=lambda: {"source": Counter(), "language": Counter(), "kind": Counter()})
    durations: list[float] = field(default_factory=list)
    reply_durations: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    labels: dict[str, Counter] = field(default_factory=dict)  # field -> value counts (events: per event)
    label_sources: dict[str, Counter] = field(default_factory=dict)  # field -> manifest/model/heuristic/unknown
    provenance: dict[str, Counter] = field(default_factory=dict)  # *_model / *_origin / llm... -> value counts
    replies: Counter = field(default_factory=Counter)
    reply_lengths: list[int] = field(default_factory=list)  # tokens per reply
    reply_diversity: Distinct = field(default_factory=Distinct)
    reasoning_diversity: dict[str, Distinct] = field(default_factory=lambda: {"think_text": Distinct(), "think_tags": Distinct()})
    language_pairs: Counter = field(default_factory=Counter)  # (query language, reply language)
    tasks: Counter = field(default_factory=Counter)  # the row's own task tag
    supported_tasks: Counter = field(default_factory=Counter)  # every tag a row supports (schemas/tasks.py)
    licenses: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    speakers: set = field(default_factory=set)
    multi_turn: int = 0
    with_speech_tokens: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few rows, audio bytes included
    has_source_kind: bool = False

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def label_share(self, label: str) -> dict[str, float]:
        counts = self.label_sources.get(label, Counter())
        total = sum(counts.values())
        return {k: v / total for k, v in counts.most_common()} if total else {}


def collect(out: str | Path, *, samples: int = SAMPLE_ROWS) -> CorpusStats:
    """Statistics of the build in `out`, reading the shards batch by batch."""
    files = corpus.shard_files(out)
    stats = CorpusStats(shards=len(files))
    for path in files:
        stats.shard_bytes += path.stat().st_size
        names = set(corpus.columns_of(path))
        stats.has_source_kind = stats.has_source_kind or "source_kind" in names
        wanted = [c for c in TEXT_COLUMNS if c in names] + (["source_kind"] if "source_kind" in names else [])
        for row in corpus.iter_rows(path, wanted):
            _add_row(stats, row)
            if len(stats.samples) < samples and _wanted_sample(stats, row):
                stats.samples.append({"_path": path, "_row": stats.rows - 1, **row})
    _load_sample_audio(stats)
    return stats


def _wanted_sample(stats: CorpusStats, row: dict[str, Any]) -> bool:
    """Spread the samples over languages and emotions: a row whose (language, emotion) is new."""
    key = (row.get("language"), row.get("emotion"))
    seen = {(s.get("language"), s.get("emotion")) for s in stats.samples}
    return key not in seen or len(seen) >= 12


def _load_sample_audio(stats: CorpusStats) -> None:
    """Read the audio of the sample rows (only those rows' bytes)."""
    by_path: dict[Path, list[dict]] = {}
    for sample in stats.samples:
        by_path.setdefault(sample["_path"], []).append(sample)
    for path, samples in by_path.items():
        wanted = {s["id"]: s for s in samples}
        for batch in corpus.iter_batches(path, ["id", "audio", "reply_audio"]):
            ids = batch.column("id").to_pylist()
            if not wanted.keys() & set(ids):
                continue
            for row in batch.to_pylist():
                sample = wanted.pop(row["id"], None)
                if sample is not None:
                    sample["audio"] = row.get("audio")
                    sample["reply_audio"] = row.get("reply_audio")
            if not wanted:
                break


def _add_row(s: CorpusStats, row: dict[str, Any]) -> None:
    s.rows += 1
    duration = float(row.get("duration") or 0.0)
    s.seconds += duration
    s.durations.append(duration)
    if row.get("reply_duration") is not None:
        s.reply_seconds += float(row["reply_duration"])
        s.reply_durations.append(float(row["reply_duration"]))
    language = row.get("language") or UNKNOWN
    s.languages[language] += 1
    kind = row.get("source_kind") or REAL  # a corpus from before `source_kind` holds real speech only
    s.seconds_by["source"][row.get("source_dataset") or UNKNOWN] += duration
    s.seconds_by["language"][language] += duration
    s.seconds_by["kind"][kind] += duration
    for m in METRICS:
        if row.get(m) is not None:
            s.metrics[m].append(float(row[m]))
    for label in LABELS + ("reply_emotion",):
        value = row.get(label)
        counts = s.labels.setdefault(label, Counter())
        if label == "events":
            if value is None:
                counts[UNKNOWN] += 1
            elif not value:
                counts[NONE_HEARD] += 1
            else:
                counts.update(value)
        else:
            counts[value if value is not None else UNKNOWN] += 1
        if label in LABELS:
            source = label_source(row.get(f"{label}_model")) if value is not None else None
            s.label_sources.setdefault(label, Counter())[source or UNKNOWN] += 1
    for name in PROVENANCE_FIELDS:
        if name in row:
            s.provenance.setdefault(name, Counter())[row.get(name) or UNKNOWN] += 1
    reply = row.get("reply_text")
    if reply and reply.strip():
        s.replies[reply.strip()] += 1
        s.reply_lengths.append(len(tokens(reply)))
        s.reply_diversity.add(reply)
        s.language_pairs[(language, text_language(reply))] += 1
    for form, distinct in s.reasoning_diversity.items():
        distinct.add(row.get(form))
    s.tasks[row.get("task") or UNKNOWN] += 1
    # audio bytes are not read here: a row has its audio (required), and its reply audio when it has
    # a reply duration (rows.EncodeRow writes the two together)
    present = {"audio": {"bytes": b"x"}, "reply_audio": {"bytes": b"x"} if row.get("reply_duration") is not None else None}
    s.supported_tasks.update(task_table.tasks_a_record_supports({**row, **present}))
    s.licenses[row.get("license") or UNKNOWN] += 1
    if row.get("speaker"):
        s.speakers.add(row["speaker"])
    if row.get("history"):
        s.multi_turn += 1
    if row.get("reply_speech_tokens"):
        s.with_speech_tokens += 1

