"""EspeakTTS against the real espeak-ng: 16 kHz audio, emotion prosody, Mandarin via pinyin, cache,
replies in flight together; run under StageRunner as a build runs it (declared writes checked).

espeak-ng is part of the set-up (scripts/setup.sh installs it): when it is missing these tests fail.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from echat.labelers.pitch import voiced_f0
from echat.pipelines import backends
from echat.schemas import vocab
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject
from echat.schemas.stage_runner import StageRunner
from echat.synth import espeak_tts
from echat.synth.espeak_tts import EspeakError, EspeakTTS, load_prosody_table, to_pinyin

TEXT = "I heard you cough just now. Are you feeling all right? Please look after your health."


@pytest.fixture(scope="module")
def tts() -> EspeakTTS:
    stage = EspeakTTS()
    stage.setup()
    return stage


def run(stage: EspeakTTS, *records: dict) -> list:
    """One result per record under StageRunner: the record spoken, or its Reject."""
    results = StageRunner(stage).run(list(records))
    return [r if isinstance(r, Reject) else r[0] for r in results]


def speak(stage: EspeakTTS, text: str = TEXT, emotion: str | None = "NEUTRAL", language: str = "en") -> dict:
    (out,) = run(stage, {"id": "r1", "reply_text": text, "reply_emotion": emotion, "language": language})
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


def _median_f0(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Median F0 (Hz) of the loud frames, with librosa's yin at the rate the samples are said to be at."""
    import librosa

    frame, hop = int(0.093 * rate), int(0.010 * rate)
    f0 = librosa.yin(wave, fmin=60, fmax=500, sr=rate, frame_length=frame, hop_length=hop)
    rms = librosa.feature.rms(y=wave, frame_length=frame, hop_length=hop)[0]
    n = min(len(f0), len(rms))
    return float(np.median(f0[:n][rms[:n] > 0.02]))


def test_output_is_really_at_16khz(tts, tmp_path):
    # espeak-ng's own output (22,050 Hz, read at the rate its header gives) is the reference: the
    # stage's 16 kHz samples, read as 16 kHz, last as long and have the same pitch. Audio handed
    # on at espeak's rate but labelled 16 kHz would be 1.38x too long and 0.73x too low.
    reference = tmp_path / "reference.wav"
    neutral = tts.prosody["NEUTRAL"]
    subprocess.run(["espeak-ng", "-v", "en-us+f3", "-s", str(neutral.speed), "-p", str(neutral.pitch),
                    "-a", str(neutral.amplitude), "-w", str(reference), TEXT], check=True, capture_output=True)
    ref, ref_rate = sf.read(reference, dtype="float32")
    assert ref_rate != SAMPLE_RATE
    out = speak(tts)
    wave = out["_reply_waveform"]
    assert out["reply_duration"] == pytest.approx(ref.size / ref_rate, rel=0.03)  # measured: 5.27 s vs 5.21 s
    assert _median_f0(wave) == pytest.approx(_median_f0(ref, ref_rate), rel=0.02)  # measured: 209.2 Hz both


def test_duration_scales_with_the_text(tts):
    once = speak(tts)["reply_duration"]
    twice = speak(tts, text=f"{TEXT} {TEXT}")["reply_duration"]
    short = speak(tts, text="Are you feeling all right?")["reply_duration"]
    assert 1.8 < twice / once < 2.2  # measured 1.99
    assert short < 0.45 * once  # 5 of 16 words; measured 0.29


def test_prosody_per_emotion_changes_rate_and_pitch_measurably(tts):
    spoken = {emotion: speak(tts, emotion=emotion) for emotion in ("HAPPY", "NEUTRAL", "WORRIED", "SAD")}
    duration = {e: out["reply_duration"] for e, out in spoken.items()}
    f0 = {e: voiced_f0(out["_reply_waveform"]) for e, out in spoken.items()}
    # rate: the duration follows the table's words per minute (HAPPY 190 vs WORRIED 140: 0.74)
    expected = tts.prosody["WORRIED"].speed / tts.prosody["HAPPY"].speed
    assert duration["HAPPY"] / duration["WORRIED"] == pytest.approx(expected, rel=0.1)  # measured 0.70
    assert duration["HAPPY"] < duration["NEUTRAL"] < duration["WORRIED"] < duration["SAD"]
    # pitch: higher base pitch and a wider range for HAPPY (measured medians 249, 209, 185, 169 Hz)
    medians = {e: float(np.median(v)) for e, v in f0.items()}
    assert medians["HAPPY"] > 1.1 * medians["NEUTRAL"]
    assert medians["NEUTRAL"] > 1.05 * medians["WORRIED"] and medians["WORRIED"] > 1.05 * medians["SAD"]
    spread = {e: float(np.percentile(v, 90) - np.percentile(v, 10)) for e, v in f0.items()}
    assert spread["HAPPY"] > 1.3 * spread["WORRIED"]  # measured 84 vs 49 Hz


def test_mandarin_reply_is_spoken_through_pinyin(tts):
    text = "刚才听到你咳嗽了，身体还好吗？要注意身体，多喝点温水。"
    out = speak(tts, text=text, emotion="WORRIED", language="zh")
    assert "cmn-latn-pinyin" in out["tts_model"]
    wave = out["_reply_waveform"]
    assert wave.dtype == np.float32 and wave.size == pytest.approx(out["reply_duration"] * SAMPLE_RATE, abs=8)  # ms
    # 26 syllables: a couple of seconds at least, not a blip and not letter-by-letter spelling
    assert 2.0 < out["reply_duration"] < 15.0
    assert np.abs(wave).max() > 0.05 and voiced_f0(wave).size > 100  # voiced speech, not noise
    short = speak(tts, text="刚才听到你咳嗽了。", emotion="WORRIED", language="zh")["reply_duration"]
    assert 0.2 < short / out["reply_duration"] < 0.5  # 8 of 26 syllables; measured 0.33


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


def test_replies_in_flight_together_are_those_spoken_one_at_a_time(tmp_path):
    assert EspeakTTS.max_in_flight > 1 and EspeakTTS.thread_safe
    texts = ["Are you feeling all right?", "That sounds wonderful!", "I am sorry to hear that.",
             "刚才听到你咳嗽了。", "What happened next?", "Please look after your health."]
    emotions = ["WORRIED", "HAPPY", "SORRY", "WORRIED", "CURIOUS", "NEUTRAL"]
    records = [{"id": f"r{i}", "reply_text": t, "reply_emotion": e, "language": "zh" if i == 3 else "en"}
               for i, (t, e) in enumerate(zip(texts, emotions))]
    records.insert(2, {"id": "bad", "reply_text": "...", "language": "en"})  # a reject among them
    alone = EspeakTTS()
    alone.setup()
    alone.max_in_flight = 1
    expected = run(alone, *records)
    together = EspeakTTS(cache_dir=str(tmp_path))
    together.setup()
    got = run(together, *records)  # max_in_flight threads, sharing the stage and its cache
    assert [type(o) for o in got] == [type(o) for o in expected] and isinstance(got[2], Reject)
    for a, b in zip(expected, got):
        if not isinstance(a, Reject):
            assert b["id"] == a["id"] and b["tts_model"] == a["tts_model"]
            np.testing.assert_array_equal(a["_reply_waveform"], b["_reply_waveform"])
    assert len(list(tmp_path.rglob("*.npy"))) == len(texts)


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
    (out,) = run(stage, {"id": "r", "source_uri": "u.wav", "reply_text": "Hello there.", "language": "en"})
    assert isinstance(out, Reject) and out.reason == "tts_failed" and out.stage == "tts"
    assert "status 3" in out.detail and "cannot open phoneme data" in out.detail


def test_silent_output_is_rejected_as_tts_failed(tts):
    # espeak-ng speaks "..." as pure silence: no reply audio, so the record leaves as a reject
    (out,) = run(tts, {"id": "r", "source_uri": "u.wav", "reply_text": "...", "language": "en"})
    assert isinstance(out, Reject) and out.reason == "tts_failed" and out.stage == "tts"
    assert "silent" in out.detail and out.id == "r" and out.source_uri == "u.wav"


def test_missing_reply_text_is_rejected(tts):
    (out,) = run(tts, {"id": "r", "reply_text": None, "language": "en"})
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
    backends.check_params(backends.stage_class("tts", "espeak"), {"variant": "m3", "cache_dir": "/tmp/x"}, where="tts")
    stage = backends.build_stage("tts", "espeak", {"variant": "m3", "voice_en": "en-gb"})
    stage.setup()
    assert stage.describe("en").endswith("en-gb+m3")
