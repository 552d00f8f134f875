"""Where training records come from: parquet shards and OSUM raw lists, cut into read units.

A *unit* is the smallest piece a data-loader worker reads: one row group of a parquet shard (the
pipeline writes 64 rows per group) or one chunk of lines of an OSUM raw list. Units are what is
dealt out to ranks and workers, so two workers never read the same rows. When there are fewer
units than workers, each unit is cut into equal parts (a part re-reads its row group and keeps its
slice of the rows).

Records come out as dicts with the fields of schemas/record.py plus the working keys `_audio` (an
`AudioRef`, undecoded) and `_num_samples` (length at 16 kHz, read from the audio header). A record
whose audio cannot be read, is too short for a mel frame, or is longer than the speech encoder
takes (`max_frames`: Whisper's 30 s) keeps its text fields (text-only tasks still use it) with
`_audio` None and `_audio_issue` saying why; the reason is logged with its id.

OSUM raw lists (one JSON object per line: key, wav, txt, task, lang, extra{dataset, age, gender,
think_str, question, speech_token, a_wav_path}, optional start/end) map onto the same fields:
for dialogue tasks `txt` is the reply and `extra.question` the user's transcript; for understanding
tasks `txt` is the transcript with the label tags after it (`text<SAD>`), the tags alone, or the
timestamped transcript of `<TRANSCRIBE> <ALIGN>`.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from echat.model.features import FRAMES_PER_SECOND, MIN_SAMPLES, SAMPLE_RATE, AudioRef, audio_num_samples, num_frames
from echat.schemas import labels, vocab

log = logging.getLogger(__name__)

PARQUET, OSUM_RAW = "parquet", "osum_raw"
RAW_SUFFIXES = (".jsonl", ".list", ".json")
RAW_CHUNK_LINES = 256  # lines of an OSUM raw list per read unit

# Record fields the sample builder reads (only these columns are read from a shard).
COLUMNS = (
    "id", "audio", "language", "transcript", "words",
    "gender", "gender_score", "age", "age_score", "emotion", "emotion_score",
    "events", "events_score", "style", "style_score",
    "think_tags", "think_text", "reply_text", "reply_speech_tokens", "history",
)


# Why a record's audio was set aside (its `_audio_issue`): counted by these reasons.
AUDIO_UNREADABLE = "audio unreadable"
AUDIO_TOO_SHORT = "audio too short for a mel frame"
AUDIO_TOO_LONG = "audio longer than the speech encoder takes"


class DataSourceError(ValueError):
    pass


@dataclass(frozen=True)
class Unit:
    path: str
    kind: str  # PARQUET or OSUM_RAW
    index: int  # row group (parquet) or chunk of RAW_CHUNK_LINES lines (raw list)
    part: int = 0
    parts: int = 1


def resolve_files(files: list[str] | str) -> list[tuple[str, str]]:
    """(path, kind) for each input: parquet files, folders (all *.parquet under them), globs, raw lists.

    Raises DataSourceError naming an input that does not exist, matches nothing or has an unknown kind.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [str(files)]
    out: list[tuple[str, str]] = []
    for item in files:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*.parquet") if not p.name.startswith("."))
            if not found:
                raise DataSourceError(f"no *.parquet shards under folder {item}")
            out.extend((p, PARQUET) for p in found)
            continue
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise DataSourceError(f"{item!r} matches no file")
        for path in matches:
            if os.path.isdir(path):
                out.extend(resolve_files([path]))
            elif not os.path.exists(path):
                raise DataSourceError(f"no such file: {path}")
            elif path.endswith(".parquet"):
                out.append((path, PARQUET))
            elif path.endswith(RAW_SUFFIXES):
                out.append((path, OSUM_RAW))
            else:
                raise DataSourceError(f"{path}: not a parquet shard (.parquet) or an OSUM raw list ({', '.join(RAW_SUFFIXES)})")
    seen: set[str] = set()
    unique = []
    for path, kind in out:
        if path not in seen:
            seen.add(path)
            unique.append((path, kind))
    return unique


def plan_units(files: list[tuple[str, str]], min_units: int = 1) -> list[Unit]:
    """Every read unit of the inputs, in file order; cut into parts when fewer than `min_units`."""
    import pyarrow.parquet as pq

    units: list[Unit] = []
    for path, kind in files:
        if kind == PARQUET:
            try:
                groups = pq.ParquetFile(path).metadata.num_row_groups
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataSourceError(f"{path}: cannot read parquet metadata ({err})") from err
            units.extend(Unit(path, kind, g) for g in range(groups))
        else:
            with open(path, encoding="utf-8") as fh:
                lines = sum(1 for _ in fh)
            units.extend(Unit(path, kind, c) for c in range(math.ceil(lines / RAW_CHUNK_LINES)))
    if units and len(units) < min_units:
        parts = math.ceil(min_units / len(units))
        units = [Unit(u.path, u.kind, u.index, p, parts) for u in units for p in range(parts)]
    return units


def read_unit(unit: Unit, max_frames: int | None = None) -> Iterator[dict[str, Any]]:
    """The records of one unit, with `_audio` and `_num_samples` set.

    max_frames: the most mel frames (100 per second) the speech encoder takes; longer audio is set
    aside like unreadable audio (`_audio` None, `_audio_issue` AUDIO_TOO_LONG, a warning naming it).
    """
    rows = _parquet_rows(unit) if unit.kind == PARQUET else _raw_rows(unit)
    for row in rows:
        yield _with_audio_length(row, max_frames)


def _part(items: list, unit: Unit) -> list:
    n = len(items)
    return items[unit.part * n // unit.parts : (unit.part + 1) * n // unit.parts]


def _parquet_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("id", "audio") if c not in names]
    if missing:
        raise DataSourceError(f"{unit.path}: shard lacks column(s) {', '.join(missing)}")
    table = pf.read_row_group(unit.index, columns=[c for c in COLUMNS if c in names])
    base = os.path.dirname(unit.path)
    for row in _part(table.to_pylist(), unit):
        audio = row.pop("audio", None) or {}
        row["_audio"] = _audio_ref(audio.get("bytes"), audio.get("path"), base)
        yield row


def _audio_ref(data: bytes | None, path: str | None, base: str) -> AudioRef | None:
    if data:
        return AudioRef(data=data)
    if path:
        if not os.path.isabs(path) and os.path.exists(os.path.join(base, path)):
            path = os.path.join(base, path)
        return AudioRef(path=path)
    return None


def _with_audio_length(row: dict[str, Any], max_frames: int | None = None) -> dict[str, Any]:
    ref = row.get("_audio")
    row["_num_samples"] = 0
    if ref is None:
        return row
    try:
        n = audio_num_samples(ref)
    except Exception as err:  # schemas.audio.AudioError (with its reason), or any other failure to read
        log.warning("record %s: cannot read its audio %s (%s); only its text tasks are used", row.get("id"), ref.describe(), err)
        return _set_aside(row, AUDIO_UNREADABLE)
    if n < MIN_SAMPLES:
        log.warning("record %s: audio of %d samples is too short for a mel frame; only its text tasks are used", row.get("id"), n)
        return _set_aside(row, AUDIO_TOO_SHORT)
    if max_frames is not None and num_frames(n) > max_frames:
        log.warning("record %s: %.1f s of audio (%d mel frames) is longer than the speech encoder takes (%d frames, "
                    "%.0f s); only its text tasks are used", row.get("id"), n / SAMPLE_RATE, num_frames(n), max_frames,
                    max_frames / FRAMES_PER_SECOND)
        return _set_aside(row, AUDIO_TOO_LONG)
    row["_num_samples"] = n
    return row


def _set_aside(row: dict[str, Any], issue: str) -> dict[str, Any]:
    row["_audio"] = None
    row["_audio_issue"] = issue
    return row


# ----------------------------------------------------------------------------- OSUM raw lists


def _raw_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    first = unit.index * RAW_CHUNK_LINES
    lines: list[tuple[int, str]] = []
    with open(unit.path, encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if number >= first + RAW_CHUNK_LINES:
                break
            if number >= first:
                lines.append((number + 1, line))
    base = os.path.dirname(os.path.abspath(unit.path))
    for number, line in _part(lines, unit):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            yield record_from_osum(obj, base)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s:%d: skipped, not an OSUM raw entry (%s)", unit.path, number, err)


_TRAILING_TAGS = re.compile(r"^(.*?)((?:\s*<[^<>]+>)*)\s*$", re.S)
_TAG = re.compile(r"<([^<>]+)>")
_ALIGNED_WORD = re.compile(r"<(\d+(?:\.\d+)?)>([^<>]+?)<(\d+(?:\.\d+)?)>")
_CHAT_TAGS = ("<S2TCHAT>", "<TEXT2TOKEN>", "<TEXT2TEXT>", "<HISTORY>")


def _label_value(field: str, tag_text: str) -> str | None:
    """`ADULT` or `<ADULT>` -> `adult` through the one alias table (schemas/labels.py); None when
    the value is outside the field's vocabulary (the label is then unknown, not an error)."""
    try:
        return labels.normalise(field, tag_text)
    except labels.LabelError:
        return None


def parse_align_text(text: str) -> list[dict[str, Any]]:
    """Words of a `<start>word<end>` transcript (the inverse of samples.align_text)."""
    return [
        {"word": m.group(2).strip(), "start": float(m.group(1)), "end": float(m.group(3)), "score": None}
        for m in _ALIGNED_WORD.finditer(text)
    ]


def record_from_osum(obj: dict[str, Any], base_dir: str = ".") -> dict[str, Any]:
    """An OSUM raw-list entry as a record dict (the fields samples.py reads)."""
    from echat.model.prompts import LABEL_TAGS, normalize_task

    key, wav = str(obj["key"]), obj["wav"]
    txt = str(obj.get("txt") or "")
    task = normalize_task(obj.get("task") or "<TRANSCRIBE>")
    extra = obj.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra) if extra.strip() else {}
    lang = obj.get("lang")
    rec: dict[str, Any] = {
        "id": key,
        "source_dataset": extra.get("dataset"),
        "language": _label_value("language", lang) if isinstance(lang, str) else None,
        "task": task,
    }
    for field in ("age", "gender", "emotion", "style"):
        tag = extra.get(field)
        if isinstance(tag, str) and tag.strip() and tag.strip() != vocab.UNKNOWN_PLACEHOLDER:
            rec[field] = _label_value(field, tag)
    tags = task.split()
    if any(t in tags for t in _CHAT_TAGS):
        rec["reply_text"] = txt.strip() or None
        rec["transcript"] = (extra.get("question") or "").strip() or None
        think = (extra.get("think_str") or "").strip()
        rec["think_text"] = think or None
        tokens = extra.get("speech_token")
        rec["reply_speech_tokens"] = [int(t) for t in tokens] if isinstance(tokens, list) and tokens else None
    elif "<ALIGN>" in tags:
        words = parse_align_text(txt)
        rec["words"] = words or None
        rec["transcript"] = (" " if lang != "zh" else "").join(w["word"] for w in words) if words else _TAG.sub("", txt).strip() or None
    else:
        body, tail = _TRAILING_TAGS.match(txt).groups()
        found = _TAG.findall(tail)
        label_fields = [LABEL_TAGS[t] for t in tags if t in LABEL_TAGS]
        if "<TRANSCRIBE>" in tags:
            rec["transcript"] = body.strip() or None
        if label_fields == ["events"]:
            events = list(dict.fromkeys(v for v in (_label_value("events", f) for f in found) if v))
            rec["events"] = events or None
        elif len(found) == len(label_fields):
            for field, value in zip(label_fields, found):
                parsed = _label_value(field, value)
                if field == "events":
                    rec["events"] = [parsed] if parsed else None
                elif parsed is not None:
                    rec[field] = parsed
    start, end = obj.get("start"), obj.get("end")
    path = str(wav)
    if not os.path.isabs(path) and os.path.exists(os.path.join(base_dir, path)):
        path = os.path.join(base_dir, path)
    rec["_audio"] = AudioRef(path=path, start=float(start) if start is not None else None, end=float(end) if end is not None else None)
    return rec

