"""The pieces of inference that need no model: output parsing, task modes, audio inputs, token-to-wav."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from echat.model import inference as inf
from echat.model import token2wav
from echat.schemas.vocab import TASK_TAGS


def test_split_think_and_reply_emotion():
    text = ("<think>User's words: I lost my job; Age: <adult>; Gender: <female>; Emotion: <sad>; "
            "Sound event: <none>; Reply emotion: <WORRIED><think end> I'm so sorry. ")
    think, reply = inf.split_think(text)
    assert think.startswith("User's words: I lost my job") and think.endswith("Reply emotion: <WORRIED>")
    assert reply == "I'm so sorry."
    assert inf.reply_emotion_of(think) == "WORRIED"
    assert inf.reply_emotion_of("Reply emotion:<sorry>") == "SORRY"  # OSUM's spacing, any case
    assert inf.reply_emotion_of("Reply emotion: <&&>") is None  # unknown placeholder
    assert inf.reply_emotion_of("Reply emotion: <ECSTATIC>") is None  # not one of the reply emotions
    assert inf.reply_emotion_of("She sounds sad and tired.") is None  # natural-language reasoning
    assert inf.split_think("Just a reply.") == (None, "Just a reply.")
    assert inf.split_think("<think>still thinking") == ("still thinking", "")


def test_generation_mode_of_every_task():
    modes = {task: inf.generation_mode(task) for task in TASK_TAGS}
    assert modes["<TEXT2TOKEN>"] == "speech"
    assert modes["<S2TCHAT> <TEXT2TOKEN>"] == modes["<S2TCHAT> <TEXT2TOKEN> <THINK>"] == "text+speech"
    assert all(mode == "text" for task, mode in modes.items() if "<TEXT2TOKEN>" not in task)
    assert inf.generation_mode("<HISTORY>", speech=True) == "text+speech"
    assert inf.generation_mode("<S2TCHAT> <TEXT2TOKEN>", speech=False) == "text"
    assert [t for t in TASK_TAGS if inf.takes_text(t)] == ["<TEXT2TOKEN>", "<TEXT2TEXT>"]


def test_check_task_normalises_and_refuses():
    assert inf.check_task("<TRANSCRIBE><AGE>  <GENDER>") == "<TRANSCRIBE> <AGE> <GENDER>"
    assert inf.check_task("<TRANSCRIBE> <STYLE>") == "<TRANSCRIBE> <STYLE>"  # any ASR+X combination with instructions
    with pytest.raises(inf.InferenceError, match="unknown task"):
        inf.check_task("<TRANSLATE>")
    with pytest.raises(inf.InferenceError, match="not a task tag string"):
        inf.check_task("transcribe")


def test_load_waveform_from_every_kind_of_input(tmp_path):
    t = np.arange(22050) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # 1 s at 22.05 kHz
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([tone, tone], axis=1), 22050)  # stereo
    from_path = inf.load_waveform(str(path))
    assert from_path.dtype == np.float32 and from_path.ndim == 1 and abs(len(from_path) - 16000) <= 1
    buf = io.BytesIO()
    sf.write(buf, tone, 22050, format="FLAC")
    from_bytes = inf.load_waveform(buf.getvalue())
    assert np.allclose(from_bytes, from_path, atol=1e-3)
    from_pair = inf.load_waveform((tone, 22050))
    assert np.allclose(from_pair, from_path, atol=1e-3)
    assert inf.load_waveform(np.zeros(800, dtype=np.float64)).dtype == np.float32  # an array is taken as 16 kHz
    with pytest.raises(inf.InferenceError, match="audio file not found"):
        inf.load_waveform(str(tmp_path / "nope.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(inf.InferenceError, match="cannot read audio"):
        inf.load_waveform(str(bad))
    with pytest.raises(inf.InferenceError, match="unsupported audio input"):
        inf.load_waveform(42)


def test_token2wav_without_cosyvoice_says_how_to_get_it():
    with pytest.raises(token2wav.TokenToWavUnavailable) as err:
        token2wav.load_token2wav("cosyvoice", model_dir="CosyVoice-300M-25Hz", prompt_wav="voice.wav")
    message = str(err.value)
    assert "CosyVoice is not installed" in message and "git clone" in message and "CosyVoice-300M-25Hz" in message
    with pytest.raises(ValueError, match="unknown token-to-wav backend"):
        token2wav.load_token2wav("vocos")


def test_check_tokens():
    assert token2wav.check_tokens(np.array([0, 4095])) == [0, 4095]
    with pytest.raises(ValueError, match="speech token 1 is 4096"):
        token2wav.check_tokens([1, 4096])
    with pytest.raises(ValueError, match="no speech tokens"):
        token2wav.check_tokens([])


def test_infer_shards_skips_and_counts_audio_longer_than_the_encoder_takes(tmp_path):
    """`echat infer --shards` sets aside a record whose audio the encoder cannot take (here a tiny
    model whose encoder takes 200 mel frames, 2 s) and goes on with the rest, text tasks included."""
    import argparse

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from echat.model import infer_cli
    from echat.model.config import config_from_dict, load_config
    from echat.model.osum import build_model
    from echat.schemas import record as record_schema

    data = load_config("tiny").model_dump(mode="json")
    data["encoder"]["architecture"]["max_source_positions"] = 100
    model = build_model(config_from_dict(yaml.safe_load(yaml.safe_dump(data))))
    predictor = inf.Predictor(model, model.tokenizer, model.config, device="cpu")
    assert predictor.max_frames == 200

    rows = []
    for key, seconds in (("short", 1.0), ("long", 2.5)):
        buf = io.BytesIO()
        sf.write(buf, np.zeros(int(seconds * 16000), np.float32), 16000, format="FLAC")
        rows.append(record_schema.to_row({
            "id": key, "source_uri": f"/in/{key}.wav", "audio": {"bytes": buf.getvalue(), "path": f"{key}.flac"},
            "sampling_rate": 16000, "duration": seconds, "segment_start": 0.0, "segment_end": seconds, "language": "en",
            "transcript": "so tired", "reply_text": "Rest a little.", "schema_version": record_schema.SCHEMA_VERSION,
            "pipeline_version": "test",
        }))
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=record_schema.arrow_schema()), shard)

    parser = argparse.ArgumentParser()
    infer_cli.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "unused", "--task", "x", "--shards", str(shard), "--output", "x.jsonl",
                              "--max-text-tokens", "2"])
    written = []
    summary = infer_cli.run_shards(predictor, ["<TRANSCRIBE>", "<TEXT2TEXT>"], args, written.append)
    assert summary["predictions"] == {"<TRANSCRIBE>": 1, "<TEXT2TEXT>": 2}
    assert summary["skipped"] == {"<TRANSCRIBE>: audio longer than the speech encoder takes": 1}
    assert sorted((r["task"], r["key"]) for r in written) == [
        ("<TEXT2TEXT>", "long"), ("<TEXT2TEXT>", "short"), ("<TRANSCRIBE>", "short")]
