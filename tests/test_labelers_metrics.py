"""AcousticMetrics: values inside the schema's ranges, and moving the right way with the audio."""

from __future__ import annotations

import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.metrics import METRIC_FIELDS, AcousticMetrics, snr_db, speaking_rate, speech_ratio
from echat.labelers.vad import SileroVAD
from echat.schemas.record import FIELDS_BY_NAME

SR = speech.SR


@pytest.fixture(scope="module")
def metrics() -> AcousticMetrics:
    stage = AcousticMetrics()
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    stage = SileroVAD()
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return np.concatenate([speech.silence(0.5), speech.say(speech.SENTENCES[1], "en+m3"), speech.silence(0.5)])


def segment_record(vad: SileroVAD, waveform: np.ndarray, **extra) -> dict:
    """The single segment the VAD makes of `waveform`, as the pipeline would hand it on."""
    (seg,) = [o for o in vad.process({"source_uri": "m.wav", "_waveform": waveform, "sampling_rate": SR}) if isinstance(o, dict)]
    seg.update(extra)
    return seg


def with_noise(waveform: np.ndarray, snr: float, seed: int = 1) -> np.ndarray:
    voiced = waveform[np.abs(waveform) > 1e-3]
    noise_rms = np.sqrt(np.mean(voiced**2) / 10 ** (snr / 10))
    return waveform + speech.white_noise(len(waveform), noise_rms, seed)


def assert_in_schema_ranges(record: dict) -> None:
    for name in METRIC_FIELDS:
        value = record[name]
        if value is None:
            continue
        assert type(value) is float, f"{name} is {type(value).__name__}"
        field = FIELDS_BY_NAME[name]
        assert field.min <= value <= field.max, f"{name}={value} outside [{field.min}, {field.max}]"


def test_all_metrics_in_range_on_clean_speech(metrics, vad, clean):
    record = segment_record(vad, clean, transcript="please call me back when you get home tonight", language="en")
    (out,) = list(metrics.process(record))
    assert_in_schema_ranges(out)
    assert all(out[name] is not None for name in METRIC_FIELDS)
    print({name: round(out[name], 2) for name in METRIC_FIELDS})
    assert out["snr_db"] > 60  # digital silence around synthetic speech
    assert 0.6 < out["speech_ratio"] <= 1.0
    assert 70 < out["pitch_mean_hz"] < 160 and out["pitch_std_hz"] > 0
    assert 1.5 < out["speaking_rate"] < 5.0  # words per second of espeak at its default speed
    assert out["clipping_ratio"] == 0.0
    assert -35 < out["loudness_dbfs"] < -5


def test_snr_orders_clean_and_noisy_and_tracks_the_true_value(metrics, vad, clean):
    measured = {}
    for true_snr in (30.0, 20.0, 10.0, 5.0):
        (out,) = list(metrics.process(segment_record(vad, with_noise(clean, true_snr))))
        measured[true_snr] = out["snr_db"]
        assert_in_schema_ranges(out)
    (clean_out,) = list(metrics.process(segment_record(vad, clean)))
    print(f"\ntrue SNR -> measured: {measured}; clean: {clean_out['snr_db']:.1f}")
    values = [clean_out["snr_db"], *measured.values()]
    assert values == sorted(values, reverse=True)
    for true_snr, value in measured.items():
        assert value == pytest.approx(true_snr, abs=3.0)


def test_clipping_is_counted(metrics, vad, clean):
    clipped = np.clip(clean * 8.0, -1.0, 1.0)
    (out,) = list(metrics.process(segment_record(vad, clipped)))
    assert out["clipping_ratio"] > 0.01
    assert_in_schema_ranges(out)


def test_loudness_follows_gain(metrics, vad, clean):
    base = segment_record(vad, clean)
    quieter = dict(base, _waveform=base["_waveform"] * 0.5)
    (a,) = list(metrics.process(base))
    (b,) = list(metrics.process(quieter))
    assert a["loudness_dbfs"] - b["loudness_dbfs"] == pytest.approx(6.02, abs=0.05)


def test_existing_values_are_kept_and_input_untouched(metrics, vad, clean):
    record = segment_record(vad, clean, snr_db=12.5)
    (out,) = list(metrics.process(record))
    assert out["snr_db"] == 12.5
    assert "speech_ratio" not in record and "_f0" not in record


def test_without_vad_spans_energy_estimates_are_used(clean):
    ratio = speech_ratio(clean)
    assert 0.5 < ratio < 0.95  # the 1 s of padding silence is not speech
    assert snr_db(with_noise(clean, 20.0)) == pytest.approx(20.0, abs=4.0)
    assert speech_ratio(speech.silence(1.0)) == 0.0


def test_speaking_rate_counts_words_or_characters():
    assert speaking_rate("one two three four", 2.0) == 2.0
    assert speaking_rate("我今天很开心", 2.0) == 3.0
    assert speaking_rate("我用 iPhone 打电话", 1.0) == 5.0 + 1.0  # mixed: 5 characters and 1 word
    assert speaking_rate(None, 2.0) is None and speaking_rate("", 2.0) is None


def test_no_pitch_stats_without_voicing(metrics):
    record = {"_waveform": speech.white_noise(SR, 0.05), "sampling_rate": SR, "_speech_spans": [(0.0, 1.0)]}
    (out,) = list(metrics.process(record))
    assert out["pitch_mean_hz"] is None and out["pitch_std_hz"] is None
    assert out["speaking_rate"] is None
    assert_in_schema_ranges(out)
