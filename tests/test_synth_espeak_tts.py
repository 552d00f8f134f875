"""EspeakTTS against the real espeak-ng: 16 kHz audio, emotion prosody, Mandarin via pinyin, cache."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from echat.pipelines import backends
from echat.schemas import vocab
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject
from echat.synth import espeak_tts
from echat.synth.espeak_tts import EspeakError, EspeakTTS, load_prosody_table, to_pinyin

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

TEXT = "I heard you cough just now. Are you feeling all right? Please look after your health."


@pytest.fixture(scope="module")
def tts() -> EspeakTTS:
    stage = EspeakTTS()
    stage.setup()
    return stage


def speak(stage: EspeakTTS, text: str = TEXT, emotion: str | None = "NEUTRAL", language: str = "en") -> dict:
    (out,) = stage.process({"id": "r1", "reply_text": text, "reply_emotion": emotion, "language": language})
    assert not isinstance(out, Reject), out
    return out


def test_speaks_16khz_mono_float32_of_plausible_length(tts):
    out = speak(tts)
    wave = out["_reply_waveform"]
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert out["reply_duration"] == pytest.approx(wave.size / SAMPLE_RATE, abs=1e-3)
    # 16 words at the NEUTRAL 165 words/min is ~5.8 s of speech; allow pauses and espeak's own pace
    words = len(TEXT.split())
    expected = words / 165 * 60
    assert 0.6 * expected < out["reply_duration"] < 1.8 * expected
    assert np.abs(wave).max() > 0.05  # not silence
    # resampled to 16 kHz: no energy is left above the new Nyquist, and the bulk is speech band
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(wave.size, 1 / SAMPLE_RATE)
    assert spectrum[(freqs > 100) & (freqs < 4000)].sum() > spectrum[freqs >= 4000].sum()
    assert out["tts_model"] == f"espeak-ng {espeak_tts.espeak_version()} en-us+f3"


def test_reply_audio_goes_through_the_decode_stages_resampler(tts):
    # One resampler for the corpus: the user's audio (decode) and the reply's (here) match in quality.
    from echat.labelers import audio

    prosody = tts.prosody["NEUTRAL"]
    native, rate = espeak_tts.synthesize(espeak_tts.speakable_text(TEXT, "en"), tts.voice("en"), prosody)
    assert rate != SAMPLE_RATE
    expected = audio.resample(native, rate, SAMPLE_RATE, quality=audio.RESAMPLE_QUALITY)
    np.testing.assert_array_equal(tts.speak(TEXT, "en", "NEUTRAL"), expected)


def test_happy_is_spoken_faster_than_worried(tts):
    happy = speak(tts, emotion="HAPPY")["reply_duration"]
    worried = speak(tts, emotion="WORRIED")["reply_duration"]
    assert happy < 0.85 * worried


def test_mandarin_reply_is_spoken_through_pinyin(tts):
    text = "刚才听到你咳嗽了，身体还好吗？要注意身体，多喝点温水。"
    out = speak(tts, text=text, emotion="WORRIED", language="zh")
    assert "cmn-latn-pinyin" in out["tts_model"]
    # 26 syllables: a couple of seconds at least, not a blip and not letter-by-letter spelling
    assert 2.0 < out["reply_duration"] < 15.0
    assert np.abs(out["_reply_waveform"]).max() > 0.05


def test_pinyin_keeps_tones_and_punctuation_as_pauses():
    assert to_pinyin("你好，世界。") == "ni3 hao3 , shi4 jie4 ."
    assert to_pinyin("真的吗？") == "zhen1 de5 ma5 ?"  # the neutral tone is written 5
    assert to_pinyin("好难过……") == "hao3 nan2 guo4 ."


def test_prosody_table_covers_every_reply_emotion():
    default, table = load_prosody_table()
    assert set(table) == set(vocab.REPLY_EMOTIONS)
    assert table["HAPPY"].speed > table["WORRIED"].speed and table["HAPPY"].pitch > table["WORRIED"].pitch


def test_cache_hit_returns_identical_audio_without_calling_espeak(tmp_path, monkeypatch):
    first = EspeakTTS(cache_dir=str(tmp_path))
    first.setup()  # version and variant checks run espeak-ng; count only the synthesis from here on
    calls = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(espeak_tts.subprocess, "run", counting_run)
    a = speak(first, emotion="HAPPY")
    assert len(calls) == 1 and calls[0][0] == "espeak-ng"
    assert len(list(tmp_path.rglob("*.npy"))) == 1

    second = EspeakTTS(cache_dir=str(tmp_path))  # a new worker sharing the cache
    second.setup()
    b = speak(second, emotion="HAPPY")
    assert len(calls) == 1  # served from the cache: espeak-ng was not run again
    np.testing.assert_array_equal(a["_reply_waveform"], b["_reply_waveform"])
    assert a["reply_duration"] == b["reply_duration"]

    speak(second, emotion="WORRIED")  # other prosody, other key: a miss
    assert len(calls) == 2


def test_nonzero_exit_is_rejected_as_tts_failed_with_stderr(tmp_path):
    # espeak-ng rarely exits non-zero on its own (an unknown voice given with -m falls back to
    # the default), so a wrapper stands in for a broken install: it answers the setup queries
    # through the real espeak-ng and fails every synthesis the way a crashing binary would.
    wrapper = tmp_path / "broken-espeak"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version|--voices*) exec espeak-ng "$@";; esac\n'
        "echo 'espeak-ng: cannot open phoneme data' >&2\n"
        "exit 3\n"
    )
    wrapper.chmod(0o755)
    stage = EspeakTTS(binary=str(wrapper))
    stage.setup()
    (out,) = stage.process({"id": "r", "source_uri": "u.wav", "reply_text": "Hello there.", "language": "en"})
    assert isinstance(out, Reject) and out.reason == "tts_failed" and out.stage == "tts"
    assert "status 3" in out.detail and "cannot open phoneme data" in out.detail


def test_silent_output_is_rejected_as_tts_failed(tts):
    # espeak-ng speaks "..." as pure silence: no reply audio, so the record leaves as a reject
    (out,) = tts.process({"id": "r", "source_uri": "u.wav", "reply_text": "...", "language": "en"})
    assert isinstance(out, Reject) and out.reason == "tts_failed" and out.stage == "tts"
    assert "silent" in out.detail and out.id == "r" and out.source_uri == "u.wav"


def test_missing_reply_text_is_rejected(tts):
    (out,) = tts.process({"id": "r", "reply_text": None, "language": "en"})
    assert isinstance(out, Reject) and out.reason == "no_reply_text"


def test_missing_espeak_or_variant_fails_in_setup_with_a_clear_message():
    with pytest.raises(EspeakError, match="not found on PATH.*apt-get install espeak-ng"):
        EspeakTTS(binary="espeak-ng-that-is-not-installed").setup()
    with pytest.raises(ValueError, match="no voice variant 'zz9'"):
        EspeakTTS(variant="zz9").setup()
    # espeak-ng itself would silently fall back to its default voice here
    with pytest.raises(ValueError, match="no voice 'no-such-voice'"):
        EspeakTTS(voice_en="no-such-voice").setup()


def test_builds_from_the_backend_table_with_profile_params():
    backends.check_params("tts", "espeak", {"variant": "m3", "cache_dir": "/tmp/x"}, where="tts")
    stage = backends.build_stage("tts", "espeak", {"variant": "m3", "voice_en": "en-gb"})
    stage.setup()
    assert stage.describe("en").endswith("en-gb+m3")
