"""The pitch age labeler: child only for sustained high pitch, adult for low pitch, else unknown;
never a child on the demo corpus (all adult voices); run under StageRunner as a build runs it."""

from __future__ import annotations

import labelers_demo_support as demo
import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.age import MODEL_NAME, UNKNOWN_FLAG, PitchAge

SR = speech.SR


@pytest.fixture(scope="module")
def age() -> PitchAge:
    stage = PitchAge()
    stage.setup()
    return stage


def label(stage, waveform, **extra):
    (out,) = speech.run_stage(stage, {"source_uri": "a.wav", "_waveform": waveform, "sampling_rate": SR, **extra})
    return out


def high_voice() -> np.ndarray:
    """espeak's en+Andrea near the top of its pitch range (-p 99: median F0 about 430 Hz), the
    closest espeak comes to a young child's pitch (it has no child voice)."""
    import io
    import subprocess

    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", "en+Andrea", "-p", "99", "--stdout",
                          "I went to the market this morning and bought some apples."], capture_output=True, check=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(data, rate, SR).astype(np.float32)


def test_low_voices_are_adult_high_sustained_pitch_a_child_and_between_unknown(age):
    out = label(age, speech.speech_for_voice("en+m3"))
    assert (out["age"], out["age_score"], out["age_model"]) == ("adult", 0.6, MODEL_NAME)
    out = label(age, high_voice())
    assert (out["age"], out["age_score"]) == ("child", 0.5)
    out = label(age, speech.speech_for_voice("en+f3"), quality_flags=[])  # an adult woman: about 215 Hz
    assert out.get("age") is None and out.get("age_score") is None and out["quality_flags"] == [UNKNOWN_FLAG]
    out = label(age, speech.white_noise(SR, 0.05))  # nothing voiced
    assert out.get("age") is None and UNKNOWN_FLAG in out["quality_flags"]


def test_a_few_high_peaks_do_not_make_a_child(age):
    # median above the bound but a quarter of the frames well below it: excited, not a child's voice
    f0 = np.concatenate([np.full(30, 200.0), np.full(70, 360.0)])
    assert age.classify(f0) is None
    assert age.classify(np.full(100, 360.0)) == ("child", 0.5)
    assert age.classify(np.full(100, 170.0)) == ("adult", 0.6)


def test_no_demo_voice_is_called_a_child():
    stage = PitchAge()
    stage.setup()
    truth = demo.truth()
    outputs = speech.run_stage(stage, *demo.segments())
    ages = [o.get("age") for o in outputs]
    adult_men = [o for o in outputs if truth[o["source_uri"]]["gender"] == "male" and truth[o["source_uri"]]["speaker"] != "en-gb+f3"]
    print(f"\ndemo corpus, all adult voices: {ages.count('adult')} adult, {ages.count(None)} unknown of {len(outputs)}")
    assert "child" not in ages and "old" not in ages
    assert all(o["age"] == "adult" for o in adult_men)  # every male voice is below 180 Hz
    assert ages.count(None) < 0.5 * len(outputs)


def test_manifest_age_wins_and_settings_are_checked(age):
    record = {"_waveform": high_voice(), "sampling_rate": SR, "age": "adult", "age_score": 1.0, "age_model": "manifest"}
    (out,) = speech.run_stage(age, record)
    assert out is record
    with pytest.raises(ValueError, match="adult_max_hz"):
        PitchAge(adult_max_hz=400.0)
    with pytest.raises(ValueError, match="child_score"):
        PitchAge(child_score=0.0)
