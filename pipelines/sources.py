"""Sources: turn `--input` (a folder or a manifest) into one starting record per audio file.

A folder is searched recursively for audio files. A manifest is `.jsonl` or `.csv` with a `path`
column (`audio` or `wav` accepted too; relative paths are relative to the manifest's folder) and
optional `text`, `language`, `speaker`, `gender`, `age`, `emotion`, `events`, `style` and
`source_kind` (real or synthetic; default real) columns.
A manifest row that cannot become a record (no path, a label outside the vocabulary) becomes a
Reject of stage "source" instead, so it is counted and never lost.

Each record's `source_uri` is the file's path relative to the input root (the folder, or the
manifest's folder), so shards, rejects and ids carry no path of the building machine and a corpus
moved elsewhere keeps its ids; the full location travels as the working key `_source_path`.

Listing runs in the driver through Beam's FileSystems, so `gs://` folders and manifests work
the same as local ones.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from echat.labelers.decode import SOURCE_PATH_KEY  # noqa: F401 - build reads it from here
from echat.schemas.stage import Reject

from .source_rows import REFERENCE_KEY, STAGE, SourceContext, base_record, printable_name, relative_uri, row_record, trusted_groups  # noqa: F401

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm")
MANIFEST_EXTENSIONS = (".jsonl", ".csv")
PATH_KEYS = ("path", "audio", "wav")


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
                 language: str | None = None, manifest_encoding: str = "utf-8") -> SourceListing:
    """Records for every audio file named by `input_path` (a folder or a manifest).

    `trust_manifest`: True, False, or the label groups (schemas.record.LABEL_GROUPS) whose manifest
    values are taken as given; the manifest's other values become each record's `_reference`.
    `language`: given to every record that has none (origin "profile").
    """
    listing = _list(input_path, dataset_name=dataset_name, license=license, trust_manifest=trusted_groups(trust_manifest),
                    encoding=manifest_encoding)
    if language:
        for record in listing.records:
            if record.get("language") is None:
                record.update(language=language, language_origin="profile")
    return listing


def _list(input_path: str, *, dataset_name: str, license: str | None, trust_manifest: frozenset[str],
          encoding: str) -> SourceListing:
    from apache_beam.io.filesystems import FileSystems

    lowered = input_path.lower()
    if lowered.endswith(MANIFEST_EXTENSIONS):
        if not FileSystems.exists(input_path):
            raise FileNotFoundError(f"manifest not found: {input_path}")
        return _read_manifest(input_path, dataset_name=dataset_name, license=license, trust_manifest=trust_manifest,
                              encoding=encoding)
    if lowered.endswith(AUDIO_EXTENSIONS):  # one audio file
        if not FileSystems.exists(input_path):
            raise FileNotFoundError(f"input not found: {input_path}")
        return SourceListing(records=[_base_record(input_path, dataset_name, license, _dirname(input_path))])
    if not FileSystems.exists(input_path):
        raise FileNotFoundError(f"input not found: {input_path}")
    if not _is_folder(input_path):
        raise ValueError(
            f"cannot read {input_path}: not a folder, an audio file ({', '.join(AUDIO_EXTENSIONS)}) "
            f"or a manifest ({', '.join(MANIFEST_EXTENSIONS)})"
        )
    return _list_folder(input_path, dataset_name=dataset_name, license=license)


def _is_folder(path: str) -> bool:
    if "://" in path:  # object stores have no folders: a prefix is one if anything lies below it
        return True
    import os

    return os.path.isdir(path)


def _list_folder(folder: str, *, dataset_name: str, license: str | None) -> SourceListing:
    listing = SourceListing()
    if "://" in folder:
        from apache_beam.io.filesystems import FileSystems

        pattern = FileSystems.join(folder.rstrip("/"), "**")
        paths = sorted(m.path for result in FileSystems.match([pattern]) for m in result.metadata_list)
        for path in paths:
            _add_path(listing, path, folder, dataset_name, license)
    else:
        _walk_local(listing, folder, dataset_name, license)
    if not listing.records and not listing.rejects:
        found = ", ".join(f"{n} {what}" for what, n in sorted(listing.skipped.items())) or "nothing"
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {folder}: found {found}")
    return listing


def _add_path(listing: SourceListing, path: str, root: str, dataset_name: str, license: str | None) -> None:
    if path.lower().endswith(AUDIO_EXTENSIONS):
        listing.records.append(_base_record(path, dataset_name, license, root))
    else:
        listing.skip("non-audio files")


def _walk_local(listing: SourceListing, folder: str, dataset_name: str, license: str | None) -> None:
    """Every audio file below `folder`, in sorted order, without following folder links (so a link
    loop cannot trap the listing). What is not a regular audio file is counted by kind; a FIFO or
    device named like audio is rejected, since it would block or never end when read."""
    import os
    import stat

    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            listing.skip(f"unreadable folders ({type(exc).__name__})")
            continue
        for entry in entries:
            audio_name = entry.name.lower().endswith(AUDIO_EXTENSIONS)
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    if audio_name:
                        listing.skip("folders named like audio files")
                    continue
                if entry.is_symlink() and entry.is_dir():  # a link to a folder: not followed
                    listing.skip("links to folders (not followed)")
                    continue
                mode = entry.stat().st_mode  # follows a file link; a dangling or looping link raises
            except OSError:
                listing.skip("broken or looping links")
                continue
            if not audio_name:
                listing.skip("non-audio files")
            elif not stat.S_ISREG(mode):
                uri = relative_uri(entry.path, folder)
                listing.rejects.append(Reject(source_uri=uri, stage=STAGE, reason="not_a_regular_file",
                                              detail=f"{uri} is a {_file_kind(mode)}, not a regular file"))
            else:
                listing.records.append(_base_record(entry.path, dataset_name, license, folder))
    listing.records.sort(key=lambda r: r["source_uri"])


def _file_kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _decode_manifest(manifest: str, data: bytes, encoding: str) -> str:
    """The manifest's text; a byte that is not `encoding` is an error naming line, column and byte."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding  # -sig: a spreadsheet's BOM
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"manifest {manifest} is not {encoding}: line {line}, column {column} holds byte 0x{data[exc.start]:02x}; "
            f"if the file is in another encoding (a spreadsheet's latin-1 CSV, say), pass --set manifest_encoding=latin-1"
        ) from None


def _read_manifest(manifest: str, *, dataset_name: str, license: str | None, trust_manifest: frozenset[str],
                   encoding: str = "utf-8") -> SourceListing:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(manifest) as handle:
        text = _decode_manifest(manifest, handle.read(), encoding)
    base_dir = posixpath.dirname(manifest) if "://" in manifest else _local_dirname(manifest)
    listing = SourceListing()
    for line_no, row in _manifest_rows(manifest, text):
        where = f"{posixpath.basename(manifest)}:{line_no}"  # published: no path of this machine
        try:
            outcome = _row_to_record(row, where, base_dir, dataset_name, license, trust_manifest)
        except Exception as exc:  # noqa: BLE001 - one odd row must not stop the build
            outcome = Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=f"{type(exc).__name__}: {exc}")
        (listing.rejects if isinstance(outcome, Reject) else listing.records).append(outcome)
    return listing


def _row_to_record(row, where: str, base_dir: str, dataset_name: str, license: str | None, trust_manifest: frozenset[str]):
    """A record for one manifest row, or the Reject saying why the row cannot be one."""
    if isinstance(row, str):  # a line that did not parse
        return Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=row)
    given = next((row[k] for k in PATH_KEYS if row.get(k)), None)
    if not isinstance(given, str) or not given.strip():
        detail = f"row has no path (a string in one of {', '.join(PATH_KEYS)}): {json.dumps(row, ensure_ascii=False)[:300]}"
        return Reject(source_uri=where, stage=STAGE, reason="manifest_row_invalid", detail=detail)
    uri = _resolve(given.strip(), base_dir)
    ctx = SourceContext(root=base_dir, dataset_name=dataset_name, license=license, trust_manifest=trust_manifest)
    return row_record(row, base_record(uri, ctx), ctx, where)


def _manifest_rows(manifest: str, text: str):
    if manifest.lower().endswith(".csv"):
        csv.field_size_limit(16 * 1024 * 1024)  # long transcripts exceed csv's 128 KiB default
        reader = csv.DictReader(io.StringIO(text))
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            yield i, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        return
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends inside JSON strings
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield i, f"not JSON: {exc}"
            continue
        yield i, row if isinstance(row, dict) else f"not a JSON object: {line[:200]}"


def _base_record(uri: str, dataset_name: str, license: str | None, root: str) -> dict[str, Any]:
    return base_record(uri, SourceContext(root=root, dataset_name=dataset_name, license=license))


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if "://" in path else _local_dirname(path)


def _local_dirname(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))


def _resolve(given: str, base_dir: str) -> str:
    if "://" in given or given.startswith("/"):
        return given
    if "://" in base_dir:
        return posixpath.join(base_dir, given)
    import os

    return os.path.normpath(os.path.join(base_dir, given))
