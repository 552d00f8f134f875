"""Readers of OSUM's own formats for the corpus pipeline: raw-list lines and WeNet tar shards.

Called from a source DoFn (pipelines/sources.py decides what to read and where it runs); each
yields starting records built through pipelines/source_rows.py (`base_record`, `row_record`, so the
profile's trust rules and the label errors are those of every source), or Rejects of stage
"source" that never stop the rest of the input. The format itself is schemas/osum_format.py, the
definition the model's training loader reads too.

What a record takes from an OSUM sample: the user's turn only, as a manifest row: `text` (the
user's words: `txt` of an understanding task without its label tags, `extra.question` of a
dialogue task), `language`, `speaker`, `gender`, `age`, `emotion`, `style`, `events` (each from
the task's answer, `extra`, or the member of that name). The reply, its reasoning and speech
tokens and the earlier turns are not carried: the build segments the audio (a reply to the whole
file is not a reply to each segment), writes its own reply and reasoning for the labels it finds,
and keeps earlier turns as text, which OSUM does not store for the user's side.

source_uri: a raw-list row's audio file relative to the input root (the list's folder); a tar
sample `<the tar's path relative to the root>/<key>` (`shards/shards_000000000.tar/utt1`), its
audio inline (`_audio_bytes`, the audio member's bytes).

Reject reasons: osum_row_invalid (a line that is not an OSUM raw entry), osum_sample_invalid (a
member that cannot be read, a task that is not tags), osum_span_unsupported (a raw row's
start/end: the build reads whole files), missing_audio (a tar sample without an audio member),
shard_unreadable (a tar that cannot be opened, is corrupt or cut short: the samples before the
damage are kept), and invalid_label from `row_record`.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

from echat.pipelines.source_rows import STAGE, SourceContext, base_record, relative_uri, row_record
from echat.schemas import osum_format
from echat.schemas.stage import Reject

ROW_COLUMNS = ("text", "language", "speaker", "gender", "age", "emotion", "style", "events")


def raw_list_records(line: str, where: str, ctx: SourceContext) -> Iterator[dict[str, Any] | Reject]:
    """One line of an OSUM raw list (`where`: the list and line number, for messages) -> its
    starting record, its `wav` resolved against the list's folder `ctx.root`; nothing for a blank line."""
    if not line.strip():
        return
    try:
        sample = osum_format.parse_raw_line(line)
    except osum_format.OsumFormatError as err:
        yield Reject(source_uri=where, stage=STAGE, reason="osum_row_invalid", detail=f"{where}: {err}")
        return
    uri = _resolve(sample.wav_path, ctx.root)
    record = base_record(uri, ctx)
    if sample.start is not None or sample.end is not None:
        yield Reject(source_uri=record["source_uri"], stage=STAGE, reason="osum_span_unsupported",
                     detail=f"{where}: key {sample.key!r} names a span ({sample.start}-{sample.end} s) of {sample.wav_path}; "
                            "the build reads whole files (cut the span into a file of its own)")
        return
    yield _finish(sample, record, ctx, f"{where} (key {sample.key!r})")


def shard_records(tar_uri: str, ctx: SourceContext) -> Iterator[dict[str, Any] | Reject]:
    """Every sample of one WeNet tar shard (local, gs://, s3://: opened with Beam's FileSystems and
    read once, front to back) -> its starting record with the audio inline."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    tar_rel = relative_uri(tar_uri, ctx.root)
    try:
        handle = FileSystems.open(tar_uri, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as err:  # Beam raises its own errors per filesystem (BeamIOError, IOError...)
        yield Reject(source_uri=tar_rel, stage=STAGE, reason="shard_unreadable", detail=f"{tar_uri}: cannot open it ({err})")
        return
    with handle:
        samples = osum_format.iter_shard(handle, tar_uri)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except osum_format.OsumFormatError as err:
                yield Reject(source_uri=tar_rel, stage=STAGE, reason="shard_unreadable", detail=str(err))
                return
            yield _tar_sample_record(sample, tar_uri, tar_rel, ctx)


def _tar_sample_record(sample: osum_format.OsumSample, tar_uri: str, tar_rel: str,
                       ctx: SourceContext) -> dict[str, Any] | Reject:
    source_uri = f"{tar_rel}/{sample.key}"
    where = f"{tar_uri}: sample {sample.key!r}"
    if not sample.wav:
        return Reject(source_uri=source_uri, stage=STAGE, reason="missing_audio",
                      detail=f"{where} has no audio member ({', '.join(sorted(osum_format.AUDIO_SUFFIXES))})")
    record = base_record(f"{tar_uri}/{sample.key}", ctx, source_uri=source_uri, audio_bytes=sample.wav)
    return _finish(sample, record, ctx, where)


def _finish(sample: osum_format.OsumSample, record: dict[str, Any], ctx: SourceContext, where: str) -> dict[str, Any] | Reject:
    if sample.problems:
        return Reject(source_uri=record["source_uri"], stage=STAGE, reason="osum_sample_invalid",
                      detail=f"{where}: {'; '.join(sample.problems)}")
    try:
        found = osum_format.user_labels(sample)
    except ValueError as err:  # a task that is not tags at all
        return Reject(source_uri=record["source_uri"], stage=STAGE, reason="osum_sample_invalid", detail=f"{where}: {err}")
    row = {name: found.get(name) for name in ROW_COLUMNS if found.get(name) not in (None, "", [])}
    return row_record(row, record, ctx, where)


def _resolve(path: str, root: str) -> str:
    """A raw list's `wav` as written: absolute paths and URLs as they are, relative ones against the list's folder."""
    if "://" in path or path.startswith("/"):
        return path
    if "://" in root:
        protocol, folder = root.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(folder, path))}"
    return posixpath.normpath(posixpath.join(root, path))
