"""Sources listed and read inside the pipeline (pipelines/read_sources.py), on the real Beam runner.

The driver only probes the input (it stops at the first audio file); folders, manifests, OSUM
lists and Hugging Face files are read by DoFns; duplicates are rejected after a GroupByKey; what
a folder held besides audio reaches the summary through Beam counters.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import soundfile as sf

from echat.pipelines import sources
from echat.pipelines.read_sources import RESUMED, ReadSources, skipped_counts
from echat.pipelines.source_rows import SourceContext

def _keep(element, folder: str) -> None:
    """Collect an element as a pickle file: workers may not share this module's memory."""
    import os
    import pickle
    import uuid

    with open(os.path.join(folder, uuid.uuid4().hex), "wb") as handle:
        pickle.dump(element, handle)


def _kept(folder: Path) -> list:
    import pickle

    return [pickle.loads(p.read_bytes()) for p in folder.iterdir()]


def _read(input_path: str, **kw):
    """(records, rejects, tallies, counters) of ReadSources over `input_path`, run on the Python direct runner."""
    import tempfile

    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from echat.pipelines.summary import read_counters

    probe = sources.probe_input(input_path)
    ctx = SourceContext(root=probe.root, dataset_name="d", trust_manifest=frozenset({"transcript"}))
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name in ("records", "rejects", "tallies")}
        for folder in outs.values():
            folder.mkdir()
        pipeline = beam.Pipeline(runner=FnApiRunner())
        pcolls = pipeline | ReadSources(input_path, ctx, probe=probe, **kw)
        for (name, folder), pcoll in zip(outs.items(), pcolls):
            pcoll | f"Keep{name}" >> beam.Map(_keep, str(folder))
        result = pipeline.run()
        result.wait_until_finish()
        records, rejects, tallies = (_kept(folder) for folder in outs.values())
    return sorted(records, key=lambda r: r["source_uri"]), rejects, dict(tallies), read_counters(result)


def _empty_wavs(folder: Path, names) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def _tone(seconds=1.0, rate=16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, (0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


# ---------------------------------------------------------------- folders


def test_the_probe_stops_at_the_first_audio_file(tmp_path):
    _empty_wavs(tmp_path, [f"d{i}/c{j}.wav" for i in range(20) for j in range(10)])
    probe = sources.probe_input(str(tmp_path))
    assert probe.kind == sources.ROOT_FOLDER and probe.root == str(tmp_path)
    # at most the root's 20 entries and one subfolder's first file: never the 200 files
    assert probe.entries_seen <= 21, probe.entries_seen


def test_a_folder_is_listed_by_the_pipeline_and_never_by_the_driver(tmp_path, monkeypatch, local_profile):
    from echat.pipelines.build import build

    names = ["top.wav"] + [f"spk{i}/part{j}/u{k}.wav" for i in range(3) for j in range(2) for k in range(4)]
    folder = tmp_path / "in"
    _empty_wavs(folder, names)
    (folder / "notes.txt").write_text("not audio")
    (folder / "spk0" / "x.wav").mkdir()
    probes = []
    real_probe = sources.probe_input

    def probe(*args, **kw):
        probes.append(real_probe(*args, **kw))
        return probes[-1]

    def no_listing(*args, **kw):
        raise AssertionError("the driver listed the whole input")

    monkeypatch.setattr(sources, "probe_input", probe)
    monkeypatch.setattr(sources, "list_sources", no_listing)
    summary = build(local_profile(), str(folder), str(tmp_path / "out"), overwrite=True)
    (seen,) = probes
    assert seen.entries_seen < 6, seen.entries_seen  # found audio at once: the rest was the pipeline's
    assert summary["inputs"]["sources"] == len(names) == 25
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["rejects"]["by_stage_reason"] == {"decode/empty_file": 25}
    assert summary["skipped_in_input"] == {"folders named like audio files": 1, "non-audio files": 1}
    assert summary["non_audio_files_skipped"] == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "_work" / "sources.jsonl").read_text().splitlines()]
    assert sorted(line["source_uri"] for line in lines) == sorted(names)
    assert all(line["path"] == str(folder / line["source_uri"]) for line in lines)


def test_hostile_folder_entries_in_the_pipeline(tmp_path):
    import os

    _empty_wavs(tmp_path, ["good.wav", "sub/deeper/ok.wav", os.fsdecode(b"sub/bad\xffname.wav")])
    os.mkfifo(tmp_path / "sub" / "fifo.wav")
    (tmp_path / "sub" / "folder.wav").mkdir()
    os.symlink("loop2", tmp_path / "sub" / "loop1")
    os.symlink("loop1", tmp_path / "sub" / "loop2")
    os.symlink(".", tmp_path / "self")
    records, rejects, tallies, counters = _read(str(tmp_path))
    assert [r["source_uri"] for r in records] == ["good.wav", "sub/bad\\xffname.wav", "sub/deeper/ok.wav"]
    assert os.fsdecode(records[1]["_source_path"]) == os.fsdecode(bytes(tmp_path / "sub") + b"/bad\xffname.wav")
    assert [(r["source_uri"], r["reason"]) for r in rejects] == [("sub/fifo.wav", "not_a_regular_file")]
    assert list(tallies) == ["sub/fifo.wav [not_a_regular_file at sub/fifo.wav]"]
    assert skipped_counts(counters) == {"broken or looping links": 2, "folders named like audio files": 1,
                                        "links to folders (not followed)": 1}


def test_a_folder_without_audio_is_a_one_line_error_before_any_output(tmp_path):
    folder = tmp_path / "in"
    (folder / "x.wav").mkdir(parents=True)
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.txt").write_text("hi")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "echat.cli", "build", "--input", str(folder), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no audio files (.wav" in proc.stderr and f"in {folder}: found 1 folders named like audio files, 1 non-audio files" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- manifests


def _manifest(tmp_path: Path) -> Path:
    _empty_wavs(tmp_path, ["a.wav", "b.wav", "c.wav"])
    lines = [json.dumps({"path": "a.wav", "text": "first"}),  # line 1
             "{not json",  # line 2
             json.dumps({"path": "a.wav", "text": "again"}),  # line 3: a duplicate
             "",  # line 4: blank, skipped
             json.dumps({"path": "b.wav", "emotion": "furious"}),  # line 5: not in the vocabulary
             json.dumps({"wav": "c.wav"}),  # line 6
             json.dumps({"path": "c.wav"})]  # line 7: the same file, another column
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def test_a_manifest_is_read_in_the_pipeline_with_line_numbers_and_duplicates_rejected(tmp_path):
    records, rejects, tallies, _ = _read(str(_manifest(tmp_path)))
    assert [(r["source_uri"], r.get("transcript")) for r in records] == [("a.wav", "first"), ("c.wav", None)]
    by_reason = sorted((r["reason"], r["source_uri"], r["detail"]) for r in rejects)
    assert [(reason, uri) for reason, uri, _ in by_reason] == [
        ("duplicate_source", "a.wav"), ("duplicate_source", "c.wav"), ("invalid_label", "b.wav"),
        ("manifest_row_invalid", "m.jsonl:2")]
    assert by_reason[0][2] == "listed more than once (m.jsonl:3); kept the first (m.jsonl:1)"
    assert by_reason[1][2] == "listed more than once (m.jsonl:7); kept the first (m.jsonl:6)"
    assert by_reason[2][2].startswith("m.jsonl:5: ") and "furious" in by_reason[2][2]
    # one tally per reject, apart from the kept records' own keys
    assert sorted(tallies) == ["a.wav [duplicate_source at m.jsonl:3]", "b.wav [invalid_label at m.jsonl:5]",
                               "c.wav [duplicate_source at m.jsonl:7]", "m.jsonl:2 [manifest_row_invalid at m.jsonl:2]"]
    assert all(t["file"] == 1 and t["rejected_file"] == 1 for t in tallies.values())


def test_done_inputs_are_dropped_after_listing_and_counted(tmp_path):
    records, rejects, _, counters = _read(str(_manifest(tmp_path)), done_inputs=frozenset({"a.wav", "b.wav"}))
    assert [r["source_uri"] for r in records] == ["c.wav"]
    assert sorted(r["reason"] for r in rejects) == ["duplicate_source", "manifest_row_invalid"]
    assert counters[RESUMED] == 3  # a.wav twice, b.wav's reject once


def test_a_tsv_manifest(tmp_path):
    _empty_wavs(tmp_path, ["x.wav"])
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\ttext\nx.wav\thello, there\n\tno path\n", encoding="utf-8")
    records, rejects, _, _ = _read(str(manifest))
    assert [(r["source_uri"], r["transcript"]) for r in records] == [("x.wav", "hello, there")]
    assert [(r["source_uri"], r["reason"]) for r in rejects] == [("m.tsv:3", "manifest_row_invalid")]


def test_a_manifest_build_reconciles_its_source_rejects(tmp_path, local_profile):
    from echat.pipelines.build import build

    summary = build(local_profile(), str(_manifest(tmp_path)), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["sources"] == 6  # six rows: two built, four rejected by the source
    assert summary["rejects"]["by_stage_reason"] == {"decode/empty_file": 2, "source/duplicate_source": 2,
                                                     "source/invalid_label": 1, "source/manifest_row_invalid": 1}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1 << 20])
def test_the_streamed_encoding_check_names_the_same_place_whatever_the_chunks(tmp_path, chunk):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,text\nclip.wav,naïve café\n".encode("utf-8") + b"two.wav,caf\xe9\n")
    with pytest.raises(ValueError, match=r"m.csv is not utf-8: line 3, column 12 holds byte 0xe9"):
        sources.check_manifest_encoding(str(manifest), "utf-8", chunk_bytes=chunk)
    manifest.write_bytes("\ufeffpath,text\nclip.wav,naïve café\n\n".encode("utf-8"))
    assert sources.check_manifest_encoding(str(manifest), "utf-8", chunk_bytes=chunk) == 2


# ---------------------------------------------------------------- progress without a total


def test_the_progress_line_has_no_eta_until_the_listing_is_complete(tmp_path):
    from echat.pipelines.progress import LISTING_SLOT, ProgressLine

    line = ProgressLine(str(tmp_path), total_files=None, first_slot="decode", split_slot=None, last_slot="encode")
    (tmp_path / "1.json").write_text(json.dumps({LISTING_SLOT: {"in": 40}, "decode": {"in": 10}}))
    assert line.line().startswith("files 10 (40 listed so far) |") and "ETA" not in line.line()
    (tmp_path / "2.json").write_text(json.dumps({LISTING_SLOT: {"out": 40}}))
    assert line.line().startswith("files 10/40 |") and "ETA" in line.line()


# ---------------------------------------------------------------- the other source kinds


def _osum():
    return pytest.importorskip("echat.pipelines.source_osum", reason="pipelines/source_osum.py has not landed")


def test_an_osum_raw_list_is_detected_and_read_in_the_pipeline(tmp_path):
    _osum()
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "k1.wav").write_bytes(_tone())
    rows = [{"key": "k1", "wav": "wav/k1.wav", "txt": "I am sorry to hear that.", "task": "<S2TCHAT>",
             "extra": {"question": "I lost my keys"}}]
    raw = tmp_path / "data.list"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert sources.probe_input(str(raw)).kind == sources.OSUM_RAW
    jsonl = tmp_path / "data.jsonl"  # the same rows as .jsonl: told from our manifest by `key` + `wav`
    jsonl.write_text(raw.read_text())
    assert sources.probe_input(str(jsonl)).kind == sources.OSUM_RAW
    records, rejects, tallies, _ = _read(str(raw))
    assert len(records) == 1 and records[0]["source_uri"]
    assert len(rejects) == 1 and "data.list:2" in (rejects[0]["source_uri"] + rejects[0]["detail"] + next(iter(tallies)))


def test_an_osum_raw_list_builds_through_input_detection(tmp_path, local_profile, demo_corpus):
    """`--input data.list` of OSUM raw rows: the user's turn (the question of a chat row, the
    transcript of an ASR row) and its labels become the records; a bad line is a reject."""
    from echat.pipelines.build import build

    _osum()
    (tmp_path / "wav").mkdir()
    speech = sorted((demo_corpus / "audio").glob("*.wav"))[:2]  # real speech: VAD keeps it
    for key, source in zip(("k1", "k2"), speech):
        (tmp_path / "wav" / f"{key}.wav").write_bytes(source.read_bytes())
    rows = [{"key": "k1", "wav": "wav/k1.wav", "txt": "I am sorry to hear that.", "task": "<S2TCHAT>", "lang": "en",
             "extra": {"question": "I lost my keys", "gender": "<FEMALE>"}},
            {"key": "k2", "wav": "wav/k2.wav", "txt": "good morning", "task": "<TRANSCRIBE>", "lang": "en"}]
    raw = tmp_path / "data.list"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    summary = build(local_profile(), str(raw), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["decoded"] == 2 and summary["rejects"]["files"] == 1, summary["rejects"]
    import pyarrow.parquet as pq

    rows_out = [r for f in sorted((tmp_path / "out" / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_source = {r["source_uri"]: r for r in rows_out}
    assert {r["transcript"] for r in rows_out} == {"I lost my keys", "good morning"}
    assert by_source["wav/k1.wav"]["gender"] == "female" and by_source["wav/k1.wav"]["gender_model"] == "manifest"


def test_a_wenet_shard_list_builds_through_input_detection(tmp_path, local_profile):
    import tarfile

    from echat.pipelines.build import build

    _osum()
    (tmp_path / "shards").mkdir()
    for n in range(2):
        with tarfile.open(tmp_path / "shards" / f"shard-{n}.tar", "w") as tar:
            for name, data in ((f"utt{n}.wav", _tone()), (f"utt{n}.txt", b"hello there"), (f"utt{n}.task", b"<TRANSCRIBE>")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard_list = tmp_path / "shards.list"
    shard_list.write_text("shards/shard-0.tar\nshards/shard-1.tar\n")
    assert sources.probe_input(str(shard_list)).kind == sources.SHARD_LIST
    summary = build(local_profile("language=en"), str(shard_list), str(tmp_path / "out"), overwrite=True)
    assert summary["inputs"]["sources"] == 2
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["decoded"] == 2  # the tars' audio reached the decoder


def test_a_parquet_dataset_folder_is_detected_and_read_per_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    for n in range(2):
        table = pa.table({"audio": [{"bytes": _tone(), "path": f"a{n}.wav"}], "text": [f"hello {n}"]})
        pq.write_table(table, folder / f"train-{n}.parquet")
    probe = sources.probe_input(str(folder))
    assert probe.kind == sources.HF and len(probe.root_units()) == 2
    records, rejects, _, _ = _read(str(folder))
    assert not rejects and len(records) == 2
    assert sorted(r["transcript"] for r in records) == ["hello 0", "hello 1"]
    assert all(r.get("_audio_bytes") for r in records)  # the audio travels inline
