"""Pitch tracking and the pitch gender labeler on real espeak voices and on the demo corpus (its
accuracy on the voices it labels, and how many it leaves unknown); the stage runs under StageRunner
as a build runs it (precedence, provenance stamping, declared writes)."""

from __future__ import annotations

import labelers_demo_support as demo
import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.gender import MODEL_NAME, UNKNOWN_FLAG, PitchGender
from echat.labelers.pitch import F0_KEY, FMAX_HZ, FMIN_HZ, FRAME_LENGTH, HOP_LENGTH, f0_of, voiced_f0, warm_up

SR = speech.SR


@pytest.fixture(scope="module")
def gender() -> PitchGender:
    stage = PitchGender()
    stage.setup()
    return stage


def harmonic_tone(f0: float, seconds: float, harmonics: int = 8) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, harmonics + 1))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.mark.parametrize("f0", [90.0, 140.0, 220.0, 330.0])
def test_f0_of_a_harmonic_tone(f0):
    estimate = voiced_f0(harmonic_tone(f0, 1.0))
    assert len(estimate) > 80  # nearly every 10 ms frame is voiced
    assert np.median(estimate) == pytest.approx(f0, rel=0.02)


def test_noise_and_silence_are_not_voiced():
    assert len(voiced_f0(speech.white_noise(SR, 0.1))) < 5
    assert len(voiced_f0(speech.silence(1.0))) == 0
    assert len(voiced_f0(speech.silence(0.01))) == 0  # shorter than one frame


def test_running_speech_is_voiced_in_its_vowels_not_its_pauses():
    # Several sentences with pauses between them (its speed is measured in benchmarks/bench_labelers.py).
    warm_up()
    waveform = np.concatenate([speech.say(s) for s in speech.SENTENCES])
    f0 = voiced_f0(waveform)
    frames = (len(waveform) - FRAME_LENGTH) // HOP_LENGTH + 1
    assert 0.3 < len(f0) / frames < 0.95  # pauses and unvoiced consonants are left out
    assert np.all((f0 >= FMIN_HZ) & (f0 <= FMAX_HZ))
    assert np.median(f0) > 165  # en+f3, a female voice


def test_yin_is_librosa_yin_on_the_same_frames():
    import librosa
    from echat.labelers.pitch import yin

    waveform = np.concatenate([speech.say(s, v) for s, v in zip(speech.SENTENCES, ("en+f3", "en+m3", "en+f5", "en+m7"))])
    theirs = librosa.yin(waveform, fmin=FMIN_HZ, fmax=FMAX_HZ, sr=SR, frame_length=FRAME_LENGTH,
                         hop_length=HOP_LENGTH, center=False)
    frames = np.lib.stride_tricks.sliding_window_view(waveform, FRAME_LENGTH)[::HOP_LENGTH]
    ours = yin(np.ascontiguousarray(frames))
    assert ours.shape == theirs.shape
    # The same estimator; its FFT is shorter, so a frame whose trough sits at the 0.1 threshold
    # may, rarely, pick another one.
    assert np.mean(np.isclose(ours, theirs, rtol=1e-3)) > 0.995


def test_f0_is_computed_once_and_cached_on_the_record():
    record = {"_waveform": harmonic_tone(150, 0.5), "sampling_rate": SR}
    first = f0_of(record)
    assert record[F0_KEY] is first and f0_of(record) is first


@pytest.mark.parametrize("voice", speech.MALE_VOICES + speech.FEMALE_VOICES)
def test_espeak_voices_get_their_gender(gender, voice):
    expected = "male" if voice in speech.MALE_VOICES else "female"
    record = {"source_uri": voice, "_waveform": speech.speech_for_voice(voice), "sampling_rate": SR}
    (out,) = speech.run_stage(gender, record)
    f0 = out[F0_KEY]
    print(f"\n{voice}: median F0 {np.median(f0):.0f} Hz -> {out.get('gender')} ({out.get('gender_score')})")
    # At espeak's default pitch every voice here is clear of the unknown band (about 125-163 Hz).
    assert out["gender"] == expected
    assert gender.min_score <= out["gender_score"] <= 0.95 and isinstance(out["gender_score"], float)
    assert out["gender_model"] == MODEL_NAME
    assert F0_KEY not in record  # the cache went on the output copy


def test_score_is_one_half_at_the_center_and_rises_with_distance(gender):
    assert gender.classify(143.0) == ("female", 0.5)
    scores = [gender.classify(f)[1] for f in (140, 130, 120, 100, 80, 60)]
    assert scores == sorted(scores) and scores[-1] == 0.95
    # the calibration: log-odds 8 per octave, so a fifth of an octave gives about 0.83
    assert gender.classify(143.0 * 2 ** 0.2)[1] == pytest.approx(0.832, abs=0.002)
    assert gender.classify(143.0 / 2 ** 0.2) == ("male", pytest.approx(0.832, abs=0.002))


def test_a_voice_in_the_unclear_band_is_left_unknown(gender):
    (out,) = speech.run_stage(gender, {"_waveform": harmonic_tone(150.0, 1.0), "sampling_rate": SR, "quality_flags": []})
    assert out.get("gender") is None and out.get("gender_score") is None and out.get("gender_model") is None
    assert out["quality_flags"] == [UNKNOWN_FLAG]
    # a lower min_score labels it, with its honest score
    (out,) = speech.run_stage(PitchGender(min_score=0.5), {"_waveform": harmonic_tone(150.0, 1.0), "sampling_rate": SR})
    assert out["gender"] == "female" and 0.5 < out["gender_score"] < 0.75


def test_accuracy_on_the_demo_corpus_voices_it_labels():
    """At least 95% right on the demo voices it labels, leaving at most a quarter unknown; the score
    close to the accuracy where it claims much (measured on 420 segments of the 480-file corpus:
    364 labelled, all right; the figures are in labelers/gender.py and the benchmark)."""
    stage = PitchGender()
    stage.setup()
    folder, rows = demo.corpus()
    truth = demo.truth()
    unheard = demo.voices_not_as_labelled(rows)
    assert unheard == {"en-gb+f3"} or not unheard  # espeak-ng 1.51 ignores that variant; a fixed corpus has none
    outputs = [o for o in speech.run_stage(stage, *demo.segments()) if truth[o["source_uri"]]["speaker"] not in unheard]
    labelled = [o for o in outputs if o.get("gender")]
    right = [o for o in labelled if o["gender"] == truth[o["source_uri"]]["gender"]]
    unknown = len(outputs) - len(labelled)
    accuracy = len(right) / len(labelled)
    print(f"\ndemo corpus ({len(outputs)} segments, voices {sorted(unheard)} left out): {len(labelled)} labelled, "
          f"accuracy {accuracy:.1%}, {unknown} unknown ({unknown / len(outputs):.0%}), mean score "
          f"{np.mean([o['gender_score'] for o in labelled]):.3f}")
    assert accuracy >= 0.95
    assert unknown <= 0.25 * len(outputs)
    assert all(UNKNOWN_FLAG in o["quality_flags"] for o in outputs if not o.get("gender"))
    # where the score says 0.9 or more, the label is right at least 90% of the time
    sure = [o for o in labelled if o["gender_score"] >= 0.9]
    assert sure and sum(o in right for o in sure) >= 0.9 * len(sure)


def test_manifest_gender_wins(gender):
    record = {"_waveform": speech.say("Hello there.", "en+m3"), "sampling_rate": SR, "gender": "female",
              "gender_score": 1.0, "gender_model": "manifest"}
    (out,) = speech.run_stage(gender, record)
    assert out is record and out["gender"] == "female"  # the runner's precedence: not even run


def test_too_little_voicing_leaves_gender_unknown(gender):
    for waveform in (speech.white_noise(2 * SR, 0.05), harmonic_tone(120, 0.15)):
        (out,) = speech.run_stage(gender, {"_waveform": waveform, "sampling_rate": SR, "quality_flags": []})
        assert out.get("gender") is None and out.get("gender_score") is None
        assert out["quality_flags"] == [UNKNOWN_FLAG]
