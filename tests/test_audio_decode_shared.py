"""One decoder for the build and the model: an m4a or opus file that builds also loads for training
and inference, with the same samples; a file that is not audio fails in both with a clear error."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from echat.labelers.decode import DecodeAudio
from echat.model.features import AudioRef, audio_num_samples, decode_audio
from echat.model.inference import InferenceError, load_waveform
from echat.schemas.audio import AudioError, load_audio, probe_audio
from echat.schemas.stage import Reject

RATE = 48_000  # opus works at 48 kHz; both files are resampled to 16 kHz on decoding
SECONDS = 1.5


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A stereo tone as m4a (AAC: FFmpeg's fallback) and opus (libsndfile), made with the ffmpeg binary."""
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "the ffmpeg binary is part of the set-up (apt-get install -y ffmpeg)"
    folder = tmp_path_factory.mktemp("encoded")
    t = np.arange(int(SECONDS * RATE)) / RATE
    left = 0.4 * np.sin(2 * np.pi * 330 * t)
    right = 0.2 * np.sin(2 * np.pi * 550 * t)
    wav = folder / "tone.wav"
    sf.write(wav, np.stack([left, right], axis=1).astype(np.float32), RATE)
    files = {}
    for ext, codec in (("m4a", ["-c:a", "aac", "-b:a", "96k"]), ("opus", ["-c:a", "libopus", "-b:a", "64k"])):
        out = folder / f"tone.{ext}"
        subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), *codec, str(out)], check=True)
        files[ext] = out
    return files


@pytest.mark.parametrize("ext, decoder", [("m4a", "torchcodec"), ("opus", "soundfile")])
def test_build_and_model_decode_the_same_samples(encoded, ext, decoder):
    path = encoded[ext]
    (out,) = DecodeAudio().process({"source_uri": str(path)})
    assert not isinstance(out, Reject), out
    built = out["_waveform"]
    assert out["sampling_rate"] == 16_000 and out["_source_channels"] == 2
    assert load_audio(path).decoder == decoder  # both decoding routes are covered
    assert abs(len(built) / 16_000 - SECONDS) < 0.1 and np.abs(built).max() > 0.1  # the tone, not silence

    for_training = decode_audio(AudioRef(path=str(path)))
    from_bytes = decode_audio(AudioRef(data=path.read_bytes()))
    for_inference = load_waveform(str(path))
    for loaded in (for_training, from_bytes, for_inference):
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, built)
    # the header-only length the loader batches by agrees with what is decoded (AAC priming aside)
    assert abs(audio_num_samples(AudioRef(path=str(path))) - len(built)) <= 0.05 * 16_000
    assert probe_audio(path).channels == 2


def test_a_span_of_a_file_is_cut_the_same_in_both_routes(encoded):
    for ext in ("m4a", "opus"):
        path = encoded[ext]
        whole = load_audio(path)
        span = decode_audio(AudioRef(path=str(path), start=0.5, end=1.0))
        assert abs(len(span) - 8000) <= 1
        assert audio_num_samples(AudioRef(path=str(path), start=0.5, end=1.0)) == 8000
        # the span is the same stretch of sound: compare away from its resampled edges
        offset = 8000
        np.testing.assert_allclose(span[200:-200], whole.waveform[offset + 200 : offset + len(span) - 200], atol=1e-5)


def test_a_non_audio_file_fails_in_both_with_a_clear_error(tmp_path):
    bad = tmp_path / "notes.m4a"
    bad.write_text("this is a text file with an audio extension\n" * 20)
    (rej,) = DecodeAudio().process({"source_uri": str(bad)})
    assert isinstance(rej, Reject) and rej.reason == "decode_error"
    assert "libsndfile" in rej.detail and "FFmpeg" in rej.detail and str(bad) in rej.detail
    with pytest.raises(AudioError) as caught:
        decode_audio(AudioRef(path=str(bad)))
    assert caught.value.reason == "decode_error" and str(bad) in str(caught.value)
    with pytest.raises(AudioError, match="decode_error"):
        audio_num_samples(AudioRef(path=str(bad)))
    with pytest.raises(InferenceError, match=r"cannot read audio .*notes\.m4a: decode_error: libsndfile"):
        load_waveform(str(bad))
    with pytest.raises(InferenceError, match="cannot decode audio bytes .*decode_error"):
        load_waveform(bad.read_bytes())
