"""SileroVAD with the real silero model on espeak speech, run under StageRunner (so a write the
stage does not declare fails), and its batched path checked against silero's own per-file call."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.vad import FRAME, SPLIT_FLAG, SileroVAD, plan_segments, spans_within
from echat.schemas.audio import load_audio
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


run_vad = speech.run_stage  # under StageRunner: a write the stage does not declare fails


def test_speech_gap_speech_gives_two_segments_with_true_bounds(vad, speech_gap_speech):
    waveform, truth = speech_gap_speech
    outputs = run_vad(vad, file_record(waveform))
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
    seg = run_vad(vad, file_record(waveform))[0]
    start = round(seg["segment_start"] * SR)
    assert np.shares_memory(seg["_waveform"], waveform)  # a view, not a copy
    assert np.array_equal(seg["_waveform"], waveform[start : start + len(seg["_waveform"])])


def test_manifest_transcript_is_kept_when_the_file_is_one_segment(vad):
    waveform = np.concatenate([speech.silence(0.3), speech.say(speech.SENTENCES[2]), speech.silence(0.3)])
    record = file_record(waveform, transcript=speech.SENTENCES[2], transcript_origin="manifest", transcript_confidence=1.0)
    (seg,) = run_vad(vad, record)
    assert seg["transcript"] == speech.SENTENCES[2]
    assert seg["transcript_origin"] == "manifest" and seg["transcript_confidence"] == 1.0
    assert SPLIT_FLAG not in (seg.get("quality_flags") or [])


def test_transcribed_file_with_a_pause_stays_whole(vad, speech_gap_speech):
    waveform, truth = speech_gap_speech
    record = file_record(waveform, transcript="two sentences", transcript_origin="manifest", transcript_confidence=1.0)
    (seg,) = run_vad(vad, record)
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
    # Called directly, not under StageRunner: the runner counts any stage that writes `transcript` as a
    # transcript source, and a model never overrides the manifest, so it refuses this clearing as an
    # undeclared write (and, were the fields declared, would skip the VAD on every transcribed
    # file). test_labelers_chain covers the split under the runner.
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
        (out,) = run_vad(vad, file_record(waveform))
        assert isinstance(out, Reject) and out.reason == "no_speech" and out.stage == "vad"
        assert out.segment_start is None  # a file-level reject


def test_a_short_fragment_is_rejected_not_lost(vad):
    word = speech.say("yes")  # about 0.4 s of speech
    waveform = np.concatenate([speech.silence(1.0), word, speech.silence(3.0), speech.say(speech.SENTENCES[3]), speech.silence(0.5)])
    outputs = run_vad(vad, file_record(waveform))
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
    segments = [o for o in run_vad(stage, file_record(waveform)) if not isinstance(o, Reject)]
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


FRAME_S = FRAME / SR  # one silero frame, 32 ms: the tolerance between the batched and per-file paths


class PerFileVAD(SileroVAD):
    """The stage with silero's own get_speech_timestamps per file (the path before batching)."""

    def speech_spans_batch(self, waveforms):
        return [self.speech_spans(w) for w in waveforms]


def demo_waveforms(folder):
    import json

    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [load_audio(str(folder / row["path"]), target_sample_rate=SR).waveform for row in rows]


def bounds_of(output):
    if isinstance(output, Reject):
        return output.segment_start, output.segment_end
    return output["segment_start"], output["segment_end"]


def assert_same_spans(expected, got):
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert len(have) == len(want), (want, have)
        for (a0, a1), (b0, b1) in zip(want, have):
            assert abs(a0 - b0) <= FRAME_S and abs(a1 - b1) <= FRAME_S, (want, have)


@pytest.mark.parametrize("runtime", ["jit", "onnx"])
def test_batched_path_gives_the_per_file_segments_on_the_demo_corpus(demo_corpus, runtime):
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    stage = SileroVAD(runtime=runtime)
    stage.setup()
    waveforms = demo_waveforms(demo_corpus)
    # and in one batch: files of a minute (several encoder windows), a tiny one and an empty one
    mixed = [np.concatenate(waveforms[:10]), *waveforms[10:14], np.zeros(100, np.float32), np.zeros(0, np.float32)]
    for files in (waveforms, mixed):
        expected = [stage.speech_spans(w) for w in files]
        got = []
        for i in range(0, len(files), stage.batch_size):
            got.extend(stage.speech_spans_batch(files[i:i + stage.batch_size]))
        assert_same_spans(expected, got)
        assert sum(map(len, expected)) >= len(files) - 2  # speech was found: the comparison means something

    # the stage's segments, batched under the runner, against the per-file path's
    records = [file_record(w, source_uri=f"demo/{i}.wav") for i, w in enumerate(waveforms)]
    reference = PerFileVAD()
    reference.setup()
    want, got = run_vad(reference, *records), run_vad(stage, *records)
    assert [type(o) for o in got] == [type(o) for o in want]
    for a, b in zip(want, got):
        assert np.allclose(bounds_of(a), bounds_of(b), atol=FRAME_S), (bounds_of(a), bounds_of(b))


@pytest.mark.parametrize("runtime", ["jit", "onnx"])
def test_batched_probabilities_are_silero_frame_by_frame_ones(demo_corpus, runtime):
    """Stricter than the segments: a frame's context or state going astray moves few bounds by
    more than a frame, but moves probabilities."""
    import torch

    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    stage = SileroVAD(runtime=runtime)
    stage.setup()
    waveforms = demo_waveforms(demo_corpus)[:7]
    waveforms.append(np.concatenate(waveforms))  # longer than one encoder window
    model = stage._model  # silero's TorchScript model, called as get_speech_timestamps calls it
    expected = []
    with torch.inference_mode():
        for w in waveforms:
            model.reset_states()
            chunks = np.pad(w, (0, -len(w) % FRAME)).reshape(-1, FRAME)
            expected.append(np.array([float(model(torch.from_numpy(c), SR)) for c in chunks]))
    for want, got in zip(expected, stage.speech_probs_batch(waveforms)):
        assert got.shape == want.shape and np.max(np.abs(got - want)) < 1e-4


def test_a_bad_record_is_rejected_alone_and_its_neighbours_are_unchanged(vad, speech_gap_speech):
    waveform, _ = speech_gap_speech
    alone = run_vad(vad, file_record(waveform))
    batch = [
        file_record(waveform, source_uri="corpus/a.wav"),
        file_record(np.stack([waveform, waveform]), source_uri="corpus/stereo.wav"),
        file_record(waveform, source_uri="corpus/8k.wav", sampling_rate=8000),
        file_record(waveform, source_uri="corpus/a.wav"),
    ]
    outputs = run_vad(vad, *batch)
    rejects = [o for o in outputs if isinstance(o, Reject)]
    assert [(r.source_uri, r.reason) for r in rejects] == [
        ("corpus/stereo.wav", "stage_error"), ("corpus/8k.wav", "stage_error")]
    assert "mono" in rejects[0].detail and "16000 Hz" in rejects[1].detail
    segments = [o for o in outputs if not isinstance(o, Reject)]
    assert [s["id"] for s in segments] == [s["id"] for s in alone] * 2


def test_working_keys_of_the_whole_file_do_not_reach_its_segments(vad, speech_gap_speech):
    waveform, _ = speech_gap_speech
    record = file_record(waveform, _f0=np.array([120.0], np.float32), _speech_spans=[(0.0, 9.9)])
    segments = run_vad(vad, record)
    assert len(segments) == 2
    for seg in segments:
        assert "_f0" not in seg  # the file's F0 is not the segment's: pitch recomputes it
        assert seg["_speech_spans"] != [(0.0, 9.9)]


def test_a_changed_silero_model_is_refused_at_setup():
    from echat.labelers.vad import _check_jit_parts

    with pytest.raises(RuntimeError, match="not laid out"):
        _check_jit_parts(object())


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        SileroVAD(threshold=1.5)
    with pytest.raises(ValueError, match="max_segment_s"):
        SileroVAD(max_segment_s=0.4)
    with pytest.raises(ValueError, match="runtime"):
        SileroVAD(runtime="cuda")


# ---------------------------------------------------------------- the long-turn cut


def test_plan_segments_cuts_a_long_turn_at_its_longest_pauses():
    # 4 s of speech, pauses of 0.3 s, except 0.6 s after the 3rd span and 0.5 s after the 6th.
    spans, t = [], 0.0
    for i in range(9):
        spans.append((t, t + 4.0))
        t += 4.0 + (0.6 if i == 2 else 0.5 if i == 5 else 0.3)
    total = spans[-1][1] + 1.0
    whole = plan_segments(spans, total, merge_gap_s=0.8, max_segment_s=60.0, pad_s=0.0)
    assert len(whole) == 1  # no turn bound: one 39 s turn
    cut = plan_segments(spans, total, merge_gap_s=0.8, max_segment_s=60.0, pad_s=0.0, max_turn_s=15.0)
    # first at the 0.6 s pause (a 12.6 s and a 26 s turn), then the 26 s one at its 0.5 s pause
    assert [(round(a, 2), round(b, 2)) for a, b in cut] == [(0.0, 12.6), (13.2, 25.8), (26.3, 38.9)]
    # a turn within the bound, or one with no pause, is left alone
    assert plan_segments(spans[:3], total, merge_gap_s=0.8, max_segment_s=60.0, pad_s=0.0, max_turn_s=15.0) == [(0.0, 12.6)]
    assert plan_segments([(0.0, 20.0)], 20.0, merge_gap_s=0.8, max_segment_s=60.0, pad_s=0.0, max_turn_s=15.0) == [(0.0, 20.0)]


@pytest.fixture(scope="module")
def long_turn():
    """About 40 s of espeak sentences with pauses between them short enough (under merge_gap_s) to
    merge into one turn: about 0.4 s of silence between sounds, except two of about 0.65 s after
    13 s and 27 s; with the audible bounds of those two (last sound before, first sound after).
    espeak adds about 0.23 s of silence around each sentence."""
    sentences = [*speech.SENTENCES, "I will see you again next week.", "The weather was cold and wet."]
    parts, t, long_gaps, i = [speech.silence(0.5)], 0.5, [], 0
    while t < 40.0:
        sentence = speech.say(sentences[i % len(sentences)], ("en+f3", "en+m3")[i % 2])
        first, last = speech.first_last_sound(sentence, t)
        if long_gaps and len(long_gaps[-1]) == 1:
            long_gaps[-1].append(first)
        parts.append(sentence)
        t += len(sentence) / SR
        gap = 0.15
        if (len(long_gaps) == 0 and t > 13.0) or (len(long_gaps) == 1 and t > 27.0):
            gap = 0.4
            long_gaps.append([last])
        parts.append(speech.silence(gap))
        t += gap
        i += 1
    return np.concatenate(parts), [tuple(g) for g in long_gaps]


def test_a_40_s_turn_is_cut_at_its_longest_pauses(vad, long_turn):
    waveform, long_pauses = long_turn
    assert len(waveform) / SR > 40.0
    segments = [o for o in run_vad(vad, file_record(waveform)) if not isinstance(o, Reject)]
    print("\n" + ", ".join(f"{s['segment_start']:.2f}-{s['segment_end']:.2f}" for s in segments), long_pauses)
    assert len(segments) == 3
    assert all(s["duration"] <= 15.0 + 2 * vad.pad_s for s in segments)
    for (a, b), (start, end) in zip(itertools.pairwise(segments), long_pauses):
        # each cut falls inside one of the two long pauses, padding included
        assert start - 0.05 <= a["segment_end"] <= b["segment_start"] <= end + 0.05

    # Without the bound the same file is cut only where it no longer fits max_segment_s (30 s).
    unbounded = SileroVAD(max_turn_s=None)
    unbounded.setup()
    pieces = [o for o in run_vad(unbounded, file_record(waveform)) if not isinstance(o, Reject)]
    print(", ".join(f"{s['segment_start']:.2f}-{s['segment_end']:.2f}" for s in pieces))
    assert len(pieces) == 2 and pieces[0]["duration"] > 25.0
    for a, b in long_pauses:
        assert 0.5 < b - a < vad.merge_gap_s


def test_a_transcribed_file_within_max_segment_stays_whole(vad, long_turn):
    waveform, long_pauses = long_turn
    cut_at = int((long_pauses[1][0] + 0.2) * SR)  # about 27 s: longer than the turn bound, within a segment
    record = file_record(waveform[:cut_at], transcript="the words of the whole file", transcript_origin="manifest")
    (kept,) = run_vad(vad, record)
    assert kept["transcript"] == "the words of the whole file" and SPLIT_FLAG not in (kept.get("quality_flags") or [])
    # the same audio without a transcript is two turns
    pieces = [o for o in run_vad(vad, file_record(waveform[:cut_at])) if not isinstance(o, Reject)]
    assert len(pieces) == 2


def test_max_turn_s_must_be_positive():
    with pytest.raises(ValueError, match="max_turn_s"):
        SileroVAD(max_turn_s=0.0)
