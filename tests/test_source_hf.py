"""Hugging Face datasets as build sources (pipelines/source_hf.py): save_to_disk folders (one
Dataset, a DatasetDict), parquet folders and `hf://datasets/ORG/NAME` on a local stand-in for the Hub.

Datasets are made here with `datasets` itself from real WAV bytes (soundfile); records are checked
for their ids, their labels through the profile's column mapping, and audio that the shared decoder
(labelers/decode.py) turns back into the samples written.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from echat.labelers.decode import AUDIO_BYTES_KEY, SOURCE_PATH_KEY, DecodeAudio
from echat.pipelines import source_hf
from echat.pipelines.source_hf import HfSourceError, hf_kind, hf_unit_records, hf_units
from echat.pipelines.source_rows import SourceContext
from echat.schemas.stage import Reject

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubStandIn  # noqa: E402

datasets = pytest.importorskip("datasets")

RATE = 16000
MAPPING = {"text": "sentence", "gender": "sex", "emotion": "emo", "speaker": "client_id"}
SENTENCES = ["good morning", "the train is late again", "what a lovely day", "who broke the vase"]
SEXES = ["male", "female", "F", "female"]  # "F" is an alias of female (schemas/labels.py)
EMOTIONS = ["happy", "anger", "furious", "sad"]  # "furious" is outside the vocabulary: that row is rejected


def samples(i: int) -> np.ndarray:
    """Row i's int16 samples: distinct per row, so a mix-up of rows shows."""
    rng = np.random.default_rng(i)
    n = RATE // 2 + 1000 * i
    tone = 0.4 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(n) / RATE) + 0.05 * rng.standard_normal(n)
    return np.round(np.clip(tone, -1, 1) * 20000).astype(np.int16)


def wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_dataset(rows: int = 4, with_missing_audio: bool = True):
    """Rows 0..rows-1 with WAV audio, plus one row without audio (index `rows`) when asked."""
    audio = [{"bytes": wav_bytes(samples(i)), "path": f"clip{i}.wav"} for i in range(rows)]
    columns = {"sentence": SENTENCES[:rows], "sex": SEXES[:rows], "emo": EMOTIONS[:rows],
               "client_id": [f"spk{i % 2}" for i in range(rows)], "extra": list(range(rows))}
    if with_missing_audio:
        audio.append(None)
        for name, values in columns.items():
            values.append(values[0])
    ds = datasets.Dataset.from_dict({"audio": audio, **columns})
    return ds.cast_column("audio", datasets.Audio(sampling_rate=RATE))


def ctx_for(root, trust=True) -> SourceContext:
    from echat.pipelines.source_rows import trusted_groups

    return SourceContext(root=str(root), dataset_name="hf-test", license="cc-by-4.0", trust_manifest=trusted_groups(trust))


def read_all(root, columns=MAPPING, trust=True):
    ctx = ctx_for(root, trust)
    out = []
    for unit in hf_units(str(root), columns):
        out.extend(hf_unit_records(unit, ctx, columns))
    return out


def uri_of(outcome) -> str:
    return outcome.source_uri if isinstance(outcome, Reject) else outcome["source_uri"]


def decoded(record) -> np.ndarray:
    [out] = list(DecodeAudio().process(record))
    assert not isinstance(out, Reject), out
    return out["_waveform"]


def check_rows(outcomes, prefix: str, rows: int = 4):
    """The records of make_dataset(rows) read with MAPPING: labels, ids, audio, and the two rejects."""
    records = {o["source_uri"]: o for o in outcomes if isinstance(o, dict)}
    rejects = {o.source_uri: o for o in outcomes if isinstance(o, Reject)}
    assert sorted(records) == [f"{prefix}/{i}" for i in range(rows) if i != 2]
    assert {u: (r.stage, r.reason) for u, r in rejects.items()} == {
        f"{prefix}/2": ("source", "invalid_label"), f"{prefix}/{rows}": ("source", "no_audio")}
    assert "furious" in rejects[f"{prefix}/2"].detail
    for i in (0, 1, 3):
        record = records[f"{prefix}/{i}"]
        assert record["transcript"] == SENTENCES[i] and record["transcript_origin"] == "manifest"
        assert record["gender"] == ("male" if i == 0 else "female") and record["gender_model"] == "manifest"
        assert record["emotion"] == EMOTIONS[i] and record["speaker"] == f"spk{i % 2}"
        assert record["source_dataset"] == "hf-test" and record["license"] == "cc-by-4.0"
        np.testing.assert_allclose(decoded(record), samples(i) / 32768.0, atol=1e-6)
    return records


# ---------------------------------------------------------------------------------------------
# local layouts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A save_to_disk Dataset folder, a DatasetDict folder and a parquet folder of the same rows."""
    root = tmp_path_factory.mktemp("hf")
    ds = make_dataset()
    ds.save_to_disk(str(root / "speech"))
    datasets.DatasetDict({"train": ds, "test": make_dataset(rows=2, with_missing_audio=False)}).save_to_disk(str(root / "dict"))
    (root / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "pq" / "data" / "train-00000-of-00001.parquet"))
    return root


def test_kinds_are_told_from_names(layouts, tmp_path):
    assert hf_kind(str(layouts / "speech")) == "save_to_disk"
    assert hf_kind(str(layouts / "dict")) == "save_to_disk"
    assert hf_kind(str(layouts / "pq")) == "parquet_folder"  # parquet one folder down, in data/
    assert hf_kind("hf://datasets/org/speech") == "hub"
    assert hf_kind("hf://datasets/org/speech@v1/data") == "hub"
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(wav_bytes(samples(0)))
    pq.write_table(pa.table({"speaker": ["a"]}), tmp_path / "audio" / "speakers.parquet")  # metadata beside audio
    (tmp_path / "manifest.jsonl").write_text("{}\n")
    for other in (tmp_path / "audio", tmp_path / "manifest.jsonl", tmp_path / "nope", "hf://org/model", "gs://b/x.jsonl"):
        assert hf_kind(str(other)) is None, other


def test_save_to_disk_folder_gives_the_rows_with_mapped_labels(layouts):
    assert hf_units(str(layouts / "speech"), MAPPING) == [str(layouts / "speech" / "data-00000-of-00001.arrow")]
    records = check_rows(read_all(layouts / "speech"), "speech/data-00000-of-00001")
    assert all(AUDIO_BYTES_KEY in r and SOURCE_PATH_KEY not in r for r in records.values())  # audio inline


def test_a_folder_on_an_object_store_reads_through_fsspec(layouts):
    """The same save_to_disk folder under memory:// (fsspec's in-process store, standing in for gs://)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in (layouts / "dict").rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/store/{path.relative_to(layouts).as_posix()}", path.read_bytes())
    try:
        root = "memory://store/dict"
        assert hf_kind(root) == "save_to_disk"
        units = hf_units(root, MAPPING)
        assert units == [f"{root}/train/data-00000-of-00001.arrow", f"{root}/test/data-00000-of-00001.arrow"]
        outcomes = read_all(root)
        check_rows([o for o in outcomes if uri_of(o).startswith("dict/train/")], "dict/train/data-00000-of-00001")
        assert len(outcomes) == 7
    finally:
        memory.rm("/store", recursive=True)


def test_dataset_dict_folder_reads_every_split(layouts):
    outcomes = read_all(layouts / "dict")
    check_rows([o for o in outcomes if uri_of(o).startswith("dict/train/")], "dict/train/data-00000-of-00001")
    test_split = [o for o in outcomes if uri_of(o).startswith("dict/test/")]
    assert [o["source_uri"] for o in test_split] == ["dict/test/data-00000-of-00001/0", "dict/test/data-00000-of-00001/1"]
    assert [o["transcript"] for o in test_split] == SENTENCES[:2]
    assert len(outcomes) == 5 + 2


def test_parquet_folder_gives_the_same_records(layouts):
    from_parquet = check_rows(read_all(layouts / "pq"), "pq/data/train-00000-of-00001")
    from_arrow = {r["source_uri"]: r for r in read_all(layouts / "speech") if isinstance(r, dict)}
    strip = lambda uri: uri.rsplit("/", 1)[1]  # noqa: E731 - the row index
    assert {strip(u): {k: v for k, v in r.items() if k != "source_uri"} for u, r in from_parquet.items()} == \
           {strip(u): {k: v for k, v in r.items() if k != "source_uri"} for u, r in from_arrow.items()}


def test_untrusted_labels_become_the_reference(layouts):
    records = [r for r in read_all(layouts / "speech", trust=["transcript"]) if isinstance(r, dict)]
    first = next(r for r in records if r["source_uri"].endswith("/0"))
    assert first["transcript"] == SENTENCES[0] and "gender" not in first
    assert first["_reference"] == {"gender": "male", "emotion": "happy"}


def test_default_mapping_reads_our_names_and_null_skips_one(tmp_path):
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": wav_bytes(samples(0)), "path": None}],
                                     "text": ["hello there"], "gender": ["female"], "age": ["twenties"]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "cv"))
    [bad] = read_all(tmp_path / "cv", columns={})  # age "twenties" is not a label: read as-is, so rejected
    assert isinstance(bad, Reject) and bad.reason == "invalid_label" and "twenties" in bad.detail
    [record] = read_all(tmp_path / "cv", columns={"age": None})  # null: the column is not read
    assert record["transcript"] == "hello there" and record["gender"] == "female" and "age" not in record
    assert record["source_uri"] == "cv/data-00000-of-00001/0"


def test_class_label_integers_are_read_as_their_names(tmp_path):
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": wav_bytes(samples(i)), "path": None} for i in range(2)],
                                     "sex": [1, 0]})
    ds = ds.cast_column("audio", datasets.Audio()).cast_column("sex", datasets.ClassLabel(names=["male", "female"]))
    ds.save_to_disk(str(tmp_path / "cl"))
    assert [r["gender"] for r in read_all(tmp_path / "cl", columns={"gender": "sex"})] == ["female", "male"]


def test_a_row_with_only_a_path_is_decoded_from_beside_the_dataset(tmp_path):
    """A plain struct<bytes, path> column (no datasets metadata) whose bytes are null: the path is
    resolved against the dataset folder and decoded from there."""
    root = tmp_path / "paths"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "x.wav").write_bytes(wav_bytes(samples(3)))
    audio = pa.array([{"bytes": None, "path": "clips/x.wav"}, {"bytes": None, "path": None}],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"wav": audio, "text": ["one", "two"]}), root / "part-0.parquet")
    assert hf_kind(str(root)) == "parquet_folder"
    record, missing = read_all(root, columns={})
    assert record[SOURCE_PATH_KEY] == str(root / "clips" / "x.wav") and AUDIO_BYTES_KEY not in record
    assert record["source_uri"] == "paths/part-0/0" and record["transcript"] == "one"
    np.testing.assert_allclose(decoded(record), samples(3) / 32768.0, atol=1e-6)
    assert isinstance(missing, Reject) and missing.reason == "no_audio" and "'wav'" in missing.detail


# ---------------------------------------------------------------------------------------------
# errors that name the thing


def test_a_mapped_column_the_dataset_lacks_is_an_error_naming_it_and_the_columns(layouts):
    with pytest.raises(HfSourceError) as err:
        hf_units(str(layouts / "speech"), {"text": "transcription", "gender": "sex"})
    message = str(err.value)
    assert "text -> 'transcription'" in message and "sex" not in message.split("its columns")[0]
    assert "its columns: audio, sentence, sex, emo, client_id, extra" in message
    with pytest.raises(HfSourceError, match=r"unknown name\(s\) \['txt'\]"):
        hf_units(str(layouts / "speech"), {"txt": "sentence"})


def test_no_audio_column_and_several_are_errors_naming_the_columns(tmp_path):
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"sentence": ["a"], "path": ["a.wav"]}), tmp_path / "text" / "t.parquet")
    with pytest.raises(HfSourceError, match=r"no audio column .*its columns: sentence \(string\), path \(string\)"):
        hf_units(str(tmp_path / "text"), {})
    two = datasets.Dataset.from_dict({"mic": [{"bytes": b"x", "path": None}], "phone": [{"bytes": b"y", "path": None}],
                                      "note": ["n"]})
    two.cast_column("mic", datasets.Audio()).cast_column("phone", datasets.Audio()).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(HfSourceError, match=r"several audio columns \(mic, phone\); choose one with columns.audio"):
        hf_units(str(tmp_path / "two"), {})
    assert len(hf_units(str(tmp_path / "two"), {"audio": "phone"})) == 1
    with pytest.raises(HfSourceError, match=r"map audio -> 'nope', but .* its columns: mic, phone, note"):
        hf_units(str(tmp_path / "two"), {"audio": "nope"})
    with pytest.raises(HfSourceError, match=r"columns.audio is 'note', which is not an audio column .* audio columns: mic, phone"):
        hf_units(str(tmp_path / "two"), {"audio": "note"})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "README.md").write_text("no data here")
    with pytest.raises(HfSourceError, match="plain is not a Hugging Face dataset"):
        hf_units(str(tmp_path / "plain"), {})


def test_a_cut_off_file_ends_in_a_reject_not_an_exception(layouts, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(layouts / "speech", folder)
    arrow = folder / "data-00000-of-00001.arrow"
    [unit] = hf_units(str(folder), MAPPING)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    outcomes = list(hf_unit_records(unit, ctx_for(folder), MAPPING))
    assert isinstance(outcomes[-1], Reject) and outcomes[-1].reason == "unreadable_file"
    assert outcomes[-1].source_uri == "cut/data-00000-of-00001" and str(tmp_path) not in outcomes[-1].detail


def test_rows_are_streamed_batch_by_batch(tmp_path, monkeypatch):
    """A parquet file of 40 MB in row groups of 16 rows, read 8 rows a batch, is never held whole:
    arrow's memory peaks at about a row group while the records go by one at a time."""
    monkeypatch.setattr(source_hf, "ROWS_PER_BATCH", 8)
    rng = np.random.default_rng(0)
    clips = [wav_bytes(rng.integers(-3000, 3000, RATE * 10, dtype=np.int16)) for _ in range(128)]  # 320 kB each
    audio = pa.array([{"bytes": c, "path": None} for c in clips], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"audio": audio}), tmp_path / "big.parquet", row_group_size=16, compression="none",
                   use_dictionary=False)
    size = (tmp_path / "big.parquet").stat().st_size
    pool = pa.default_memory_pool()
    before, peak, count = pool.bytes_allocated(), 0, 0
    for record in hf_unit_records(str(tmp_path / "big.parquet"), ctx_for(tmp_path), {}):
        assert isinstance(record, dict) and record[AUDIO_BYTES_KEY] == clips[count]
        peak = max(peak, pool.bytes_allocated() - before)
        count += 1
    assert count == 128 and size > 40e6
    assert peak < size / 4, (peak, size)


# ---------------------------------------------------------------------------------------------
# the Hub (a local stand-in for it: tests/hub_server.py)


@pytest.fixture
def hub(layouts, monkeypatch):
    """A local stand-in for the Hugging Face Hub (tests/hub_server.py), holding `org/speech`: the
    parquet folder's files, a README and a hidden folder, at $HF_ENDPOINT as a user would set it."""
    with HubStandIn() as stand_in:
        files = {p.relative_to(layouts / "pq").as_posix(): p.read_bytes() for p in (layouts / "pq").rglob("*.parquet")}
        stand_in.add_dataset("org/speech", {**files, "README.md": b"---\nlicense: cc-by-4.0\n---\n",
                                            ".cache/old.parquet": b"not read"})
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
        yield stand_in


def test_hub_dataset_gives_the_same_records(hub, layouts):
    root = "hf://datasets/org/speech"
    assert hf_kind(root) == "hub"
    assert hf_units(root, MAPPING) == [f"{root}/data/train-00000-of-00001.parquet"]
    from_hub = check_rows(read_all(root), "speech/data/train-00000-of-00001")
    from_folder = {r["source_uri"]: r for r in read_all(layouts / "pq") if isinstance(r, dict)}
    assert {u.split("/", 1)[1]: r[AUDIO_BYTES_KEY] for u, r in from_hub.items()} == \
           {u.split("/", 1)[1]: r[AUDIO_BYTES_KEY] for u, r in from_folder.items()}
    # it went through the Hub's read API, at the endpoint $HF_ENDPOINT names
    paths = {p for _, p in hub.requests}
    assert "/api/datasets/org/speech/tree/main" in paths
    assert "/datasets/org/speech/resolve/main/data/train-00000-of-00001.parquet" in paths


def test_hub_revision_and_folder_and_missing_repo(hub):
    root = "hf://datasets/org/speech@main/data"
    [unit] = hf_units(root, MAPPING)
    first = next(iter(hf_unit_records(unit, ctx_for(root), MAPPING)))
    assert first["source_uri"] == "data/train-00000-of-00001/0" and first["transcript"] == SENTENCES[0]
    with pytest.raises(FileNotFoundError, match="org/missing"):
        hf_units("hf://datasets/org/missing", {})
    with pytest.raises(HfSourceError, match="its columns: audio, sentence"):
        hf_units("hf://datasets/org/speech", {"text": "transcription"})


# ---------------------------------------------------------------------------------------------
# the profile option


def test_profile_columns_option_and_set_override():
    from echat.pipelines.profile import ProfileError, load_profile

    assert load_profile("local").columns == {}
    profile = load_profile("local", ["columns.text=sentence", "columns.gender=sex", "columns.age=null"])
    assert profile.columns == {"text": "sentence", "gender": "sex", "age": None}
    with pytest.raises(ProfileError, match=r"columns: unknown name\(s\) \['sentence'\]"):
        load_profile("local", ["columns.sentence=text"])
    with pytest.raises(ProfileError, match="columns: its values are the dataset's column names"):
        load_profile("local", ['columns.text=" "'])
    assert load_profile("local", ["columns.text="]).columns == {"text": None}  # empty: null, the column is not read


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_build_from_hf_dataset_folder(local_profile, tmp_path):
    """`echat build --input <save_to_disk folder>` with the labels mapped by `--set columns.*`."""
    from echat.pipelines.build import build
    from echat.synth.demo_corpus import make_demo_corpus

    make_demo_corpus(tmp_path / "demo", n=4, overwrite=True)
    manifest = [json.loads(line) for line in (tmp_path / "demo" / "manifest.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": (tmp_path / "demo" / e["path"]).read_bytes(), "path": Path(e["path"]).name} for e in manifest],
        "sentence": [e["text"] for e in manifest], "lang": [e["language"] for e in manifest],
        "sex": [e["gender"] for e in manifest], "emo": [e["emotion"] for e in manifest],
    }).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "voices"))
    profile = local_profile("columns.text=sentence", "columns.language=lang", "columns.gender=sex", "columns.emotion=emo")
    summary = build(profile, str(tmp_path / "voices"), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["sources"] == len(manifest)
    rows = [r for shard in sorted((tmp_path / "out" / "data").glob("train-*.parquet")) for r in pq.read_table(shard).to_pylist()]
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source_uri"], []).append(r)
    assert sorted(by_source) == [f"voices/data-00000-of-00001/{i}" for i in range(len(manifest))]
    for i, entry in enumerate(manifest):
        first = by_source[f"voices/data-00000-of-00001/{i}"][0]
        assert first["language"] == entry["language"] and first["gender"] == entry["gender"]
        assert first["emotion"] == entry["emotion"] and first["transcript_origin"] == "manifest"
        assert first["audio"]["bytes"] and first["reply_text"].strip()
