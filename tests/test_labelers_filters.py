"""QualityFilter's minimum label score, and every filter's reject naming the filter; under StageRunner."""

from __future__ import annotations

import pytest
import test_labelers_support as speech
from echat.labelers.filters import QualityFilter
from echat.schemas.stage import Reject

BASE = {"source_uri": "a.wav", "id": "s1", "duration": 2.0, "transcript": "hello there"}


def run(stage, **fields):
    (out,) = speech.run_stage(stage, {**BASE, **fields})
    return out


def test_one_number_bounds_every_label():
    stage = QualityFilter(min_label_score=0.5)
    out = run(stage, gender="male", gender_score=0.9, emotion="sad", emotion_score=0.35)
    assert isinstance(out, Reject) and out.reason == "filtered_min_emotion_score" and out.stage == "filter"
    assert "emotion_score 0.350 < min_label_score.emotion 0.5" in out.detail
    kept = {**BASE, "gender": "male", "gender_score": 0.9, "emotion": "sad", "emotion_score": 0.55}
    assert speech.run_stage(stage, kept) == [kept]


def test_a_map_bounds_only_the_fields_it_names():
    stage = QualityFilter(min_label_score={"gender": 0.8, "transcript": 0.3})
    assert run(stage, gender="female", gender_score=0.7).reason == "filtered_min_gender_score"
    assert run(stage, transcript_confidence=0.1).reason == "filtered_min_transcript_score"
    record = {**BASE, "gender": "female", "gender_score": 0.85, "emotion": "happy", "emotion_score": 0.1}
    assert speech.run_stage(stage, record) == [record]  # emotion is not bounded here


def test_unknown_or_unscored_labels_pass():
    stage = QualityFilter(min_label_score=0.9)
    for fields in ({"gender": None, "gender_score": None, "quality_flags": ["gender_unknown"]},
                   {"age": "adult", "age_score": None},
                   {"events": [], "events_score": 0.95}):
        record = {**BASE, **fields}
        assert speech.run_stage(stage, record) == [record], fields
    assert run(stage, events=["cough"], events_score=0.35).reason == "filtered_min_events_score"


def test_bad_bounds_are_named():
    with pytest.raises(ValueError, match="unknown field"):
        QualityFilter(min_label_score={"mood": 0.5})
    with pytest.raises(ValueError, match="min_label_score.gender"):
        QualityFilter(min_label_score={"gender": 1.5})
    with pytest.raises(ValueError, match="min_label_score"):
        QualityFilter(min_label_score="high")


@pytest.mark.parametrize(
    "fields, reason, parameter",
    [
        ({"duration": 0.2}, "filtered_min_duration", "min_duration_s"),
        ({"duration": 31.0}, "filtered_max_duration", "max_duration_s"),
        ({"snr_db": 3.0}, "filtered_min_snr", "min_snr_db"),
        ({"speech_ratio": 0.1}, "filtered_min_speech_ratio", "min_speech_ratio"),
        ({"clipping_ratio": 0.2}, "filtered_clipping", "max_clipping_ratio"),
        ({"style": "news/science", "style_score": 0.2}, "filtered_min_style_score", "min_label_score.style"),
        ({"transcript": " ", "quality_flags": ["asr_empty"]}, "filtered_no_transcript", "require_transcript"),
    ],
)
def test_every_reject_names_its_filter(fields, reason, parameter):
    stage = QualityFilter(min_snr_db=10.0, min_speech_ratio=0.3, min_label_score=0.5)
    out = run(stage, **fields)
    assert isinstance(out, Reject) and out.reason == reason and out.reason.startswith("filtered_")
    assert parameter in out.detail


def test_the_profile_takes_a_number_or_a_map():
    from echat.pipelines.profile import load_profile

    for value, expected in (("0.4", 0.4), ("{gender: 0.8, emotion: 0.3}", {"gender": 0.8, "emotion": 0.3})):
        profile = load_profile("local", [f"filter.params.min_label_score={value}"])
        (entry,) = [s for s in profile.stages if s.slot == "filter"]
        assert entry.params["min_label_score"] == expected
