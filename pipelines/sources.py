"""Sources: what `--input` names, and the per-unit readers that turn it into starting records.

`--input` is one of:
- a folder (local, or a gs:// / s3:// prefix), searched recursively for audio files;
- one audio file;
- a manifest, `.jsonl`, `.csv` or `.tsv`, with a `path` column (`audio` or `wav` accepted too;
  relative paths are relative to the manifest's folder) and optional `text`, `language`,
  `speaker`, `gender`, `age`, `emotion`, `events`, `style` and `source_kind` columns;
- an OSUM raw list (`.list`/`.jsonl` whose first row is a JSON object with `key` and `wav`) or a
  WeNet shard list (a `.list`/`.txt` naming one `.tar` per line), read by pipelines/source_osum.py;
- a Hugging Face dataset (`save_to_disk` folder, parquet folder, hub id), by pipelines/source_hf.py.

The input is cut into *units*, each read in one call that streams what it holds as *items*: a
record, a Reject (stage "source"), a skipped entry (counted by kind), or a further unit (a
subfolder, a tar of a shard list). The build reads units in Beam DoFns (pipelines/read_sources.py)
so nothing is listed whole in the driver; `list_sources` reads the same units in this process, for
tests and small callers. Either way each rule (what a folder entry is, how a manifest row parses)
has one definition, here or in the format's reader.

The driver only runs `probe_input`: cheap, bounded checks whose failure must come before any work
(the input is missing, holds no audio at all, or is a manifest not valid in its encoding).

Each record's `source_uri` is the file's path relative to the input root (the folder, or the
manifest's folder), so shards, rejects and ids carry no path of the building machine and a corpus
moved elsewhere keeps its ids; the full location travels as the working key `_source_path`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

from echat.labelers.decode import SOURCE_PATH_KEY  # noqa: F401 - build reads it from here
from echat.schemas.stage import Reject

from .source_rows import REFERENCE_KEY, STAGE, SourceContext, base_record, printable_name, relative_uri, row_record, trusted_groups  # noqa: F401

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm")
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".tsv")
LIST_EXTENSIONS = (".list", ".txt")  # OSUM raw lists and WeNet shard lists (besides .jsonl raw lists)
PATH_KEYS = ("path", "audio", "wav")
REMOTE_PROBE_LIMIT = 1000  # objects the driver looks at, at most, to find that a prefix holds audio

# Unit kinds: how a unit is read (`read_unit`).
ROOT_FOLDER = "root_folder"  # a local folder's own entries; its subfolders become FOLDER units
FOLDER = "folder"  # a local folder and everything below it
REMOTE_PREFIX = "remote_prefix"  # every object under a gs:// or s3:// prefix (fileio.MatchFiles in the build)
AUDIO_FILE = "audio_file"
MANIFEST = "manifest"
OSUM_RAW = "osum_raw"
SHARD_LIST = "shard_list"  # its lines become TAR units
TAR = "tar"
HF = "hf"  # one unit of a Hugging Face dataset (pipelines/source_hf.py's hf_units)


class Unit(NamedTuple):
    kind: str
    uri: str


class Item(NamedTuple):
    """What reading a unit yields. `tag` is RECORD (value: the record), REJECT (a Reject), SKIP
    (value: the kind of entry skipped) or UNIT (a Unit still to read). `where` names the item's
    place for reject details and tally keys (manifest.jsonl:7); `order` sorts duplicates so the
    first listed is kept."""

    tag: str
    value: Any
    where: str = ""
    order: tuple = ()


RECORD, REJECT, SKIP, UNIT = "record", "reject", "skip", "unit"


@dataclass(frozen=True)
class Probe:
    """What the driver learnt about `--input` without reading it whole."""

    kind: str  # the kind of the input's root unit(s)
    input_path: str
    root: str  # the input root: every source_uri is relative to it
    rows: int | None = None  # a manifest's rows (for the dry run's message), when known
    entries_seen: int = 0  # folder entries or objects the probe looked at before it was satisfied
    hf_kind: str | None = None

    def root_units(self, columns: dict | None = None) -> list[Unit]:
        if self.kind == HF:  # a dataset's units are few (files or splits): listed here
            from .source_hf import hf_units

            return [Unit(HF, u) for u in hf_units(self.input_path, columns)]
        return [Unit(self.kind, self.input_path)]


@dataclass
class SourceListing:
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    # what a folder held besides audio, by kind: "non-audio files", "folders named like audio files"...
    skipped: Counter = field(default_factory=Counter)

    def skip(self, kind: str) -> None:
        self.skipped[kind] += 1

    @property
    def skipped_files(self) -> int:
        return self.skipped["non-audio files"]


def list_sources(input_path: str, *, dataset_name: str, license: str | None, trust_manifest=True,
                 language: str | None = None, manifest_encoding: str = "utf-8", columns: dict | None = None) -> SourceListing:
    """Records for every audio file named by `input_path`, read here in this process.

    For tests and small inputs: the build reads the same units in the pipeline instead.
    `trust_manifest`: True, False, or the label groups (schemas.record.LABEL_GROUPS) whose manifest
    values are taken as given; the manifest's other values become each record's `_reference`.
    `language`: given to every record that has none (origin "profile").
    """
    probe = probe_input(input_path, manifest_encoding=manifest_encoding)
    ctx = SourceContext(root=probe.root, dataset_name=dataset_name, license=license,
                        trust_manifest=trusted_groups(trust_manifest), language=language)
    listing = SourceListing()
    pending = probe.root_units(columns)
    while pending:
        for item in read_unit(pending.pop(0), ctx, manifest_encoding=manifest_encoding, columns=columns):
            if item.tag == RECORD:
                listing.records.append(item.value)
            elif item.tag == REJECT:
                listing.rejects.append(item.value)
            elif item.tag == SKIP:
                listing.skip(item.value)
            else:
                pending.append(item.value)
    if probe.kind in (ROOT_FOLDER, REMOTE_PREFIX):  # a folder's order is the file system's: make it stable
        listing.records.sort(key=lambda r: r["source_uri"])
    return listing


# ---------------------------------------------------------------- the driver's probe


def probe_input(input_path: str, *, manifest_encoding: str = "utf-8") -> Probe:
    """What `input_path` is, checked cheaply; raises the one-line errors a build must give before
    any work: FileNotFoundError (not there), ValueError (no audio in it, a manifest that is not
    valid in its encoding, a file of no known kind)."""
    from apache_beam.io.filesystems import FileSystems

    lowered = input_path.lower()
    remote = "://" in input_path
    if lowered.endswith(MANIFEST_EXTENSIONS + LIST_EXTENSIONS):
        if not FileSystems.exists(input_path):
            raise FileNotFoundError(f"manifest not found: {input_path}")
        kind = _list_kind(input_path, manifest_encoding)
        rows = check_manifest_encoding(input_path, manifest_encoding)
        if kind == MANIFEST and lowered.endswith((".csv", ".tsv")):
            rows = max(0, rows - 1)  # the header
        return Probe(kind, input_path, _dirname(input_path), rows=rows if kind in (MANIFEST, OSUM_RAW) else None)
    if lowered.endswith(AUDIO_EXTENSIONS):
        if not FileSystems.exists(input_path):
            raise FileNotFoundError(f"input not found: {input_path}")
        return Probe(AUDIO_FILE, input_path, _dirname(input_path), rows=1)
    hf = _hf_kind(input_path)
    if hf:
        return Probe(HF, input_path, input_path.rstrip("/"), hf_kind=hf)
    if remote:
        return _probe_remote(input_path)
    import os

    if not os.path.exists(input_path):
        raise FileNotFoundError(f"input not found: {input_path}")
    if not os.path.isdir(input_path):
        raise ValueError(
            f"cannot read {input_path}: not a folder, an audio file ({', '.join(AUDIO_EXTENSIONS)}), "
            f"a manifest ({', '.join(MANIFEST_EXTENSIONS)}) or a list ({', '.join(LIST_EXTENSIONS)})"
        )
    return _probe_local_folder(input_path)


def _probe_local_folder(folder: str) -> Probe:
    """Walk `folder` until the first audio file (cheap when there is audio); none at all is an
    error naming what the folder held."""
    skipped, seen = Counter(), 0
    for item in walk_folder(folder, folder, ctx=None, descend=True):
        seen += 1
        if item.tag in (RECORD, REJECT):
            return Probe(ROOT_FOLDER, folder, folder, entries_seen=seen)
        if item.tag == SKIP:
            skipped[item.value] += 1
    raise ValueError(_no_audio_message(folder, skipped))


def _probe_remote(prefix: str) -> Probe:
    from apache_beam.io.filesystems import FileSystems

    root = prefix.rstrip("/")
    pattern = FileSystems.join(root, "**")
    (result,) = FileSystems.match([pattern], limits=[REMOTE_PROBE_LIMIT])
    paths = [m.path for m in result.metadata_list]
    if not paths:
        raise FileNotFoundError(f"input not found: {prefix}")
    if not any(p.lower().endswith(AUDIO_EXTENSIONS) for p in paths) and len(paths) < REMOTE_PROBE_LIMIT:
        raise ValueError(_no_audio_message(prefix, Counter({"non-audio files": len(paths)})))
    # No audio in the first REMOTE_PROBE_LIMIT objects of a bigger prefix: the pipeline looks further.
    return Probe(REMOTE_PREFIX, prefix, root, entries_seen=len(paths))


def _no_audio_message(folder: str, skipped: Counter) -> str:
    found = ", ".join(f"{n} {what}" for what, n in sorted(skipped.items())) or "nothing"
    return f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {folder}: found {found}"


def _hf_kind(path: str) -> str | None:
    try:
        from .source_hf import hf_kind
    except ImportError:  # the Hugging Face reader is not part of this install
        return None
    try:
        return hf_kind(path)
    except OSError:  # it looks at a folder's entries, where a link loop raises: then it is no dataset
        return None


def _list_kind(path: str, encoding: str) -> str:
    """MANIFEST, OSUM_RAW or SHARD_LIST, from the name and the first non-empty line."""
    lowered = path.lower()
    if lowered.endswith((".csv", ".tsv")):
        return MANIFEST
    first = _first_line(path, encoding)
    if lowered.endswith(".jsonl"):  # ours has `path` (or `audio`); OSUM's has `key` and `wav`
        row = _json_object(first)
        osum = row is not None and "key" in row and "wav" in row and not any(k in row for k in ("path", "audio"))
        return OSUM_RAW if osum else MANIFEST
    from echat.schemas import osum_format

    return OSUM_RAW if osum_format.list_kind(first, where=path) == osum_format.RAW_LIST else SHARD_LIST


def _first_line(path: str, encoding: str) -> str:
    with _open_text(path, encoding, newline="\n") as text:
        for line in text:
            if line.strip():
                return line.strip()
    return ""


def _json_object(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def check_manifest_encoding(manifest: str, encoding: str, chunk_bytes: int = 1 << 20) -> int:
    """Decode `manifest` once, streaming (never whole in memory); a byte that is not `encoding` is
    an error naming line, column and byte. Returns the number of non-empty lines."""
    from apache_beam.io.filesystems import FileSystems

    decoder = codecs.getincrementaldecoder(_codec(encoding))()
    consumed, newlines, line_start, rows, open_line = 0, 0, 0, 0, False
    with FileSystems.open(manifest) as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # exc.object is what the decoder held: the end of a character the previous chunk cut,
                # then this chunk (less a byte order mark); it ends where the chunk ends
                data = exc.object
                at = consumed + len(chunk) - len(data) + exc.start
                line = newlines + data.count(b"\n", 0, exc.start) + 1
                nl = data.rfind(b"\n", 0, exc.start)
                column = (exc.start - nl) if nl >= 0 else (at - line_start + 1)
                raise ValueError(
                    f"manifest {manifest} is not {encoding}: line {line}, column {column} holds byte 0x{data[exc.start]:02x}; "
                    f"if the file is in another encoding (a spreadsheet's latin-1 CSV, say), pass --set manifest_encoding=latin-1"
                ) from None
            *complete, tail = text.split("\n")
            for piece in complete:  # a line ends here: it is a row if any of it was not blank
                rows += open_line or bool(piece.strip())
                open_line = False
            open_line = open_line or bool(tail.strip())
            if chunk.count(b"\n"):
                line_start = consumed + chunk.rfind(b"\n") + 1
            newlines += chunk.count(b"\n")
            consumed += len(chunk)
            if not chunk:
                return rows + open_line


def _codec(encoding: str) -> str:
    # -sig: a spreadsheet's byte order mark is dropped, not read as part of the first column's name
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _open_text(path: str, encoding: str, *, newline: str):
    from apache_beam.io.filesystems import FileSystems

    return io.TextIOWrapper(FileSystems.open(path), encoding=_codec(encoding), newline=newline)


# ---------------------------------------------------------------- the per-unit readers


def read_unit(unit: Unit, ctx: SourceContext, *, manifest_encoding: str = "utf-8", columns: dict | None = None) -> Iterator[Item]:
    """Every item of one unit, streamed; the profile's language given to every record without one."""
    for item in _unit_items(unit, ctx, manifest_encoding, columns):
        record = item.value
        if item.tag == RECORD and ctx.language and record.get("language") is None:
            record.update(language=ctx.language, language_origin="profile")
        yield item


def _unit_items(unit: Unit, ctx: SourceContext, manifest_encoding: str, columns: dict | None) -> Iterator[Item]:
    if unit.kind == ROOT_FOLDER:
        yield from walk_folder(unit.uri, ctx.root, ctx, descend=False)
    elif unit.kind == FOLDER:
        yield from walk_folder(unit.uri, ctx.root, ctx, descend=True)
    elif unit.kind == REMOTE_PREFIX:  # the build matches with fileio.MatchFiles; this is the same, here
        from apache_beam.io.filesystems import FileSystems

        (result,) = FileSystems.match([FileSystems.join(unit.uri.rstrip("/"), "**")])
        for metadata in result.metadata_list:
            yield object_item(metadata.path, ctx)
    elif unit.kind == AUDIO_FILE:
        yield Item(RECORD, base_record(unit.uri, ctx), unit.uri, (unit.uri,))
    elif unit.kind == MANIFEST:
        yield from manifest_items(unit.uri, ctx, manifest_encoding)
    elif unit.kind == OSUM_RAW:
        yield from osum_raw_items(unit.uri, ctx, manifest_encoding)
    elif unit.kind == SHARD_LIST:
        yield from shard_list_items(unit.uri, manifest_encoding)
    elif unit.kind == TAR:
        from .source_osum import shard_records

        yield from _reader_items(shard_records(unit.uri, ctx), posixpath.basename(unit.uri), unit.uri)
    elif unit.kind == HF:
        from .source_hf import hf_unit_records

        yield from _reader_items(hf_unit_records(unit.uri, ctx, columns), unit.uri, unit.uri)
    else:
        raise ValueError(f"unknown source unit kind {unit.kind!r}")


def _reader_items(outcomes, name: str, order_key: str, line: int = 0) -> Iterator[Item]:
    """Items from a format reader's records and Rejects, each with its own place."""
    for k, outcome in enumerate(outcomes):
        where = f"{name}:{line}" if line else f"{name}#{k}"
        if line and k:
            where += f"#{k}"
        yield Item(REJECT if isinstance(outcome, Reject) else RECORD, outcome, where, (order_key, line, k))


def object_item(path: str, ctx: SourceContext) -> Item:
    """An object under a gs:// or s3:// prefix: a record if it is audio, else a skipped entry."""
    if path.lower().endswith(AUDIO_EXTENSIONS):
        return Item(RECORD, base_record(path, ctx), path, (path,))
    return Item(SKIP, "non-audio files")


def walk_folder(folder: str, root: str, ctx: SourceContext | None, *, descend: bool) -> Iterator[Item]:
    """Every audio file of `folder` (and below, if `descend`; else each subfolder as a FOLDER unit),
    streamed in the file system's order, without following folder links (so a link loop cannot
    trap the walk). What is not a regular audio file is counted by kind; a FIFO or device named
    like audio is rejected, since it would block or never end when read. Without `ctx` (the
    driver's probe) records are not built, only their place yielded."""
    import os
    import stat

    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = os.scandir(current)
        except OSError as exc:
            yield Item(SKIP, f"unreadable folders ({type(exc).__name__})")
            continue
        with entries:
            for entry in entries:
                audio_name = entry.name.lower().endswith(AUDIO_EXTENSIONS)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if descend:
                            pending.append(entry.path)
                        else:
                            yield Item(UNIT, Unit(FOLDER, entry.path))
                        if audio_name:
                            yield Item(SKIP, "folders named like audio files")
                        continue
                    if entry.is_symlink() and entry.is_dir():  # a link to a folder: not followed
                        yield Item(SKIP, "links to folders (not followed)")
                        continue
                    mode = entry.stat().st_mode  # follows a file link; a dangling or looping link raises
                except OSError:
                    yield Item(SKIP, "broken or looping links")
                    continue
                if not audio_name:
                    yield Item(SKIP, "non-audio files")
                    continue
                uri = relative_uri(entry.path, root)
                if not stat.S_ISREG(mode):
                    yield Item(REJECT, Reject(source_uri=uri, stage=STAGE, reason="not_a_regular_file",
                                              detail=f"{uri} is a {_file_kind(mode)}, not a regular file"), uri, (uri,))
                else:
                    yield Item(RECORD, base_record(entry.path, ctx) if ctx else None, uri, (uri,))


def _file_kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def manifest_items(manifest: str, ctx: SourceContext, encoding: str = "utf-8") -> Iterator[Item]:
    """One item per manifest row, streamed line by line; a row that cannot become a record (no
    path, a label outside the vocabulary, not JSON) is a Reject naming its line."""
    name = posixpath.basename(manifest)  # published: no path of this machine
    for line_no, row in _manifest_rows(manifest, encoding):
        where = f"{name}:{line_no}"
        try:
            outcome = _row_to_record(row, where, ctx)
        except Exception as exc:  # noqa: BLE001 - one odd row must not stop the build
            outcome = Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=f"{type(exc).__name__}: {exc}")
        yield Item(REJECT if isinstance(outcome, Reject) else RECORD, outcome, where, (manifest, line_no))


def _row_to_record(row, where: str, ctx: SourceContext):
    """A record for one manifest row, or the Reject saying why the row cannot be one."""
    if isinstance(row, str):  # a line that did not parse
        return Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=row)
    given = next((row[k] for k in PATH_KEYS if row.get(k)), None)
    if not isinstance(given, str) or not given.strip():
        detail = f"row has no path (a string in one of {', '.join(PATH_KEYS)}): {json.dumps(row, ensure_ascii=False)[:300]}"
        return Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=detail)
    return row_record(row, base_record(_resolve(given.strip(), ctx.root), ctx), ctx, where)


def _manifest_rows(manifest: str, encoding: str):
    lowered = manifest.lower()
    if lowered.endswith((".csv", ".tsv")):
        csv.field_size_limit(16 * 1024 * 1024)  # long transcripts exceed csv's 128 KiB default
        with _open_text(manifest, encoding, newline="") as text:  # "": quoted cells may hold newlines
            reader = csv.DictReader(text, delimiter="\t" if lowered.endswith(".tsv") else ",")
            for i, row in enumerate(reader, start=2):  # line 1 is the header
                yield i, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        return
    for i, line in _lines(manifest, encoding):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield i, f"not JSON: {exc}"
            continue
        yield i, row if isinstance(row, dict) else f"not a JSON object: {line[:200]}"


def _lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-empty line, streamed. Split at "\\n" only: str.splitlines()
    would also break at U+2028 and friends inside JSON strings."""
    with _open_text(path, encoding, newline="\n") as text:
        for i, line in enumerate(text, start=1):
            if line.strip():
                yield i, line.rstrip("\n")


def osum_raw_items(raw_list: str, ctx: SourceContext, encoding: str = "utf-8") -> Iterator[Item]:
    """One OSUM raw list's rows, streamed line by line through pipelines/source_osum.py."""
    from .source_osum import raw_list_records

    name = posixpath.basename(raw_list)
    for i, line in _lines(raw_list, encoding):
        yield from _reader_items(raw_list_records(line, f"{name}:{i}", ctx), name, raw_list, line=i)


def shard_list_items(shard_list: str, encoding: str = "utf-8") -> Iterator[Item]:
    """A WeNet shard list: each line names a tar (relative to the list's folder), a TAR unit; a line
    that names no tar is a Reject naming it."""
    from echat.schemas import osum_format

    base, name = _dirname(shard_list), posixpath.basename(shard_list)
    for i, line in _lines(shard_list, encoding):
        where = f"{name}:{i}"
        try:
            (tar,) = osum_format.shard_list_paths(line, where=where)
        except osum_format.OsumFormatError as err:
            yield Item(REJECT, Reject(source_uri=where, stage=STAGE, reason="shard_list_line_invalid",
                                      detail=str(err).replace(f"{where}:1:", f"{where}:", 1)), where, (shard_list, i))
            continue
        yield Item(UNIT, Unit(TAR, _resolve(tar, base)))


def _dirname(path: str) -> str:
    if "://" in path:
        return posixpath.dirname(path)
    import os

    return os.path.dirname(os.path.abspath(path))


def _resolve(given: str, base_dir: str) -> str:
    if "://" in given or given.startswith("/"):
        return given
    if "://" in base_dir:
        return posixpath.join(base_dir, given)
    import os

    return os.path.normpath(os.path.join(base_dir, given))
