"""The pipeline's own pieces: reconciliation, filters, the Beam stage wrapper, rows, options."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from echat.labelers.filters import QualityFilter
from echat.pipelines.build import _dedupe, pipeline_options, redact_flags, source_reject_tallies
from echat.pipelines.rows import EncodeRow, record_task
from echat.pipelines.stage_transform import ApplyStage, StageSpec
from echat.pipelines.summary import reconcile
from echat.schemas.stage import Reject, Stage, run_stages

# ---------------------------------------------------------------- reconciliation


def test_reconcile_accepts_balanced_sources_and_flags_the_rest():
    tallies = {
        "written.wav": {"file": 1, "decoded": 1, "segments": 2, "written": 1, "rejected_segment": 1, "rejected_at_filter": 1},
        "short-piece.wav": {"file": 1, "segments": 1, "rejected_at_vad": 1, "rejected_segment": 2, "written": 0, "rejected_at_filter": 1},
        "rejected.wav": {"file": 1, "rejected_file": 1, "rejected_at_decode": 1},
        "lost-a-segment.wav": {"file": 1, "segments": 3, "written": 1, "rejected_segment": 1},
        "both.wav": {"file": 1, "rejected_file": 1, "segments": 1, "written": 1},
        "never-segmented.wav": {"file": 1, "decoded": 1},
    }
    status = {row["source_uri"]: row["ok"] for row in reconcile(tallies)}
    assert status == {"written.wav": True, "short-piece.wav": True, "rejected.wav": True,
                      "lost-a-segment.wav": False, "both.wav": False, "never-segmented.wav": False}


def test_a_duplicated_source_reconciles_apart_from_its_twin():
    records = [{"source_uri": "a.wav"}, {"source_uri": "b.wav"}, {"source_uri": "a.wav"}]
    kept, rejects = _dedupe(records)
    assert [r["source_uri"] for r in kept] == ["a.wav", "b.wav"]
    assert [r["reason"] for r in rejects] == ["duplicate_source"]
    tallies = source_reject_tallies(rejects)
    tallies["a.wav"] = {"file": 1, "segments": 1, "written": 1}
    assert len(tallies) == 2 and all(row["ok"] for row in reconcile(tallies))


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"duration": 0.2, "transcript": "x"}, "filtered_min_duration"),
        ({"duration": 31.0, "transcript": "x"}, "filtered_max_duration"),
        ({"duration": 2.0, "snr_db": 3.0, "transcript": "x"}, "filtered_min_snr"),
        ({"duration": 2.0, "speech_ratio": 0.1, "transcript": "x"}, "filtered_min_speech_ratio"),
        ({"duration": 2.0, "clipping_ratio": 0.2, "transcript": "x"}, "filtered_clipping"),
        ({"duration": 2.0, "transcript": "  ", "quality_flags": ["asr_empty"]}, "filtered_no_transcript"),
    ],
)
def test_each_filter_bound_rejects_with_its_reason(record, reason):
    stage = QualityFilter(min_snr_db=10.0, min_speech_ratio=0.3)
    (out,) = stage.process({"source_uri": "a.wav", **record})
    assert isinstance(out, Reject) and out.reason == reason and out.detail


def test_a_record_within_bounds_passes_the_filter():
    record = {"source_uri": "a.wav", "duration": 2.0, "snr_db": 30.0, "speech_ratio": 0.8, "clipping_ratio": 0.0, "transcript": "hi"}
    assert list(QualityFilter(min_snr_db=10.0, min_speech_ratio=0.3).process(record)) == [record]


# ---------------------------------------------------------------- the stage wrapper


class _Splitter(Stage):
    """Yields a piece of every record, then raises on the ones marked bad: the worst case for
    counting (a partial output before the error)."""

    name = "splitter"

    def __init__(self, calls=None):
        self.calls = calls

    def process(self, record) -> Iterator[dict]:
        yield {**record, "piece": 1}
        if record.get("bad"):
            raise RuntimeError(f"cannot split {record['source_uri']}")


def test_a_stage_that_raises_rejects_the_record_and_keeps_no_partial_output():
    records = [{"source_uri": "good.wav"}, {"source_uri": "bad.wav", "bad": True}]
    outputs, rejects = run_stages([_Splitter()], records)
    assert [o["source_uri"] for o in outputs] == ["good.wav"]
    assert [(r.source_uri, r.reason) for r in rejects] == [("bad.wav", "stage_error")]
    assert "cannot split bad.wav" in rejects[0].detail


@pytest.mark.parametrize("batched", [False, True])
def test_beam_wrapper_routes_errors_to_rejects_once(batched):
    records = [{"source_uri": f"f{i}.wav", "bad": i == 2} for i in range(5)]
    with BeamTestPipeline() as p:
        good, rejects = p | beam.Create(records) | ApplyStage(StageSpec("splitter", None, {}, factory=_Splitter), batched=batched)
        assert_that(good | "uris" >> beam.Map(lambda r: r["source_uri"]), equal_to(["f0.wav", "f1.wav", "f3.wav", "f4.wav"]), label="good")
        assert_that(rejects | "why" >> beam.Map(lambda r: (r["source_uri"], r["stage"], r["reason"])),
                    equal_to([("f2.wav", "splitter", "stage_error")]), label="rejects")


# ---------------------------------------------------------------- rows


def _segment(**extra):
    return {"id": "s1", "source_uri": "a.wav", "segment_start": 0.0, "segment_end": 1.0,
            "_waveform": np.zeros(16000, dtype=np.float32), **extra}


def test_encode_row_writes_audio_and_the_task_the_row_can_train():
    reply = np.full(8000, 0.1, dtype=np.float32)
    (row,) = EncodeRow().process(_segment(reply_text="I hear you.", think_tags="<think>...<think end>", _reply_waveform=reply))
    assert row["task"] == "<S2TCHAT> <TEXT2TOKEN> <THINK>" and row["reply_duration"] == 0.5
    assert row["audio"]["bytes"][:4] == b"fLaC" and row["duration"] == 1.0
    (text_only,) = EncodeRow().process(_segment(reply_text="I hear you.", think_text="<think>...<think end>"))
    assert text_only["task"] == "<S2TCHAT> <THINK>" and text_only["reply_audio"] is None
    assert record_task({"transcript": "hi"}) == "<TRANSCRIBE>"


def test_encode_row_rejects_what_does_not_fit_the_schema():
    (rej,) = EncodeRow().process({k: v for k, v in _segment().items() if k != "source_uri"})
    assert isinstance(rej, Reject) and rej.reason == "schema_error" and "source_uri" in rej.detail
    (rej,) = EncodeRow().process(_segment(_waveform=np.zeros(0, dtype=np.float32)))
    assert rej.reason == "no_audio"


# ---------------------------------------------------------------- options


def test_unknown_flags_are_errors_and_beam_flags_pass(local_profile):
    profile = local_profile()
    options = pipeline_options(profile, ["--direct_num_workers=2", "--direct_running_mode", "multi_processing"])
    assert options.get_all_options()["direct_num_workers"] == 2
    with pytest.raises(ValueError, match="--overwite"):
        pipeline_options(profile, ["--overwite"])


def test_secret_looking_flag_values_are_redacted():
    flags = ["--project=p1", "--api_key=sk-123", "--hf_token", "hf_abc", "--region", "eu"]
    assert redact_flags(flags) == ["--project=p1", "--api_key=***", "--hf_token", "***", "--region", "eu"]
