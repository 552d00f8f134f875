"""Hugging Face datasets as build sources: a `save_to_disk` folder, a folder of parquet files, a hub id.

Three layouts are recognised from their names alone (`hf_kind`):
- "save_to_disk": a folder written by `datasets.Dataset.save_to_disk` (`state.json`,
  `dataset_info.json`, `data-*.arrow`) or `DatasetDict.save_to_disk` (`dataset_dict.json` and one
  such folder per split);
- "parquet_folder": a folder holding `*.parquet` files (at the top, or one folder down as in
  `data/train-00000-of-00001.parquet` or `train/0000.parquet`) and no audio files at its top
  (a folder of audio with a metadata parquet beside it stays a folder of audio);
- "hub": `hf://datasets/ORG/NAME` (optionally `@REVISION` and a folder inside the repo), whose
  parquet files are read through huggingface_hub's `HfFileSystem`, pointed at `$HF_ENDPOINT`
  when set.

The unit of work is one data file (`hf_units`, listed in the driver: a dataset has few files);
`hf_unit_records` streams one file in record batches (never the whole file in memory) and gives one
record per row, built through `source_rows` so labels follow the same trust rules as a manifest's.

Columns. The dataset must have an audio column: one declared as the `datasets` Audio feature in
the schema's metadata, or any `struct<bytes, path>` column. The profile's `columns` maps OUR names
(`COLUMN_NAMES`) to the dataset's (`{text: sentence, gender: sex}`); a name left out is looked for
under our own name and skipped when absent; a name mapped to null is never read. A mapped column
the dataset lacks is an error naming it and the dataset's columns. Integer `ClassLabel` values are
read as their label names.

Each record's `source_uri` is `<dataset>/<data file, relative to the dataset root, without its
extension>/<row index within that file>`, e.g. `cv/train/data-00000-of-00002/41` or
`NAME/data/train-00000-of-00001/3`; `<dataset>` is the input folder's name (the repo's name for a
hub id). It is the row index within its *file*, not within its split, because each file is read
on its own (in a Beam DoFn) without the row counts of the files before it; it is as deterministic,
and stays stable when a split gains files.

A row's audio travels inline (`_audio_bytes`, the struct's bytes); a row whose bytes are null but
whose path is set points the decoder at that path (relative paths resolved against the dataset
root). A row without audio, or with a label outside the vocabulary, is a Reject of stage "source";
so is a file that cannot be read, or whose columns no longer fit the mapping: never an exception.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from echat.schemas.stage import Reject

from .source_rows import STAGE, SourceContext, base_record, row_record

KINDS = ("save_to_disk", "parquet_folder", "hub")
HUB_PREFIX = "hf://datasets/"
# Our manifest's column names (source_rows reads them), each of which the profile's `columns` may
# map to a dataset column; `audio` chooses among several audio columns.
COLUMN_NAMES = ("audio", "text", "language", "speaker", "gender", "age", "emotion", "events", "style", "source_kind")
ROWS_PER_BATCH = 64  # rows turned into Python objects at a time: 64 ten-second clips are ~20 MB
SCHEMA_BLOCK_BYTES = 256 * 1024  # a remote read of a file's schema fetches this much, not a 5 MB block
# Inputs that are files of another kind (manifests, audio, archives), told by name so that a
# remote one costs no request.
AUDIO_FILES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm")
NOT_FOLDERS = (".jsonl", ".csv", ".tsv", ".json", ".list", ".txt", ".tar", ".tgz", ".gz", ".zip", *AUDIO_FILES)
SUBFOLDERS_LOOKED_AT = 16  # hf_kind looks for parquet files in at most this many subfolders
_STATE, _INFO, _DICT = "state.json", "dataset_info.json", "dataset_dict.json"


class HfSourceError(ValueError):
    """A dataset that cannot be a source as given: no audio column, a mapped column it lacks..."""


def check_column_mapping(columns: dict[str, Any]) -> dict[str, str | None]:
    """The profile's `columns` mapping, checked: keys among COLUMN_NAMES, values column names or null."""
    if not isinstance(columns, dict):
        raise HfSourceError(f"columns maps our column names to the dataset's, got {columns!r}")
    unknown = sorted(k for k in columns if k not in COLUMN_NAMES)
    if unknown:
        raise HfSourceError(f"unknown name(s) {unknown}: columns maps some of {', '.join(COLUMN_NAMES)} "
                            f"to the dataset's column names")
    bad = {k: v for k, v in columns.items() if v is not None and (not isinstance(v, str) or not v.strip())}
    if bad:
        raise HfSourceError(f"its values are the dataset's column names (or null to not read one), got {bad}")
    return dict(columns)


# ---------------------------------------------------------------------------------------------
# what kind of input


def hf_kind(path: str) -> str | None:
    """"save_to_disk", "parquet_folder", "hub", or None for anything else (judged by a few names)."""
    if path.startswith("hf://"):
        return "hub" if path.startswith(HUB_PREFIX) and path[len(HUB_PREFIX):].count("/") >= 1 else None
    if path.lower().rstrip("/").endswith(NOT_FOLDERS):  # a manifest or an audio file: no listing needed
        return None
    names = _folder_entries(path)
    if names is None:
        return None
    if _DICT in names or (_STATE in names and any(n.endswith(".arrow") for n in names)):
        return "save_to_disk"
    if any(n.lower().endswith(AUDIO_FILES) for n in names):  # a folder of audio (a parquet beside it is metadata)
        return None
    if any(n.endswith(".parquet") and not is_dir for n, is_dir in names.items()):
        return "parquet_folder"
    subfolders = sorted(n for n, is_dir in names.items() if is_dir and not _hidden(n))[:SUBFOLDERS_LOOKED_AT]
    for sub in subfolders:
        inner = _folder_entries(_join(path, sub)) or {}
        if any(n.endswith(".parquet") for n in inner):
            return "parquet_folder"
    return None


def _folder_entries(path: str) -> dict[str, bool] | None:
    """{name: is a folder} of the folder's direct entries; None when `path` is not a folder."""
    if "://" in path:
        fs, inner = _fs(path)
        try:
            if not fs.isdir(inner):
                return None
            return {posixpath.basename(e["name"].rstrip("/")): e["type"] == "directory" for e in fs.ls(inner, detail=True)}
        except (FileNotFoundError, OSError):
            return None
    if not os.path.isdir(path):
        return None
    return {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(path)}  # a link loop must not raise


# ---------------------------------------------------------------------------------------------
# units: the data files


def hf_units(path: str, columns: dict) -> list[str]:
    """The dataset's data files (arrow or parquet), in a stable order, once every file's schema is
    checked against the mapping and found to hold an audio column (HfSourceError otherwise)."""
    mapping = check_column_mapping(columns or {})
    kind = hf_kind(path)
    if kind is None:
        raise HfSourceError(f"{path} is not a Hugging Face dataset: expected a save_to_disk folder ({_STATE} or "
                            f"{_DICT}), a folder of .parquet files, or {HUB_PREFIX}ORG/NAME")
    files = _save_to_disk_files(path) if kind == "save_to_disk" else _parquet_files(path)
    if not files:
        raise HfSourceError(f"no data files in {path} ({kind}): expected .arrow files listed by {_STATE}"
                            if kind == "save_to_disk" else f"no .parquet files in {path} ({kind})")
    for unit in files:
        resolve_columns(read_schema(unit, block_size=SCHEMA_BLOCK_BYTES), mapping, where=unit)
    return files


def _save_to_disk_files(root: str) -> list[str]:
    """The arrow files of a Dataset folder, or of every split of a DatasetDict folder, in order."""
    entries = _folder_entries(root) or {}
    if _DICT in entries:
        splits = json.loads(_read_bytes(_join(root, _DICT))).get("splits") or []
        return [f for split in splits for f in _dataset_files(_join(root, split))]
    return _dataset_files(root)


def _dataset_files(folder: str) -> list[str]:
    """A Dataset folder's arrow files as its state.json lists them (the order rows were written)."""
    try:
        state = json.loads(_read_bytes(_join(folder, _STATE)))
    except FileNotFoundError:
        raise HfSourceError(f"{folder} has no {_STATE}: not a folder written by datasets' save_to_disk") from None
    names = [d["filename"] for d in state.get("_data_files") or []]
    if not names:  # an older writer: every arrow file of the folder, by name
        names = sorted(n for n, is_dir in (_folder_entries(folder) or {}).items() if n.endswith(".arrow") and not is_dir)
    return [_join(folder, n) for n in names]


def _parquet_files(root: str) -> list[str]:
    """Every .parquet file below `root`, sorted, skipping hidden and `__` folders as `datasets` does."""
    if "://" in root:
        fs, inner = _fs(root)
        base = fs._strip_protocol(inner).rstrip("/")
        relative = [p[len(base) + 1:] for p in fs.find(base) if p.startswith(base + "/") and p.endswith(".parquet")]
        # spelled as the root is, so each file's source_uri is its path below the root
        return sorted(f"{root.rstrip('/')}/{r}" for r in relative if not any(_hidden(part) for part in r.split("/")))
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [os.path.join(folder, n) for n in names if n.endswith(".parquet") and not _hidden(n)]
    return sorted(found)


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))


# ---------------------------------------------------------------------------------------------
# schema: which column is the audio, which ones hold our fields


def read_schema(unit: str, block_size: int | None = None):
    """The pyarrow schema of one data file (with its `datasets` metadata), reading only its header
    (arrow) or footer (parquet)."""
    with _open(unit, block_size=block_size) as handle:
        return _reader_schema(_data_reader(unit, handle))


def resolve_columns(schema, columns: dict[str, str | None], where: str) -> tuple[str, dict[str, str]]:
    """(the audio column, {our name: dataset column} for the fields to read) for `schema`.

    Raises HfSourceError naming the mapped columns the dataset lacks, or the columns it has when
    none (or more than one, with no `columns.audio` to choose) is an audio column."""
    present = list(schema.names)
    missing = {ours: theirs for ours, theirs in columns.items() if theirs is not None and theirs not in present}
    if missing:
        said = ", ".join(f"{ours} -> {theirs!r}" for ours, theirs in missing.items())
        raise HfSourceError(f"{where}: the profile's columns map {said}, but the dataset has no such column; "
                            f"its columns: {', '.join(present)}")
    candidates = audio_columns(schema)
    chosen = columns.get("audio")
    if chosen is not None:
        if chosen not in candidates:
            raise HfSourceError(f"{where}: columns.audio is {chosen!r}, which is not an audio column "
                                f"(the datasets Audio feature or struct<bytes, path>); audio columns: "
                                f"{', '.join(candidates) or 'none'}")
        audio = chosen
    elif len(candidates) == 1:
        audio = candidates[0]
    elif "audio" in candidates:
        audio = "audio"
    elif not candidates:
        raise HfSourceError(f"{where}: no audio column (the datasets Audio feature, or a struct<bytes, path> column); "
                            f"its columns: {', '.join(f'{f.name} ({f.type})' for f in schema)}")
    else:
        raise HfSourceError(f"{where}: several audio columns ({', '.join(candidates)}); choose one with columns.audio")
    fields = {}
    for ours in COLUMN_NAMES[1:]:
        theirs = columns.get(ours, ours)
        if theirs is not None and theirs in present and theirs != audio:
            fields[ours] = theirs
    return audio, fields


def audio_columns(schema) -> list[str]:
    """The columns holding audio, in schema order: the `datasets` Audio feature, or struct<bytes, path>."""
    declared = {name for name, feature in hf_features(schema).items()
                if isinstance(feature, dict) and feature.get("_type") == "Audio"}
    return [f.name for f in schema if f.name in declared or _is_audio_struct(f.type)]


def hf_features(schema) -> dict[str, Any]:
    """The `datasets` features the file's schema metadata declares (empty when it has none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features")
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def _is_audio_struct(arrow_type) -> bool:
    import pyarrow as pa

    if not pa.types.is_struct(arrow_type):
        return False
    names = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
    return ("bytes" in names and "path" in names
            and (pa.types.is_binary(names["bytes"]) or pa.types.is_large_binary(names["bytes"]))
            and (pa.types.is_string(names["path"]) or pa.types.is_large_string(names["path"])))


# ---------------------------------------------------------------------------------------------
# records: one per row


def hf_unit_records(unit: str, ctx: SourceContext, columns: dict) -> Iterator[dict[str, Any] | Reject]:
    """One record (or Reject) per row of the data file `unit`, streamed batch by batch."""
    file_uri = source_file_uri(unit, ctx.root)
    try:
        mapping = check_column_mapping(columns or {})
        with _open(unit) as handle:
            reader = _data_reader(unit, handle)
            schema = _reader_schema(reader)
            audio, fields = resolve_columns(schema, mapping, where=file_uri)
            features = hf_features(schema)
            names = {ours: _label_names(features.get(theirs)) for ours, theirs in fields.items()}
            wanted = [audio, *dict.fromkeys(fields.values())]
            row_index = 0
            for batch in _batches(reader, wanted):
                for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                    for row in batch.slice(start, ROWS_PER_BATCH).to_pylist():
                        yield _row_outcome(row, f"{file_uri}/{row_index}", ctx, audio, fields, names)
                        row_index += 1
    except HfSourceError as exc:
        yield Reject(source_uri=file_uri, stage=STAGE, reason="columns_mismatch", detail=str(exc))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: a corrupt or cut-off file
        detail = f"{type(exc).__name__}: {exc}".replace(unit, file_uri)  # published: no path of this machine
        yield Reject(source_uri=file_uri, stage=STAGE, reason="unreadable_file", detail=detail)


def _data_reader(unit: str, handle):
    """A parquet file, or an arrow IPC reader, over an open file."""
    if unit.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(handle)
    return _ipc_reader(handle)


def _reader_schema(reader):
    return getattr(reader, "schema_arrow", None) or reader.schema


def _batches(reader, wanted: list[str]):
    """The record batches of `reader`, holding only the `wanted` columns."""
    import pyarrow.parquet as pq

    if isinstance(reader, pq.ParquetFile):  # the projection is pushed down: unmapped columns are never fetched
        yield from reader.iter_batches(batch_size=ROWS_PER_BATCH, columns=wanted)
        return
    if hasattr(reader, "num_record_batches"):  # the IPC file format: batches by index
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:  # the IPC stream format (what save_to_disk writes): batches in order
        batches = iter(reader)
    for batch in batches:
        yield batch.select(wanted)


def _row_outcome(row: dict[str, Any], source_uri: str, ctx: SourceContext, audio: str, fields: dict[str, str],
                 names: dict[str, list[str] | None]) -> dict[str, Any] | Reject:
    """The record for one row, or the Reject saying why it cannot be one."""
    try:
        value = row.get(audio)
        data, path = _audio_of(value)
        if data:
            record = base_record(source_uri, ctx, source_uri=source_uri, audio_bytes=data)
        elif path:
            record = base_record(_resolve_audio_path(path, ctx.root), ctx, source_uri=source_uri)
        else:
            return Reject(source_uri=source_uri, stage=STAGE, reason="no_audio",
                          detail=f"column {audio!r} holds neither bytes nor a path: {_brief(value)}")
        given = {ours: _class_name(row.get(theirs), names.get(ours)) for ours, theirs in fields.items()}
        return row_record(given, record, ctx, where=source_uri)
    except Exception as exc:  # noqa: BLE001 - one odd row must not stop the build
        return Reject(source_uri=source_uri, stage=STAGE, reason="row_invalid", detail=f"{type(exc).__name__}: {exc}")


def _audio_of(value) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an audio cell: the Audio struct, or a bare path or bytes."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def _brief(value) -> str:
    return "null" if value is None else repr(value)[:200]


def _label_names(feature) -> list[str] | None:
    """A ClassLabel feature's names (its integers are indexes into them)."""
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return feature["names"]
    return None


def _class_name(value, names: list[str] | None):
    if names is not None and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    return value


def _resolve_audio_path(path: str, root: str) -> str:
    """An Audio struct's path: a URI or absolute path as it is, a relative one against the dataset root."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in root:
        return posixpath.join(root.rstrip("/"), path)
    return os.path.normpath(os.path.join(root, path))


def source_file_uri(unit: str, root: str) -> str:
    """`<dataset>/<unit relative to root, without extension>`: the prefix of its rows' source_uri."""
    base = root.rstrip("/")
    name = posixpath.basename(base.split("://", 1)[-1]).split("@", 1)[0] or "dataset"
    if "://" in unit or "://" in base:
        relative = unit[len(base) + 1:] if unit.startswith(base + "/") else posixpath.basename(unit)
    else:
        absolute, top = os.path.abspath(unit), os.path.abspath(base)
        inside = os.path.commonpath([absolute, top]) == top and absolute != top
        relative = os.path.relpath(absolute, top).replace(os.sep, "/") if inside else os.path.basename(unit)
    stem, _ = posixpath.splitext(relative)
    return f"{name}/{stem}"


# ---------------------------------------------------------------------------------------------
# opening files: local, object stores and the Hub through fsspec


def _ipc_reader(handle):
    """An arrow IPC reader: datasets writes the stream format; the file format (magic ARROW1) works too."""
    import pyarrow as pa

    magic = handle.read(6)
    handle.seek(0)
    return pa.ipc.open_file(handle) if magic == b"ARROW1" else pa.ipc.open_stream(handle)


def _open(path: str, block_size: int | None = None):
    """A seekable binary file: memory-mapped when local (batches are read in place), else fsspec's
    (gs://, s3://, hf://), so only the byte ranges read are fetched."""
    if "://" not in path:
        import pyarrow as pa

        return pa.memory_map(path, "r")
    fs, inner = _fs(path)
    options = {"block_size": block_size} if block_size else {}
    return fs.open(inner, "rb", **options)


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        with open(path, "rb") as handle:
            return handle.read()
    fs, inner = _fs(path)
    return fs.cat_file(inner)


def _fs(path: str):
    """(file system, path inside it). hf:// goes to the Hub at $HF_ENDPOINT, read when called, so a
    process that sets it after importing huggingface_hub still reaches the endpoint it names."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return HfFileSystem(endpoint=os.environ.get("HF_ENDPOINT") or None), path
    import fsspec

    return fsspec.core.url_to_fs(path)


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)
