"""DecodeAudio: hostile files are rejected with their reason code; good ones become 16 kHz mono."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import test_labelers_support as speech
from echat.schemas.audio import AudioError, decode_bytes, encode_flac, load_audio
from echat.labelers.decode import DecodeAudio
from echat.schemas.stage import Reject

SR = speech.SR


def run(stage: DecodeAudio, path) -> dict | Reject:
    outputs = list(stage.process({"source_uri": str(path), "source_dataset": "test"}))
    assert len(outputs) == 1
    return outputs[0]


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(x: np.ndarray, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# -- hostile inputs ------------------------------------------------------------------------------


def make_missing(tmp_path):
    return tmp_path / "nowhere.wav"


def make_empty(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    return path


def make_text(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file that somebody named .wav\n" * 20)
    return path


def make_header_no_frames(tmp_path):
    path = tmp_path / "header_only.wav"
    path.write_bytes(speech.wav_header(0))
    return path


def make_truncated_wav(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(str(full), tone(220, 3.0, SR), SR, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + SR * 2])  # 1 s of the 3 s the header declares
    return cut


def make_truncated_flac(tmp_path):
    full = tmp_path / "full.flac"
    sf.write(str(full), speech.white_noise(5 * SR, 0.1), SR)
    cut = tmp_path / "cut.flac"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    return cut


def make_nine_channels(tmp_path):
    path = tmp_path / "nine.wav"
    sf.write(str(path), np.tile(tone(300, 0.5, SR)[:, None], (1, 9)), SR)
    return path


def make_two_hours(tmp_path):
    return speech.write_sparse_wav(tmp_path / "two_hours.wav", 2 * 3600)


def make_digital_silence(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(str(path), np.zeros(2 * SR, dtype=np.float32), SR)
    return path


def make_dither_only(tmp_path):
    path = tmp_path / "dither.wav"  # +-1 LSB of 16-bit: -90 dBFS, no signal
    sf.write(str(path), np.random.default_rng(0).integers(-1, 2, 2 * SR).astype(np.int16), SR)
    return path


def _float_wav_with(tmp_path, name: str, rate: int, value: float, at: float) -> object:
    """A float WAV (the one common format that can store NaN and infinities) of a tone with one bad sample."""
    path = tmp_path / name
    samples = tone(220, 1.0, rate)
    samples[int(at * rate)] = value
    sf.write(str(path), samples, rate, subtype="FLOAT")
    return path


def make_nan_at_16k(tmp_path):  # was rejected as `silent`: the peak of a waveform with a NaN is NaN
    return _float_wav_with(tmp_path, "nan16k.wav", SR, np.nan, 0.5)


def make_inf_at_16k(tmp_path):  # passed decode, then librosa refused the buffer in gender and metrics
    return _float_wav_with(tmp_path, "inf16k.wav", SR, np.inf, 0.5)


def make_inf_at_44k(tmp_path):  # resampling turned it into NaN, then rejected as `silent`
    return _float_wav_with(tmp_path, "inf44k.wav", 44_100, np.inf, 0.5)


def make_minus_inf_last_at_48k(tmp_path):  # the very last sample, where a resampler's filter tails off
    return _float_wav_with(tmp_path, "minf48k.wav", 48_000, -np.inf, 1.0 - 1 / 48_000)


HOSTILE = [
    (make_missing, "missing_file"),
    (make_empty, "empty_file"),
    (make_header_no_frames, "empty_file"),
    (make_text, "decode_error"),
    (make_truncated_wav, "truncated"),
    (make_truncated_flac, "truncated"),
    (make_nine_channels, "too_many_channels"),
    (make_two_hours, "too_long"),
    (make_digital_silence, "silent"),
    (make_dither_only, "silent"),
    (make_nan_at_16k, "non_finite_samples"),
    (make_inf_at_16k, "non_finite_samples"),
    (make_inf_at_44k, "non_finite_samples"),
    (make_minus_inf_last_at_48k, "non_finite_samples"),
]


@pytest.mark.parametrize("make, reason", HOSTILE, ids=[m.__name__[5:] for m, _ in HOSTILE])
def test_hostile_file_is_rejected_with_its_reason(tmp_path, make, reason):
    path = make(tmp_path)
    out = run(DecodeAudio(max_file_seconds=3600.0, max_channels=8), path)
    assert isinstance(out, Reject), f"{path.name} was not rejected"
    assert (out.reason, out.stage) == (reason, "decode"), out.detail
    assert out.source_uri == str(path)
    assert out.segment_start is None  # a whole-file reject
    assert out.detail


def test_too_long_is_decided_from_the_header_without_reading(tmp_path, monkeypatch):
    path = make_two_hours(tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("the samples of a too-long file were read")

    monkeypatch.setattr(sf.SoundFile, "blocks", no_reading)
    out = run(DecodeAudio(max_file_seconds=3600.0), path)
    assert out.reason == "too_long" and "7200.0 s" in out.detail


def test_non_finite_detail_says_where(tmp_path):
    out = run(DecodeAudio(), make_inf_at_16k(tmp_path))
    assert "1 of 16000 samples" in out.detail and "first at 0.500 s" in out.detail


def test_truncated_detail_says_how_much_is_missing(tmp_path):
    out = run(DecodeAudio(), make_truncated_wav(tmp_path))
    assert "2.00 s missing" in out.detail


def test_a_wav_with_trailing_chunks_is_not_called_truncated(tmp_path):
    path = tmp_path / "with_list_chunk.wav"
    x = tone(220, 1.0, SR)
    sf.write(str(path), x, SR, subtype="PCM_16")
    data = path.read_bytes() + b"LIST" + (8).to_bytes(4, "little") + b"INFOabcd"
    path.write_bytes(data)
    out = run(DecodeAudio(), path)
    assert isinstance(out, dict) and len(out["_waveform"]) == SR


# -- good inputs ---------------------------------------------------------------------------------


def test_stereo_44k_becomes_16k_mono_mean(tmp_path):
    rate = 44_100
    left, right = tone(440, 2.0, rate, 0.4), tone(440, 2.0, rate, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), rate, subtype="PCM_16")
    out = run(DecodeAudio(), path)
    w = out["_waveform"]
    assert w.dtype == np.float32 and w.ndim == 1
    assert out["sampling_rate"] == SR and len(w) == 2 * SR
    assert (out["_source_channels"], out["_source_sample_rate"]) == (2, rate)
    assert out["_source_duration"] == pytest.approx(2.0)
    assert dominant_frequency(w) == pytest.approx(440, abs=2)
    # the mean of 0.4 and 0.2 amplitude tones in phase: amplitude 0.3
    assert np.max(np.abs(w[SR // 4 : -SR // 4])) == pytest.approx(0.3, abs=0.01)


def test_flac_48k_speech(tmp_path):
    data, rate = speech.espeak_native("Reading a flac file.")
    hi = np.interp(np.arange(int(len(data) * 48_000 / rate)) * rate / 48_000, np.arange(len(data)), data)
    path = tmp_path / "speech.flac"
    sf.write(str(path), hi.astype(np.float32), 48_000)
    out = run(DecodeAudio(), path)
    assert out["_source_sample_rate"] == 48_000 and out["sampling_rate"] == SR
    assert len(out["_waveform"]) == pytest.approx(len(data) / rate * SR, abs=2)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI needed to make an m4a")
def test_m4a_falls_back_to_ffmpeg(tmp_path):
    wav = tmp_path / "src.wav"
    sf.write(str(wav), tone(440, 1.5, 22_050), 22_050)
    m4a = tmp_path / "clip.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-ac", "2", "-c:a", "aac", str(m4a)], check=True)
    decoded = load_audio(str(m4a))
    assert decoded.decoder == "torchcodec"
    assert decoded.source_channels == 2 and decoded.sample_rate == SR
    assert decoded.source_duration == pytest.approx(1.5, abs=0.1)  # AAC priming adds a few ms
    assert dominant_frequency(decoded.waveform) == pytest.approx(440, abs=3)


def test_decode_from_bytes_and_the_audio_bytes_key():
    x = speech.say("Bytes in memory.")
    flac = encode_flac(x, SR)
    assert flac[:4] == b"fLaC"
    back = decode_bytes(flac)
    assert back.sample_rate == SR and np.max(np.abs(back.waveform - x)) < 1.5 / 32768
    out = next(DecodeAudio().process({"source_uri": "hf://some/dataset/row/7", "_audio_bytes": flac}))
    assert "_audio_bytes" not in out and len(out["_waveform"]) == len(x)
    with pytest.raises(AudioError) as err:
        decode_bytes(b"")
    assert err.value.reason == "empty_file"


def test_encode_flac_clips_instead_of_wrapping():
    x = np.array([0.0, 1.5, -1.5, 0.5] * 400, dtype=np.float32)
    y, _ = sf.read(__import__("io").BytesIO(encode_flac(x, SR)), dtype="float32")
    assert y[1] > 0.99 and y[2] < -0.99  # wrapped 16-bit overflow would flip the signs


def test_the_input_record_is_not_modified(tmp_path):
    path = tmp_path / "ok.wav"
    sf.write(str(path), tone(200, 1.0, SR), SR)
    record = {"source_uri": str(path), "transcript": "hello", "transcript_origin": "manifest"}
    snapshot = dict(record)
    out = next(DecodeAudio().process(record))
    assert record == snapshot and out is not record
    assert out["transcript"] == "hello"  # manifest fields travel on


def test_profile_params_build_the_stage():
    from echat.pipelines.graph import stage_specs
    from echat.pipelines.profile import load_profile

    specs = stage_specs(load_profile("local"))
    for spec in specs:
        stage = spec.build()
        assert stage.slot_name == spec.slot
        if spec.slot in ("decode", "vad", "asr", "gender", "emotion", "metrics"):
            assert stage.name == spec.slot  # each offline backend's default slot is the one it fills


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_channels"):
        DecodeAudio(max_channels=0)
    with pytest.raises(ValueError, match="resample_quality"):
        DecodeAudio(resample_quality="best")
