"""One definition of how a described input becomes a starting record, whatever the source format.

Every source (a folder, a manifest, a Hugging Face dataset, an OSUM raw list, a WeNet tar shard)
describes each of its audio inputs as a *row*: a dict with the manifest's column names (`text`,
`language`, `speaker`, `gender`, `age`, `emotion`, `events`, `style`, `source_kind`). `row_record`
turns it into the record the first stage reads, applying the profile's trust rules, so the label
aliases, the trusted/reference split and the errors are the same for every format.

Each record's `source_uri` is the input's location relative to the input root, so shards, rejects
and ids carry no path of the building machine and a corpus moved elsewhere keeps its ids; the full
location travels as the working key `_source_path`, or the audio itself as `_audio_bytes` when
the source holds it inline (a tar member, a dataset's Audio column).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from echat.labelers.decode import AUDIO_BYTES_KEY, SOURCE_PATH_KEY
from echat.schemas import labels
from echat.schemas.stage import Reject

STAGE = "source"  # the stage name of every reject a source makes
REFERENCE_KEY = "_reference"  # the manifest's untrusted labels, scored in pipelines/accuracy.py

# Manifest label columns; each is normalised through schemas/labels.py (aliases, case, OSUM forms).
LABEL_COLUMNS = ("gender", "age", "emotion", "style", "language")


@dataclass(frozen=True)
class SourceContext:
    """What every source reader needs from the profile and the command line."""

    root: str  # the input root: source_uri is relative to it
    dataset_name: str
    license: str | None = None
    trust_manifest: frozenset[str] = frozenset()  # label groups whose given values are taken as true
    language: str | None = None  # given to every record that has none (origin "profile")

    @classmethod
    def from_profile(cls, profile, root: str) -> "SourceContext":
        return cls(root=root, dataset_name=profile.dataset_name, license=profile.license,
                   trust_manifest=trusted_groups(profile.trust_manifest), language=profile.language)


def trusted_groups(trust_manifest) -> frozenset[str]:
    """The profile's `trust_manifest` (True, False, or a list of label groups) as a set of groups."""
    from echat.schemas.record import LABEL_GROUPS

    if trust_manifest is True:
        return frozenset(LABEL_GROUPS)
    return frozenset(trust_manifest or ())


def base_record(uri: str, ctx: SourceContext, *, source_uri: str | None = None,
                audio_bytes: bytes | None = None) -> dict[str, Any]:
    """A source's first record. `source_uri` defaults to `uri` relative to the input root; with
    `audio_bytes` the record carries its audio inline and `uri` only names it."""
    record = {"source_uri": source_uri or relative_uri(uri, ctx.root), "source_dataset": ctx.dataset_name,
              "source_kind": "real", "license": ctx.license}
    if audio_bytes is not None:
        record[AUDIO_BYTES_KEY] = audio_bytes
    else:
        record[SOURCE_PATH_KEY] = _codable(uri)
    return record


def row_record(row: dict[str, Any], record: dict[str, Any], ctx: SourceContext, where: str) -> dict[str, Any] | Reject:
    """`record` (from `base_record`) with the row's speaker, transcript and labels applied under the
    trust rules, or the Reject naming `where` and the bad value."""
    problem = apply_manifest_fields(record, row, ctx.trust_manifest)
    if problem:
        return Reject(source_uri=record["source_uri"], stage=STAGE, reason="invalid_label", detail=f"{where}: {problem}")
    if ctx.language and record.get("language") is None:
        record.update(language=ctx.language, language_origin="profile")
    return record


def apply_manifest_fields(record: dict[str, Any], row: dict[str, Any], trusted: frozenset[str]) -> str | None:
    """Copy the manifest's speaker, and its transcript and labels of the `trusted` groups, into
    `record`; the other groups' values go to `record["_reference"]`. A problem as text."""
    if row.get("speaker"):
        record["speaker"] = str(row["speaker"])
    if row.get("source_kind"):  # how the row's audio came to be: a property of the source, always kept
        try:
            record["source_kind"] = labels.normalise("source_kind", str(row["source_kind"]))
        except labels.LabelError as err:
            return str(err)
    given: dict[str, Any] = {}  # group -> fields, as a trusted group writes them
    text = row.get("text") or row.get("transcript") or row.get("txt")
    if text:
        given["transcript"] = {"transcript": str(text).strip(), "transcript_origin": "manifest", "transcript_confidence": 1.0}
    problem = manifest_labels(row, given)
    if problem:
        return problem
    reference = {}
    for group, fields in given.items():
        if group in trusted:
            record.update(fields)
        else:
            reference[group] = fields[group]
    if reference:
        record[REFERENCE_KEY] = reference
    return None


def manifest_labels(row: dict[str, Any], given: dict[str, Any]) -> str | None:
    """Add the row's normalised labels to `given` (group -> fields); a problem as text."""
    try:
        for name in LABEL_COLUMNS:
            value = row.get(name)
            if value in (None, ""):
                continue
            normalised = labels.normalise(name, str(value))
            if name == "language":
                given[name] = {"language": normalised, "language_origin": "manifest"}
            else:
                given[name] = {name: normalised, f"{name}_score": 1.0, f"{name}_model": "manifest"}
        events = row.get("events")
        if isinstance(events, str):  # CSV: "cough;laugh"; an empty cell says nothing
            events = [e.strip() for e in events.replace(";", ",").split(",") if e.strip()] or None
        if events is not None:  # an explicit empty list is ground truth too: nothing was heard
            if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
                return f"events must be a list of names, got {events!r}"
            given["events"] = {"events": labels.normalise_events(events), "events_score": 1.0, "events_model": "manifest"}
    except labels.LabelError as err:
        return str(err)
    return None


def _codable(path: str) -> str | bytes:
    """A path as Beam can carry it: text, or the file system's bytes for a name that is not UTF-8
    (Beam encodes text as UTF-8, which a surrogate-escaped name cannot be)."""
    import os

    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def relative_uri(uri: str, root: str) -> str:
    """`uri` relative to `root` (posix separators). A file outside the root becomes
    `external/<hash of its folder>/<name>`: stable, unique, and no path of this machine.
    Bytes of a file name that are not UTF-8 are written as `\\xNN` (lossless, and valid text)."""
    return printable_name(_relative(uri, root))


def printable_name(name: str | bytes) -> str:
    """A file name as valid UTF-8 text: undecodable bytes (surrogate escapes) become `\\xNN`."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def _relative(uri: str, root: str) -> str:
    import hashlib
    import os

    if "://" in uri or "://" in root:
        base = root.rstrip("/") + "/"
        if uri.startswith(base):
            return uri[len(base):]
        folder, name = posixpath.split(uri)
    else:
        absolute, base = os.path.abspath(uri), os.path.abspath(root)
        if os.path.commonpath([absolute, base]) == base and absolute != base:
            return os.path.relpath(absolute, base).replace(os.sep, "/")
        folder, name = os.path.split(absolute)
    digest = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"external/{digest}/{name}"


