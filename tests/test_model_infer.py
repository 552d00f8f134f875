"""Inference on a real tiny checkpoint: `echat infer` on every task tag (audio files, texts, shards),
`echat eval` on its predictions, `echat chat`, and the Python API behind them.

The checkpoint is made by the training code itself (`echat.model.train.train`, two steps of the
tiny config on the demo shards), so it is in the real checkpoint format. A two-step model writes
gibberish: the tests check structure, ranges and consistency, never quality.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from echat.cli import main
from echat.schemas.vocab import TASK_TAGS

pytestmark = pytest.mark.slow

SPEECH_CODES = 4096
GEN = ["--max-text-tokens", "5", "--max-speech-tokens", "5"]


@pytest.fixture(scope="module")
def tiny_checkpoint(demo_shards, tmp_path_factory) -> Path:
    """A run folder holding a 2-step checkpoint of the tiny config, written by the trainer."""
    from echat.model.train import train
    from echat.model.train_config import load_train_config

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = load_train_config("tiny", [
        f"data.train=[{demo_shards}]", "run.max_steps=2", "optim.warmup_steps=1", "checkpoint.every=2",
        "log.tensorboard=false", "run.device=cpu", "data.max_frames_per_batch=1500",
    ])
    cfg.output_dir = str(out)
    summary = train(cfg)
    assert summary.completed and summary.checkpoint is not None
    return out


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("infer-audio")
    files = []
    for name, voice, text in (("sad", "en+f3", "I lost my job today and I feel terrible."), ("hi", "en+m3", "Hello there, nice to meet you.")):
        path = folder / f"{name}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from echat.model.inference import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _speech_task(task: str) -> bool:
    return "<TEXT2TOKEN>" in task.split()


# ----------------------------------------------------------------------------- echat infer


def test_infer_runs_every_task_tag_on_audio_files_and_text(tiny_checkpoint, audio_files, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    rc = main(["infer", "--checkpoint", str(tiny_checkpoint), "--task", "all", *map(str, audio_files),
               "--text", "Please say this sentence.", "--output", str(out), *GEN])
    assert rc == 0
    rows = _rows(out)
    by_task = {task: [r for r in rows if r["task"] == task] for task in TASK_TAGS}
    for task, task_rows in by_task.items():
        expected = 1 if task in ("<TEXT2TEXT>", "<TEXT2TOKEN>") else len(audio_files)
        assert len(task_rows) == expected, task
        for row in task_rows:
            assert isinstance(row["prediction"], str) and row["reference"] is None
            if _speech_task(task):
                assert 1 <= len(row["speech_tokens"]) <= 5, task
                assert all(0 <= t < SPEECH_CODES for t in row["speech_tokens"])
            else:
                assert "speech_tokens" not in row
    assert [r["key"] for r in by_task["<EMOTION>"]] == [str(p) for p in audio_files]
    assert by_task["<TEXT2TOKEN>"][0]["prediction"] == ""  # speech only
    printed = capsys.readouterr().out
    assert printed.count("\n") == len(rows)  # one printed line per prediction


def test_infer_rejects_bad_requests_clearly(tiny_checkpoint, audio_files, capsys):
    ckpt = str(tiny_checkpoint)
    assert main(["infer", "--checkpoint", ckpt, "--task", "<TRANSLATE>", str(audio_files[0])]) == 2
    assert "unknown task '<TRANSLATE>'" in capsys.readouterr().err
    assert main(["infer", "--checkpoint", ckpt, "--task", "<TEXT2TEXT>", str(audio_files[0])]) == 2
    assert "<TEXT2TEXT> needs --text TEXT" in capsys.readouterr().err
    assert main(["infer", "--checkpoint", ckpt, "--task", "<EMOTION>", "missing.wav"]) == 2
    assert "not found: missing.wav" in capsys.readouterr().err
    assert main(["infer", "--checkpoint", str(Path(ckpt) / "nothing"), "--task", "<EMOTION>", str(audio_files[0])]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["infer", "--checkpoint", ckpt, "--task", "<EMOTION>", "--shards", "/nonexistent/build", "--output", "x.jsonl"]) == 2
    assert "--shards: no such file: /nonexistent/build" in capsys.readouterr().err
    assert main(["infer", "--checkpoint", ckpt, "--task", "<EMOTION>", "--shards", "/nonexistent/build"]) == 2
    assert "--shards needs --output" in capsys.readouterr().err


def test_infer_on_shards_writes_references_then_eval_scores_them(tiny_checkpoint, demo_shards, tmp_path, capsys):
    preds = tmp_path / "shard-preds.jsonl"
    limit = 6
    rc = main(["infer", "--checkpoint", str(tiny_checkpoint), "--task", "all", "--shards", str(demo_shards),
               "--limit", str(limit), "--output", str(preds), "--batch-size", "4", *GEN])
    assert rc == 0
    assert not preds.with_suffix(".jsonl.partial").exists()
    rows = _rows(preds)
    tasks = {r["task"] for r in rows}
    assert tasks == set(TASK_TAGS)  # every task ran (records without its target: reference null)

    # The references are the records' own training targets.
    records = {}
    for shard in sorted((demo_shards / "data").glob("*.parquet")):
        for rec in pq.read_table(shard, columns=["id", "transcript", "emotion", "reply_text", "language"]).to_pylist():
            records[rec["id"]] = rec
    transcribe = [r for r in rows if r["task"] == "<TRANSCRIBE>"]
    assert len(transcribe) == limit
    for row in transcribe:
        rec = records[row["key"]]
        assert row["reference"] == rec["transcript"].strip()
        assert row["language"] == rec["language"]
    for row in (r for r in rows if r["task"] == "<EMOTION>" and r["reference"] is not None):
        assert row["reference"] == f"<{records[row['key']]['emotion'].upper()}>"
    for row in (r for r in rows if r["task"] == "<TEXT2TEXT>"):
        assert row["reference"] == records[row["key"]]["reply_text"].strip()
    think = [r for r in rows if r["task"] == "<S2TCHAT> <THINK>" and r["reference"]]
    assert think and all(r["reference"].startswith("<think>") and "<think end>" in r["reference"] for r in think)

    capsys.readouterr()
    assert main(["eval", "--predictions", str(preds)]) == 0
    table = capsys.readouterr().out
    assert "transcript_en WER" in table and "emotion acc" in table
    report = json.loads(preds.with_suffix(".eval.json").read_text(encoding="utf-8"))
    assert report["rows"] == len(rows) and report["skipped"] == {}
    asr = report["tasks"]["<TRANSCRIBE>"]["metrics"]
    for m in asr.values():
        # A two-step model: any error rate, but the one its own alignment counts give.
        assert m["reference_tokens"] > 0 and m["reference_tokens"] == m["hits"] + m["substitutions"] + m["deletions"]
        assert m[m["metric"]] == pytest.approx((m["substitutions"] + m["deletions"] + m["insertions"]) / m["reference_tokens"])
    assert sum(m["utterances"] for m in asr.values()) == limit
    for task in ("<EMOTION>", "<GENDER>", "<STYLE>", "<TRANSCRIBE> <EMOTION>"):
        for m in report["tasks"][task]["metrics"].values():
            if m["metric"] == "accuracy" and m["scored"]:
                assert 0.0 <= m["accuracy"] <= 1.0
                assert sum(c["support"] for c in m["per_class"].values()) == m["scored"]
    assert report["tasks"]["<S2TCHAT>"]["metrics"] == {}


# ----------------------------------------------------------------------------- echat chat


def test_chat_returns_reasoning_reply_and_speech_tokens(tiny_checkpoint, audio_files, tmp_path, capsys):
    tokens_file = tmp_path / "reply_tokens.json"
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint), str(audio_files[0]), "--tokens-out", str(tokens_file),
               "--max-think-tokens", "8", "--max-reply-tokens", "8", "--max-speech-tokens", "12", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["think"], str) and result["think"]
    assert isinstance(result["reply_text"], str) and result["reply_text"]
    assert result["text"].startswith("<think>") and "<think end>" in result["text"]
    assert 1 <= len(result["speech_tokens"]) <= 12
    assert all(0 <= t < SPEECH_CODES for t in result["speech_tokens"])
    assert json.loads(tokens_file.read_text(encoding="utf-8")) == result["speech_tokens"]

    # The plain output names each part.
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint), str(audio_files[0]), "--tokens-out", str(tokens_file),
               "--max-think-tokens", "8", "--max-reply-tokens", "8", "--max-speech-tokens", "12"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Reasoning: ") and lines[1].startswith("Reply: ")
    assert lines[-1] == f"Speech tokens: {len(result['speech_tokens'])} -> {tokens_file}"


def test_chat_wav_without_a_backend_stops_with_a_clear_message(tiny_checkpoint, audio_files, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint), str(audio_files[0]), "--wav", str(out)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "CosyVoice is not installed" in err and "github.com/FunAudioLLM/CosyVoice" in err
    assert "Run without --wav" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- the Python API


def test_predict_accepts_paths_bytes_and_arrays_alike(predictor, audio_files):
    from echat.model.features import AudioRef, decode_audio

    path = audio_files[1]
    wav16 = decode_audio(AudioRef(path=str(path)))
    import soundfile as sf

    raw, rate = sf.read(str(path), dtype="float32")
    inputs = [str(path), path.read_bytes(), wav16, (raw, rate), str(audio_files[0])]
    preds = predictor.predict(inputs, "<S2TCHAT> <TEXT2TOKEN>", max_text_tokens=4, max_speech_tokens=8)
    assert [p.key for p in preds] == [str(path), "input-1", "input-2", "input-3", str(audio_files[0])]
    answers = [(p.text, p.speech_tokens) for p in preds]
    assert answers[0] == answers[1] == answers[2] == answers[3]  # the same audio, however given
    # A two-step model's greedy output can be the same for any audio, so check what the model
    # heard: its state after the prompt is the same for the same audio and differs for another.
    states = [_prompt_state(predictor, item, "<S2TCHAT> <TEXT2TOKEN>") for item in inputs]
    for state in states[1:4]:
        assert torch.allclose(state, states[0], atol=1e-4)
    assert not torch.allclose(states[4], states[0], atol=1e-3)


def _prompt_state(predictor, item, task):
    """The decoder's last hidden state after the prompt (speech spliced in) for one input."""
    from echat.model.generate import prefill
    from echat.model.inference import _Request

    request = _Request("k", predictor.prompt_ids(task), predictor._waveform(item, "k"))
    return prefill(predictor.model, predictor._batch([request])).last_hidden[0].float()


def test_batching_does_not_change_answers(predictor, audio_files):
    """Right padding and early stops leave each sample as if it ran alone (greedy decoding)."""
    inputs = [str(audio_files[0]), str(audio_files[1]), str(audio_files[0])]
    for task in ("<S2TCHAT> <TEXT2TOKEN>", "<TRANSCRIBE> <EMOTION>"):
        together = predictor.predict(inputs, task, batch_size=3, max_text_tokens=6, max_speech_tokens=6)
        alone = predictor.predict(inputs, task, batch_size=1, max_text_tokens=6, max_speech_tokens=6)
        assert [(p.text, p.speech_tokens) for p in together] == [(p.text, p.speech_tokens) for p in alone]
    # Not a vacuous comparison: the model hears the two audios differently (see _prompt_state).
    first, second = (_prompt_state(predictor, item, "<S2TCHAT> <TEXT2TOKEN>") for item in inputs[:2])
    assert not torch.allclose(first, second, atol=1e-3)


def test_chat_with_a_token2wav_backend_returns_audio(predictor, audio_files):
    class Beeps:
        """A stand-in backend: 40 ms of tone per token, so the plumbing is checked without CosyVoice."""

        def synthesize(self, tokens):
            from echat.model.token2wav import check_tokens

            n = len(check_tokens(tokens))
            t = np.arange(n * 640) / 16000
            return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000

    from echat.model.token2wav import TokenToWav

    assert isinstance(Beeps(), TokenToWav)
    result = predictor.chat(str(audio_files[0]), max_think_tokens=4, max_reply_tokens=4, max_speech_tokens=6, token2wav=Beeps())
    assert result.sample_rate == 16000
    assert len(result.waveform) == 640 * len(result.speech_tokens)
    text_only = predictor.chat(str(audio_files[0]), think=False, speech=False, max_reply_tokens=4)
    assert text_only.think == "" and text_only.speech_tokens == [] and text_only.waveform is None


def test_inputs_the_model_cannot_take_are_refused(predictor):
    from echat.model.inference import InferenceError

    with pytest.raises(InferenceError, match="longer than the encoder's 30 s"):
        predictor.predict([np.zeros(31 * 16000, dtype=np.float32)], "<TRANSCRIBE>")
    with pytest.raises(InferenceError, match="too short"):
        predictor.predict([np.zeros(100, dtype=np.float32)], "<TRANSCRIBE>")
    with pytest.raises(InferenceError, match="takes text input"):
        predictor.predict([np.zeros(16000, dtype=np.float32)], "<TEXT2TEXT>")
    with pytest.raises(InferenceError, match="audio file not found"):
        predictor.predict(["/nonexistent.wav"], "<EMOTION>")
    with pytest.raises(InferenceError, match="unknown task"):
        predictor.predict(["x"], "<TRANSCRIBE> <TRANSCRIBE>")


# ----------------------------------------------------------------------------- train/infer prompt parity


def _full_record(audio: Path) -> dict:
    """A record that supports every task tag (reply speech tokens and history included)."""
    import soundfile as sf

    from echat.model.features import AudioRef

    n = int(round(sf.info(str(audio)).duration * 16000))
    return {
        "id": "rec-1", "_audio": AudioRef(path=str(audio)), "_num_samples": n, "language": "en",
        "transcript": "I lost my job today and I feel terrible.",
        "words": [{"word": "I", "start": 0.1, "end": 0.2, "score": 1.0}, {"word": "lost", "start": 0.2, "end": 0.5, "score": 1.0}],
        "gender": "female", "age": "adult", "emotion": "sad", "style": "daily conversation", "events": ["sigh"],
        "think_tags": "<think>User's words: I lost my job; Age: <adult>; Gender: <female>; Emotion: <sad>; Sound event: <sigh>; Reply emotion: <SORRY><think end>",
        "think_text": None, "reply_text": "I am so sorry. That is a hard day.", "reply_speech_tokens": [5, 17, 4095],
        "history": [{"role": "user", "text": "Hi."}, {"role": "assistant", "text": "Hello! How are you?"}],
    }


def test_inference_prompts_are_the_training_prompts(audio_files):
    """For every task tag, the inference prompt is exactly the start of a training sample."""
    from echat.model import prompts
    from echat.model.inference import build_prompt_ids, generation_mode, takes_text
    from echat.model.samples import SampleBuilder
    from echat.model.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    table = prompts.load_instructions()
    record = _full_record(audio_files[0])
    for task in TASK_TAGS:
        instruction = None if task in prompts.CHAT_TASKS else table[task][3]
        builder = SampleBuilder(tokenizer, {task: 1.0}, instructions={**table, task: (instruction,)} if instruction else table,
                                think_text_ratio=0.0)
        assert builder.supports(record, task), task
        sample = builder.build_task(record, task, random.Random(0))
        text = {"<TEXT2TOKEN>": record["reply_text"], "<TEXT2TEXT>": record["transcript"]}.get(task)
        history = record["history"] if task == "<HISTORY>" else None
        # <HISTORY> trains with speech when the record has reply tokens; inference asks with speech=True.
        ids = build_prompt_ids(builder.encoder, {task: (instruction,)} if instruction else {}, task,
                               text=text, history=history, speech=True if task == "<HISTORY>" else None)
        assert sample.input_ids[: len(ids)] == ids, task
        first_target = next(i for i, label in enumerate(sample.labels) if label != -100) if task != "<TEXT2TOKEN>" else len(sample.input_ids)
        assert first_target == len(ids), task  # the prompt ends exactly where the target begins
        assert (sample.audio is None) == takes_text(task)
        assert (generation_mode(task, speech=True if task == "<HISTORY>" else None) != "text") == bool(sample.speech_tokens), task
