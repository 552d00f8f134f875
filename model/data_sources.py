"""Where training records come from: parquet shards, OSUM raw lists and WeNet tar shards, cut into read units.

A *unit* is the smallest piece a data-loader worker reads: one row group of a parquet shard (the
pipeline writes 64 rows per group), one chunk of lines of an OSUM raw list, or one WeNet tar shard
(read once, front to back). Units are what is dealt out to ranks and workers, so two workers never
read the same rows. When there are fewer units than workers, each unit is cut into equal parts (a
part re-reads its row group or chunk and keeps its slice of the rows; a part of a tar reads the
tar and keeps every `parts`-th sample).

Records come out as dicts with the fields of schemas/record.py plus the working keys `_audio` (an
`AudioRef`, undecoded) and `_num_samples` (length at 16 kHz, read from the audio header). A record
whose audio cannot be read, is missing (a tar sample without an audio member), is too short for a
mel frame, or is longer than the speech encoder takes (`max_frames`: Whisper's 30 s) keeps its text
fields (text-only tasks still use it) with `_audio` None and `_audio_issue` saying why; the reason
is logged with its id.

OSUM's own formats (raw lists, tar shards, shard lists naming one tar per line) are read through
schemas/osum_format.py, the definition the corpus pipeline's sources share: the same sample gives
the same record from a raw list or a tar. Parquet shards (or a build's folder of them), lists and
tars may be local paths or URLs of any filesystem fsspec knows (gs://, s3://, memory://...); a list is told a raw list or a shard list by
its first non-empty line; a shard list's units are its tars, relative entries resolved against the
list's folder.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import fsspec

from echat.model.features import FRAMES_PER_SECOND, MIN_SAMPLES, SAMPLE_RATE, AudioRef, audio_num_samples, num_frames
from echat.schemas import osum_format
from echat.schemas.osum_format import parse_align_text  # noqa: F401  (offered here, as before)

log = logging.getLogger(__name__)

PARQUET, OSUM_RAW, WENET_TAR = "parquet", "osum_raw", "wenet_tar"
LIST_SUFFIXES = (".jsonl", ".list", ".json", ".txt")  # OSUM raw lists or shard lists, told apart by content
RAW_SUFFIXES = LIST_SUFFIXES  # the name this module gave them before shard lists were read
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
AUDIO_MISSING = "no audio in the sample"
AUDIO_TOO_SHORT = "audio too short for a mel frame"
AUDIO_TOO_LONG = "audio longer than the speech encoder takes"


class DataSourceError(ValueError):
    pass


@dataclass(frozen=True)
class Unit:
    path: str
    kind: str  # PARQUET, OSUM_RAW or WENET_TAR
    index: int  # row group (parquet), chunk of RAW_CHUNK_LINES lines (raw list), 0 (a tar)
    part: int = 0
    parts: int = 1


def _is_url(path: str) -> bool:
    return "://" in path


def resolve_files(files: list[str] | str) -> list[tuple[str, str]]:
    """(path, kind) for each input: parquet files, folders (all *.parquet under them), globs, OSUM
    raw lists, WeNet tar shards (`.tar`) and shard lists (each of their tars); URLs for the OSUM forms.

    Raises DataSourceError naming an input that does not exist, matches nothing or has an unknown kind.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [str(files)]
    out: list[tuple[str, str]] = []
    for item in files:
        item = str(item)
        if _is_url(item):
            out.extend(_resolve_url(item))
            continue
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
            else:
                out.extend(_by_kind(path))
    seen: set[str] = set()
    unique = []
    for path, kind in out:
        if path not in seen:
            seen.add(path)
            unique.append((path, kind))
    return unique


def _resolve_url(url: str) -> list[tuple[str, str]]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # an unknown scheme, or its filesystem is not installed
        raise DataSourceError(f"{url}: cannot open it ({err})") from err
    protocol = url.split("://", 1)[0]
    if glob.has_magic(path):
        matches = [f"{protocol}://{p}" for p in sorted(fs.glob(path))]
        if not matches:
            raise DataSourceError(f"{url!r} matches no file")
        return [pair for m in matches for pair in _resolve_url(m)]
    if not fs.exists(path):
        raise DataSourceError(f"no such file: {url}")
    if fs.isdir(path):  # a build's folder in a bucket: its shards, as a local folder gives
        found = [f"{protocol}://{p}" for p in sorted(fs.find(path)) if p.endswith(".parquet")
                 and not p.rsplit("/", 1)[-1].startswith(".")]
        if not found:
            raise DataSourceError(f"no *.parquet shards under {url}")
        return [(f, PARQUET) for f in found]
    return _by_kind(url)


def _by_kind(path: str) -> list[tuple[str, str]]:
    if path.endswith(".parquet"):
        return [(path, PARQUET)]
    if path.endswith(".tar"):
        return [(path, WENET_TAR)]
    if not path.endswith(LIST_SUFFIXES):
        raise DataSourceError(f"{path}: not a parquet shard (.parquet), a WeNet tar shard (.tar) or an OSUM list "
                              f"({', '.join(LIST_SUFFIXES)})")
    with fsspec.open(path, "rt", encoding="utf-8") as fh:
        try:
            kind = osum_format.list_kind(osum_format.first_line(fh), path)
        except osum_format.OsumFormatError as err:
            raise DataSourceError(str(err)) from None
        except UnicodeDecodeError as err:
            raise DataSourceError(f"{path}: not a UTF-8 text list ({err})") from None
        if kind == osum_format.RAW_LIST:
            return [(path, OSUM_RAW)]
        fh.seek(0)
        try:
            tars = osum_format.shard_list_paths(fh.read(), path)
        except osum_format.OsumFormatError as err:
            raise DataSourceError(str(err)) from None
    base = _folder_of(path)
    out = []
    for tar in tars:
        resolved = _resolve(tar, base)
        if not _is_url(resolved) and not os.path.exists(resolved):
            raise DataSourceError(f"{path}: names {tar}, which does not exist (relative entries are read against the "
                                  "list's folder, then the working directory)")
        out.append((resolved, WENET_TAR))
    return out


def _folder_of(path: str) -> str:
    return posixpath.dirname(path) if _is_url(path) else os.path.dirname(os.path.abspath(path))


def _resolve(path: str, base: str) -> str:
    """`path` as written in a list: absolute paths and URLs as they are; a relative one against the
    list's folder `base` (a local one falls back to the working directory when it is not there,
    as OSUM's own lists are written relative to their repository root)."""
    if _is_url(path) or os.path.isabs(path):
        return path
    if _is_url(base):
        protocol, folder = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(folder, path))}"
    joined = os.path.join(base, path)
    return joined if os.path.exists(joined) or not os.path.exists(path) else path


def plan_units(files: list[tuple[str, str]], min_units: int = 1) -> list[Unit]:
    """Every read unit of the inputs, in file order; cut into parts when fewer than `min_units`."""
    import pyarrow.parquet as pq

    units: list[Unit] = []
    for path, kind in files:
        if kind == PARQUET:
            try:
                with fsspec.open(path, "rb") as fh:
                    groups = pq.ParquetFile(fh).metadata.num_row_groups
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataSourceError(f"{path}: cannot read parquet metadata ({err})") from err
            units.extend(Unit(path, kind, g) for g in range(groups))
        elif kind == WENET_TAR:
            units.append(Unit(path, kind, 0))  # read whole: a tar has no index to count its samples by
        else:
            with fsspec.open(path, "rt", encoding="utf-8") as fh:
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
    rows = {PARQUET: _parquet_rows, OSUM_RAW: _raw_rows, WENET_TAR: _tar_rows}[unit.kind](unit)
    for row in rows:
        yield _with_audio_length(row, max_frames)


def _part(items: list, unit: Unit) -> list:
    n = len(items)
    return items[unit.part * n // unit.parts : (unit.part + 1) * n // unit.parts]


def _parquet_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with fsspec.open(unit.path, "rb") as fh:  # a local path or any fsspec URL (gs://, s3://...)
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        missing = [c for c in ("id", "audio") if c not in names]
        if missing:
            raise DataSourceError(f"{unit.path}: shard lacks column(s) {', '.join(missing)}")
        table = pf.read_row_group(unit.index, columns=[c for c in COLUMNS if c in names])
    base = _folder_of(unit.path)
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


# ----------------------------------------------------------------------------- OSUM raw lists and WeNet tar shards


def _raw_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    first = unit.index * RAW_CHUNK_LINES
    lines: list[tuple[int, str]] = []
    with fsspec.open(unit.path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if number >= first + RAW_CHUNK_LINES:
                break
            if number >= first:
                lines.append((number + 1, line))
    base = _folder_of(unit.path)
    for number, line in _part(lines, unit):
        if not line.strip():
            continue
        try:
            sample = osum_format.parse_raw_line(line)
        except osum_format.OsumFormatError as err:
            log.warning("%s:%d: skipped, not an OSUM raw entry (%s)", unit.path, number, err)
            continue
        record = _record_from_sample(sample, base, f"{unit.path}:{number}")
        if record is not None:
            yield record


def _tar_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    """The samples of one tar, read once front to back; a part keeps every `parts`-th sample."""
    with fsspec.open(unit.path, "rb") as fh:
        samples = osum_format.iter_shard(fh, unit.path)
        index = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except osum_format.OsumFormatError as err:
                log.warning("%s; the rest of this tar is skipped", err)
                return
            index += 1
            if (index - 1) % unit.parts != unit.part:
                continue
            record = _record_from_sample(sample, None, f"{unit.path}:{sample.key}")
            if record is not None:
                yield record


def _record_from_sample(sample: osum_format.OsumSample, base: str | None, where: str) -> dict[str, Any] | None:
    """The record of one OSUM sample with its `_audio`; None (logged) for a sample OSUM's loader drops."""
    if sample.problems:
        log.warning("%s: skipped, as OSUM's loader drops it: %s", where, "; ".join(sample.problems))
        return None
    try:
        rec = osum_format.record_fields(sample)
    except ValueError as err:  # a task that is not tags at all
        log.warning("%s: skipped, not an OSUM sample (%s)", where, err)
        return None
    if sample.wav:
        rec["_audio"] = AudioRef(data=sample.wav)
    elif sample.wav_path:
        rec["_audio"] = AudioRef(path=_resolve(sample.wav_path, base or "."), start=sample.start, end=sample.end)
    else:
        log.warning("%s: no audio member; only its text tasks are used", where)
        _set_aside(rec, AUDIO_MISSING)
    return rec


def record_from_osum(obj: dict[str, Any], base_dir: str = ".") -> dict[str, Any]:
    """An OSUM raw-list entry as a record dict (the fields samples.py reads), its audio resolved
    against `base_dir`. OsumFormatError (a ValueError) for an entry that is not one."""
    sample = osum_format.parse_raw_entry(obj)
    rec = osum_format.record_fields(sample)
    rec["_audio"] = AudioRef(path=_resolve(sample.wav_path, base_dir), start=sample.start, end=sample.end)
    return rec
