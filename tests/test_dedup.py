"""Deduplication steps: identical audio across the corpus, a transcript repeated within a source."""

from __future__ import annotations

import shutil

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from echat.pipelines.dedup import STEPS, Dedup


def test_a_transcript_repeated_within_a_source_keeps_its_first_segment_only():
    records = [
        {"id": "a2", "source_uri": "a.wav", "segment_start": 9.0, "transcript": "Help me, please!"},
        {"id": "a1", "source_uri": "a.wav", "segment_start": 1.0, "transcript": "help me please"},
        {"id": "b1", "source_uri": "b.wav", "segment_start": 0.0, "transcript": "help me please"},  # another source
        {"id": "a3", "source_uri": "a.wav", "segment_start": 5.0, "transcript": None},  # nothing to compare
    ]
    with BeamTestPipeline() as p:
        kept, rejects, tallies = p | beam.Create(records) | Dedup(*STEPS["transcripts"])
        assert_that(kept | "ids" >> beam.Map(lambda r: r["id"]), equal_to(["a1", "b1", "a3"]), label="kept")
        assert_that(rejects | "why" >> beam.Map(lambda r: (r["id"], r["reason"], r["detail"])),
                    equal_to([("a2", "duplicate_transcript", "the same transcript as a.wav at 1.00 s")]), label="rejects")
        assert_that(tallies | "n" >> beam.Map(lambda kv: (kv[0], kv[1]["in:dedup_transcripts"])),
                    equal_to([("a.wav", 1)] * 3 + [("b.wav", 1)]), label="tallies")


def test_identical_audio_is_dropped_by_content_whatever_its_name(demo_corpus, local_profile, tmp_path):
    from echat.pipelines.build import build

    folder = tmp_path / "in"
    folder.mkdir()
    clips = sorted((demo_corpus / "audio").glob("*_en_*.wav"))[:2]
    for clip in clips:
        shutil.copy(clip, folder / clip.name)
    shutil.copy(clips[1], folder / "a-copy.wav")  # sorts first: the copy is the one kept
    summary = build(local_profile("dedup.audio=true", "language=en"), str(folder), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["rejects"]["by_stage_reason"] == {"dedup_audio/duplicate_audio": 1}
    assert summary["stages"]["dedup_audio"] == {**summary["stages"]["dedup_audio"], "in": 3, "out": 2, "rejected": 1}
    assert np.isfinite(summary["x_real_time"])
