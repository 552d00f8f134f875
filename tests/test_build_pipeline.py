"""`echat build` end to end: real Beam DirectRunner, real models of the offline profile, real parquet.

Shows that the demo corpus builds, the shards load with `datasets` and their audio columns decode
at 16 kHz, every demo utterance yields a segment, the reply fields are filled, hostile inputs land
in rejects with their reasons while counts reconcile, and multi-processing mode gives the same
rows as the in-memory runner.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from echat.pipelines.build import build

pytestmark = pytest.mark.slow


def _rows(out: Path) -> list[dict]:
    rows = []
    for shard in sorted((out / "data").glob("train-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    return rows


def _rejects(out: Path) -> list[dict]:
    rejects = []
    for path in sorted((out / "rejects").glob("rejects-*.jsonl")):
        rejects.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return rejects


def test_demo_corpus_builds_and_reconciles(demo_corpus, demo_build):
    out, summary = demo_build
    manifest = [json.loads(line) for line in (demo_corpus / "manifest.jsonl").read_text().splitlines()]
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["sources"] == len(manifest)
    rows = _rows(out)
    assert summary["outputs"]["rows"] == len(rows) >= len(manifest)
    # every demo utterance yields at least one segment in the shards
    written_sources = {r["source_uri"] for r in rows}
    for entry in manifest:
        assert entry["path"] in written_sources, entry["path"]  # relative to the manifest's folder
    assert (out / "summary.json").is_file()
    shard_names = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert shard_names and all(n.startswith("train-") and n.endswith(f"-of-{len(shard_names):05d}.parquet") for n in shard_names)


def test_rows_carry_replies_reasoning_and_audio(demo_build):
    out, _ = demo_build
    rows = _rows(out)
    languages = {r["language"] for r in rows}
    assert languages == {"en", "zh"}
    for r in rows:
        assert r["reply_text"].strip() and r["reply_emotion"]
        assert r["think_tags"].startswith("<think>") and r["think_tags"].endswith("<think end>")
        assert r["think_text"].startswith("<think>") and len(r["think_text"]) > len("<think><think end>") + 20
        assert r["audio"]["bytes"] and r["reply_audio"]["bytes"]
        assert r["reply_duration"] > 0.3 and 0 < r["duration"] <= 30.0
        assert r["source_uri"] and r["id"] and r["transcript"]
        assert r["gender"] in ("male", "female") and r["gender_model"]
        assert r["segment_end"] > r["segment_start"] >= 0
    zh = next(r for r in rows if r["language"] == "zh")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh["reply_text"])  # a Chinese reply to a Chinese turn


def test_shards_load_with_datasets_and_decode_at_16k(demo_build):
    import datasets

    out, _ = demo_build
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert isinstance(ds.features["audio"], datasets.Audio) and isinstance(ds.features["reply_audio"], datasets.Audio)
    for i in (0, len(ds) - 1):
        for column in ("audio", "reply_audio"):
            samples = ds[i][column].get_all_samples()
            assert samples.sample_rate == 16000
            assert samples.data.shape[0] == 1 and samples.data.shape[-1] > 1600
    # the explicit cast a user would write works too
    cast = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    assert cast[0]["audio"].get_all_samples().sample_rate == 16000


def _hostile_corpus(demo_corpus: Path, root: Path) -> Path:
    """A manifest over three good demo files and every kind of bad input."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    manifest = [json.loads(line) for line in (demo_corpus / "manifest.jsonl").read_text().splitlines()]
    entries = []
    for i, entry in enumerate(e for e in manifest if e["language"] == "en"):
        if i == 3:
            break
        target = audio / f"good{i}{Path(entry['path']).suffix}"
        shutil.copy(demo_corpus / entry["path"], target)
        entries.append({**entry, "path": f"audio/{target.name}"})
    good = sf.read(audio / "good0.wav" if (audio / "good0.wav").exists() else next(audio.iterdir()))
    (audio / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8)))
    (audio / "empty.wav").write_bytes(b"")
    (audio / "text.wav").write_text("this is a text file that only pretends to be audio\n" * 20)
    sf.write(audio / "full.wav", good[0], good[1])
    data = (audio / "full.wav").read_bytes()
    (audio / "truncated.wav").write_bytes(data[: len(data) // 2])
    (audio / "full.wav").unlink()
    sf.write(audio / "silence.wav", np.zeros(16000 * 3, dtype=np.float32), 16000)
    noise = (0.01 * np.random.default_rng(1).standard_normal(16000 * 3)).astype(np.float32)
    sf.write(audio / "hum.wav", noise, 16000)
    for name in ("corrupt.wav", "empty.wav", "text.wav", "truncated.wav", "silence.wav", "hum.wav", "missing.wav"):
        entries.append({"path": f"audio/{name}", "text": "whatever was said", "language": "en"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def hostile_build(demo_corpus, local_profile, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    manifest = _hostile_corpus(demo_corpus, root)
    summary = build(local_profile(), str(manifest), str(root / "out"), overwrite=True)
    return root, summary


def test_hostile_inputs_land_in_rejects_with_reasons(hostile_build):
    root, summary = hostile_build
    rejects = {Path(r["source_uri"]).name: r for r in _rejects(root / "out")}
    expected = {
        "corrupt.wav": {"decode_error"},
        "empty.wav": {"empty_file"},
        "text.wav": {"decode_error"},
        "truncated.wav": {"truncated"},
        "silence.wav": {"silent", "no_speech"},
        "hum.wav": {"no_speech"},
        "missing.wav": {"missing_file"},
    }
    for name, reasons in expected.items():
        assert name in rejects, f"{name} not in rejects: {sorted(rejects)}"
        assert rejects[name]["reason"] in reasons, (name, rejects[name])
        assert rejects[name]["stage"] and rejects[name]["detail"]
    rows = _rows(root / "out")
    written = {Path(r["source_uri"]).name for r in rows}
    assert len(written) == 3 and all(name.startswith("good") for name in written)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["sources"] == 10
    assert summary["rejects"]["files"] == 7
    assert sum(summary["rejects"]["by_stage_reason"].values()) == summary["rejects"]["total"]


def test_published_rows_and_rejects_carry_no_path_of_this_machine(hostile_build):
    root, _ = hostile_build
    published = [json.dumps(r, default=str) for r in _rejects(root / "out")]
    published += [json.dumps({k: v for k, v in r.items() if k not in ("audio", "reply_audio")}, default=str) for r in _rows(root / "out")]
    assert published and not [p for p in published if str(root) in p]
    # the full paths stay in the work folder, for whoever re-reads the sources
    paths = [json.loads(line)["path"] for line in (root / "out" / "_work" / "sources.jsonl").read_text().splitlines()]
    assert paths and all(p.startswith(str(root)) for p in paths)


def test_multiprocessing_runner_gives_the_same_rows(hostile_build, local_profile):
    root, in_memory = hostile_build
    out = root / "out-mp"
    summary = build(local_profile(), str(root / "manifest.jsonl"), str(out), overwrite=True,
                    beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert summary["reconciliation"]["ok"]
    assert sorted(r["id"] for r in _rows(out)) == sorted(r["id"] for r in _rows(root / "out"))
    assert summary["stages"]["decode"]["in"] == in_memory["stages"]["decode"]["in"] == 10


def test_cli_rejects_unknown_profile_key_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "echat.cli", "build", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
         "--set", "vad.params.min_silence=0.2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "min_silence" in proc.stderr and "unknown key" in proc.stderr


def test_cli_refuses_to_overwrite_without_flag(hostile_build):
    root, _ = hostile_build
    proc = subprocess.run(
        [sys.executable, "-m", "echat.cli", "build", "--input", str(root / "manifest.jsonl"), "--output", str(root / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_folder_input_transcribes_with_pocketsphinx(demo_corpus, local_profile, tmp_path):
    """No manifest: files are found recursively, English transcripts come from pocketsphinx."""
    manifest = [json.loads(line) for line in (demo_corpus / "manifest.jsonl").read_text().splitlines()]
    english = [e for e in manifest if e["language"] == "en"][:3]
    folder = tmp_path / "in"
    for i, entry in enumerate(english):
        target = folder / f"speaker{i}" / Path(entry["path"]).name
        target.parent.mkdir(parents=True)
        shutil.copy(demo_corpus / entry["path"], target)
    (folder / "README.txt").write_text("not audio")
    summary = build(local_profile(), str(folder), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"] and summary["non_audio_files_skipped"] == 1
    rows = _rows(tmp_path / "out")
    assert {Path(r["source_uri"]).name for r in rows} == {Path(e["path"]).name for e in english}
    for r in rows:
        assert r["transcript_origin"].startswith("pocketsphinx") and r["transcript"].strip()
        assert r["language"] == "en" and r["language_origin"] == "assumed" and "language_assumed" in r["quality_flags"]
        assert r["words"] and 0 < r["transcript_confidence"] <= 1
        assert r["gender_model"] in ("pitch-logistic-v2", None) and r["emotion_model"] == "heuristic-v1"


def test_missing_input_leaves_no_output_behind(tmp_path):
    out = tmp_path / "out"
    for missing in (tmp_path / "nope", tmp_path / "nope.jsonl"):
        proc = subprocess.run([sys.executable, "-m", "echat.cli", "build", "--input", str(missing), "--output", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "not found" in proc.stderr and str(missing) in proc.stderr
    assert not out.exists()


def test_a_folder_with_a_non_utf8_name_a_fifo_and_link_loops_builds_the_rest(demo_corpus, local_profile, tmp_path):
    import os
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    clip = sorted((demo_corpus / "audio").glob("*_en_*.wav"))[0]
    shutil.copy(clip, folder / "good.wav")
    shutil.copy(clip, folder / os.fsdecode(b"caf\xe9.wav"))  # latin-1 bytes: not a UTF-8 name
    os.mkfifo(folder / "pipe.wav")
    os.symlink("loop-b", folder / "loop-a")
    os.symlink("loop-a", folder / "loop-b")
    summary = build(local_profile("language=en"), str(folder), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert {Path(r["source_uri"]).name for r in _rows(tmp_path / "out")} == {"good.wav", "caf\\xe9.wav"}
    assert [(r["source_uri"], r["reason"]) for r in _rejects(tmp_path / "out")] == [("pipe.wav", "not_a_regular_file")]
    assert summary["skipped_in_input"] == {"broken or looping links": 2}
