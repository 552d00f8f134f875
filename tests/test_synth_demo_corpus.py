"""`echat demo-data`: a real espeak-ng demo corpus with a manifest the pipeline can read."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echat.cli import main
from echat.schemas import vocab
from echat.synth import demo_corpus
from echat.synth.demo_corpus import load_spec, make_demo_corpus, split_for_gap

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

MANIFEST_KEYS = {"path", "text", "language", "speaker", "gender", "emotion", "events", "style"}


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text("utf-8").splitlines()]


def check_corpus(out: Path, n: int) -> list[dict]:
    rows = read_manifest(out)
    assert len(rows) == n
    assert len(list((out / "audio").iterdir())) == n
    for row in rows:
        assert set(row) == MANIFEST_KEYS
        path = out / row["path"]
        assert path.exists() and not Path(row["path"]).is_absolute()
        audio, rate = sf.read(str(path))
        assert audio.shape[0] / rate > 0.8 and np.abs(audio).max() > 0.1
        assert row["language"] in vocab.LANGUAGES and row["gender"] in vocab.GENDERS
        assert row["emotion"] in vocab.EMOTIONS and row["events"] in ([], ["cough"])
        assert row["text"].strip()
    return rows


def test_small_corpus_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo-data", str(out), "--n", "8", "--seed", "3"]) == 0
    rows = check_corpus(out, 8)
    assert {r["gender"] for r in rows} == {"male", "female"}
    assert {r["language"] for r in rows} == {"en", "zh"}
    assert len({r["emotion"] for r in rows}) >= 4
    assert any(r["events"] == ["cough"] for r in rows)
    assert any(r["path"].endswith(".flac") for r in rows)
    printed = capsys.readouterr().out
    assert "wrote 8 utterances" in printed and str(out / "manifest.jsonl") in printed


def test_default_corpus_has_everything_the_pipeline_should_meet(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo_corpus(out)  # the default count: about two seconds of espeak-ng
    rows = check_corpus(out, demo_corpus.DEFAULT_COUNT)
    assert summary["count"] == 40
    languages = [r["language"] for r in rows]
    assert languages.count("zh") >= 8 and languages.count("en") >= 24
    assert {r["emotion"] for r in rows} >= {"sad", "anger", "happy", "fear", "surprise", "neutral"}
    assert sum(r["events"] == ["cough"] for r in rows) >= 5  # about one in six
    assert len({r["speaker"] for r in rows}) >= 6
    assert any(r["text"].count(".") + r["text"].count("。") >= 2 for r in rows)  # multi-sentence turns

    infos = [sf.info(str(out / r["path"])) for r in rows]
    assert sum(i.format == "FLAC" for i in infos) >= 2
    stereo = [i for i in infos if i.channels == 2]
    assert 1 <= len(stereo) <= 2 and all(i.samplerate == 44_100 for i in stereo)
    assert all(i.subtype == "PCM_16" for i in infos)
    assert {i.samplerate for i in infos if i.channels == 1} == {22_050}

    # the utterances given a gap really have 1-2 s of silence inside the speech
    assert summary["gaps"] >= 6
    gapped = [r for r, u in zip(rows, demo_corpus.plan_corpus(load_spec(), 40, 0)) if u.gap_s]
    for row in gapped:
        audio, rate = sf.read(str(out / row["path"]), always_2d=True)
        assert longest_inner_silence(audio.mean(axis=1), rate) >= 1.0, row["path"]


def longest_inner_silence(audio: np.ndarray, rate: int) -> float:
    frame = int(0.02 * rate)
    rms = np.sqrt(np.mean(audio[: audio.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > 0.02)
    quiet = rms[loud[0] : loud[-1]] < 0.01
    best = run = 0
    for q in quiet:
        run = run + 1 if q else 0
        best = max(best, run)
    return best * 0.02


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    def digest(out: Path) -> str:
        h = hashlib.sha256((out / "manifest.jsonl").read_bytes())
        for path in sorted((out / "audio").iterdir()):
            h.update(path.read_bytes())
        return h.hexdigest()

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_demo_corpus(a, n=6, seed=7)
    make_demo_corpus(b, n=6, seed=7)
    make_demo_corpus(c, n=6, seed=8)
    assert digest(a) == digest(b)
    assert read_manifest(a) != read_manifest(c)


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    out = tmp_path / "demo"
    make_demo_corpus(out, n=3)
    assert main(["demo-data", str(out), "--n", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo-data", str(out), "--n", "2", "--overwrite"]) == 0
    check_corpus(out, 2)  # the earlier run's extra file is gone too
    assert main(["demo-data", str(tmp_path / "x"), "--n", "0"]) == 2


def test_lines_are_data_spread_over_emotions():
    spec = load_spec()
    assert len(spec.lines["en"]) >= 30 and len(spec.lines["zh"]) >= 12
    for language in ("en", "zh"):
        assert len({l.emotion for l in spec.lines[language]}) >= 6
        assert {v.gender for v in spec.voices[language]} == {"male", "female"}


def test_gap_split_falls_on_a_clause_boundary():
    assert split_for_gap("I failed my exam again, and I feel like giving up.", "en") == (
        "I failed my exam again,", "and I feel like giving up.")
    assert split_for_gap("我这次考试又没考好，真的好难过。", "zh") == ("我这次考试又没考好，", "真的好难过。")
    assert split_for_gap("Hi there.", "en") is None
