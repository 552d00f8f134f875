"""SileroVAD with the real silero model on espeak speech."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.vad import SPLIT_FLAG, SileroVAD, plan_segments, spans_within
from echat.schemas.record import record_id
from echat.schemas.stage import Reject

SR = speech.SR
TOLERANCE_S = 0.3


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    stage = SileroVAD(threshold=0.5, min_silence_s=0.3, merge_gap_s=0.8, min_segment_s=1.0, max_segment_s=30.0, pad_s=0.15)
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def speech_gap_speech():
    """0.5 s silence, sentence A, 2 s silence, sentence B, 0.5 s silence; with the true bounds."""
    a, b = speech.say(speech.SENTENCES[0]), speech.say(speech.SENTENCES[1], "en+m3")
    parts = [speech.silence(0.5), a, speech.silence(2.0), b, speech.silence(0.5)]
    waveform = np.concatenate(parts)
    b_offset = (len(parts[0]) + len(a) + len(parts[2])) / SR
    truth = [speech.first_last_sound(a, 0.5), speech.first_last_sound(b, b_offset)]
    return waveform, truth


def file_record(waveform, **extra):
    return {"source_uri": "corpus/a.wav", "source_dataset": "test", "_waveform": waveform, "sampling_rate": SR, **extra}


def test_speech_gap_speech_gives_two_segments_with_true_bounds(vad, speech_gap_speech):
    waveform, truth = speech_gap_speech
    outputs = list(vad.process(file_record(waveform)))
    segments = [o for o in outputs if not isinstance(o, Reject)]
    assert len(segments) == 2 and len(outputs) == 2
    for seg, (start, end) in zip(segments, truth):
        print(f"segment {seg['segment_start']:.3f}-{seg['segment_end']:.3f}  truth {start:.3f}-{end:.3f}")
        # the segment holds the speech plus at most pad_s (and VAD slack) each side
        assert abs(seg["segment_start"] - start) < TOLERANCE_S
        assert abs(seg["segment_end"] - end) < TOLERANCE_S
        assert seg["duration"] == pytest.approx(seg["segment_end"] - seg["segment_start"])
        assert len(seg["_waveform"]) == round(seg["duration"] * SR)
        assert seg["id"] == record_id("corpus/a.wav", seg["segment_start"], seg["segment_end"])
        # speech spans are relative to the segment and inside it
        spans = seg["_speech_spans"]
        assert spans and all(0 <= a < b <= seg["duration"] + 1e-6 for a, b in spans)
        assert spans[0][0] == pytest.approx(start - seg["segment_start"], abs=TOLERANCE_S)
    assert segments[0]["id"] != segments[1]["id"]
    assert segments[0]["segment_end"] <= segments[1]["segment_start"]


def test_segments_hold_slices_of_the_parent_waveform(vad, speech_gap_speech):
    waveform, _ = speech_gap_speech
    seg = next(vad.process(file_record(waveform)))
    start = round(seg["segment_start"] * SR)
    assert np.shares_memory(seg["_waveform"], waveform)  # a view, not a copy
    assert np.array_equal(seg["_waveform"], waveform[start : start + len(seg["_waveform"])])


def test_manifest_transcript_is_kept_when_the_file_is_one_segment(vad):
    waveform = np.concatenate([speech.silence(0.3), speech.say(speech.SENTENCES[2]), speech.silence(0.3)])
    record = file_record(waveform, transcript=speech.SENTENCES[2], transcript_origin="manifest", transcript_confidence=1.0)
    (seg,) = list(vad.process(record))
    assert seg["transcript"] == speech.SENTENCES[2]
    assert seg["transcript_origin"] == "manifest" and seg["transcript_confidence"] == 1.0
    assert SPLIT_FLAG not in (seg.get("quality_flags") or [])


def test_transcribed_file_with_a_pause_stays_whole(vad, speech_gap_speech):
    waveform, truth = speech_gap_speech
    record = file_record(waveform, transcript="two sentences", transcript_origin="manifest", transcript_confidence=1.0)
    (seg,) = list(vad.process(record))
    assert seg["transcript"] == "two sentences" and SPLIT_FLAG not in (seg.get("quality_flags") or [])
    assert seg["segment_start"] < truth[0][0] and seg["segment_end"] > truth[1][1]  # both sentences inside
    assert len(seg["_speech_spans"]) == 2  # the pause is still visible to the speech-ratio metric


def test_manifest_transcript_is_dropped_on_every_piece_of_a_split(speech_gap_speech):
    vad = SileroVAD(threshold=0.5, min_silence_s=0.3, merge_gap_s=0.8, min_segment_s=1.0, max_segment_s=30.0,
                    pad_s=0.15, keep_transcribed_whole=False)
    vad.setup()
    waveform, _ = speech_gap_speech
    parent_flags = ["from_manifest_check"]
    record = file_record(
        waveform,
        transcript="two sentences",
        transcript_origin="manifest",
        transcript_confidence=1.0,
        gender="female",
        quality_flags=parent_flags,
    )
    segments = list(vad.process(record))
    assert len(segments) == 2
    for seg in segments:
        assert seg["transcript"] is None and seg["transcript_origin"] is None and seg["transcript_confidence"] is None
        assert seg["quality_flags"] == ["from_manifest_check", SPLIT_FLAG]
        assert seg["gender"] == "female"  # labels of the whole file still hold for each piece
    assert parent_flags == ["from_manifest_check"]  # the input's list was not appended to
    assert record["transcript"] == "two sentences" and "_speech_spans" not in record


def test_silence_is_no_speech(vad):
    for waveform in (speech.silence(3.0), speech.white_noise(3 * SR, 0.001)):
        (out,) = list(vad.process(file_record(waveform)))
        assert isinstance(out, Reject) and out.reason == "no_speech" and out.stage == "vad"
        assert out.segment_start is None  # a file-level reject


def test_a_short_fragment_is_rejected_not_lost(vad):
    word = speech.say("yes")  # about 0.4 s of speech
    waveform = np.concatenate([speech.silence(1.0), word, speech.silence(3.0), speech.say(speech.SENTENCES[3]), speech.silence(0.5)])
    outputs = list(vad.process(file_record(waveform)))
    rejects = [o for o in outputs if isinstance(o, Reject)]
    kept = [o for o in outputs if not isinstance(o, Reject)]
    assert len(kept) == 1 and len(rejects) == 1
    short = rejects[0]
    assert short.reason == "segment_too_short" and short.stage == "vad"
    assert 0.6 < short.segment_start < 1.2 and short.segment_end - short.segment_start < 1.0
    assert short.id == record_id("corpus/a.wav", short.segment_start, short.segment_end)


def test_long_speech_is_cut_under_max_segment(speech_gap_speech):
    stage = SileroVAD(max_segment_s=4.0, merge_gap_s=0.8, min_segment_s=0.5, pad_s=0.15)
    stage.setup()
    # about 12 s of continuous reading, no pause longer than the comma breaks
    waveform = speech.say(" ".join(speech.SENTENCES).replace(".", ","), speed=190)
    segments = [o for o in stage.process(file_record(waveform)) if not isinstance(o, Reject)]
    assert len(segments) >= 3
    assert all(s["duration"] <= 4.0 + 1e-6 for s in segments)
    for a, b in itertools.pairwise(segments):
        assert a["segment_end"] <= b["segment_start"] + 1e-9


def test_plan_segments_merges_close_speech_and_pads_without_overlap():
    spans = [(1.0, 2.0), (2.5, 3.0), (5.0, 6.0)]
    planned = plan_segments(spans, 6.05, merge_gap_s=0.8, max_segment_s=30.0, pad_s=0.15)
    assert planned == [(0.85, pytest.approx(3.15)), (pytest.approx(4.85), 6.05)]
    # a 0.2 s gap: the padding stops half-way, segments do not overlap
    planned = plan_segments([(1.0, 2.0), (2.2, 3.0)], 4.0, merge_gap_s=0.1, max_segment_s=30.0, pad_s=0.15)
    assert planned[0][1] == pytest.approx(2.1) and planned[1][0] == pytest.approx(2.1)
    # merging stops where the result would no longer fit in max_segment_s
    planned = plan_segments([(0.0, 2.0), (2.5, 4.5)], 5.0, merge_gap_s=0.8, max_segment_s=4.0, pad_s=0.15)
    assert len(planned) == 2


def test_plan_segments_splits_continuous_speech_at_the_quietest_point():
    waveform = speech.white_noise(10 * SR, 0.1)
    waveform[int(3.0 * SR) : int(3.05 * SR)] *= 0.01  # a dip at 3.0 s, inside the search window
    planned = plan_segments([(0.0, 10.0)], 10.0, waveform=waveform, merge_gap_s=0.8, max_segment_s=4.0, pad_s=0.0)
    assert planned[0][1] == pytest.approx(3.025, abs=0.02)
    assert all(b - a <= 4.0 for a, b in planned) and planned[-1][1] == 10.0


def test_spans_within_clips_and_shifts():
    assert spans_within([(0.5, 1.5), (2.0, 3.0), (4.0, 5.0)], 1.0, 2.5) == [(0.0, 0.5), (1.0, 1.5)]


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        SileroVAD(threshold=1.5)
    with pytest.raises(ValueError, match="max_segment_s"):
        SileroVAD(max_segment_s=0.4)
