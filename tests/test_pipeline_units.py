"""The pipeline's own pieces: reconciliation, filters, the Beam stage wrapper, rows, options."""

from __future__ import annotations


import numpy as np
import pytest

from echat.labelers.filters import QualityFilter
from echat.pipelines.build import _dedupe, pipeline_options, redact_flags, source_reject_tallies
from echat.pipelines.rows import EncodeRow, record_task
from echat.pipelines.summary import reconcile
from echat.schemas.stage import Reject

# ---------------------------------------------------------------- reconciliation


ORDER = ["decode", "vad", "filter", "encode"]


def _chain(**counts):
    """A source's tally: `slot=(in, produced, out, rejected, pieces_rejected)` per stage."""
    tally = {"file": 1}
    for slot, (n_in, produced, out, rejected, pieces) in counts.items():
        tally.update({f"in:{slot}": n_in, f"parents:{slot}": produced, f"out:{slot}": out,
                      f"rejected:{slot}": rejected, f"pieces_rejected:{slot}": pieces})
    return tally


def test_reconcile_follows_lineage_through_splits_and_names_the_broken_rule():
    split_then_filtered = {**_chain(decode=(1, 1, 1, 0, 0), vad=(1, 1, 3, 0, 1), filter=(3, 2, 2, 1, 0), encode=(2, 2, 2, 0, 0)),
                           "written": 2, "rejected_segment": 2}
    decode_rejected = {**_chain(decode=(1, 0, 0, 1, 0)), "rejected_file": 1}
    lost_between = {**_chain(decode=(1, 1, 1, 0, 0), vad=(1, 1, 3, 0, 0), filter=(2, 2, 2, 0, 0), encode=(2, 2, 2, 0, 0)), "written": 2}
    dropped_inside = {**_chain(decode=(1, 1, 1, 0, 0), vad=(1, 1, 2, 0, 0), filter=(2, 1, 1, 0, 0), encode=(1, 1, 1, 0, 0)), "written": 1}
    reject_not_written = {**_chain(decode=(1, 0, 0, 1, 0))}
    source_rejected = {"file": 1, "rejected_file": 1}
    tallies = {"ok.wav": split_then_filtered, "bad.wav": decode_rejected, "lost.wav": lost_between,
               "dropped.wav": dropped_inside, "unwritten-reject.wav": reject_not_written, "row 3": source_rejected}
    rows = {row["source_uri"]: row for row in reconcile(tallies, ORDER)}
    assert {uri: row["ok"] for uri, row in rows.items()} == {
        "ok.wav": True, "bad.wav": True, "row 3": True, "lost.wav": False, "dropped.wav": False, "unwritten-reject.wav": False}
    assert rows["ok.wav"]["status"] == "written" and rows["ok.wav"]["segments"] == 4
    assert rows["bad.wav"]["status"] == "rejected"
    assert rows["lost.wav"]["problem"] == "filter took in 2 record(s) but vad put out 3"
    assert rows["dropped.wav"]["problem"].startswith("filter: 2 in, but 1 produced output")
    assert "reached the rejects output" in rows["unwritten-reject.wav"]["problem"]


def test_a_duplicated_source_reconciles_apart_from_its_twin():
    records = [{"source_uri": "a.wav"}, {"source_uri": "b.wav"}, {"source_uri": "a.wav"}]
    kept, rejects = _dedupe(records)
    assert [r["source_uri"] for r in kept] == ["a.wav", "b.wav"]
    assert [r["reason"] for r in rejects] == ["duplicate_source"]
    tallies = source_reject_tallies(rejects)
    tallies["a.wav"] = {**_chain(decode=(1, 1, 1, 0, 0), vad=(1, 1, 1, 0, 0), filter=(1, 1, 1, 0, 0), encode=(1, 1, 1, 0, 0)), "written": 1}
    assert len(tallies) == 2 and all(row["ok"] for row in reconcile(tallies, ORDER))


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
    out = stage.process_one({"source_uri": "a.wav", **record})
    assert isinstance(out, Reject) and out.reason == reason and out.detail


def test_a_record_within_bounds_passes_the_filter():
    record = {"source_uri": "a.wav", "duration": 2.0, "snr_db": 30.0, "speech_ratio": 0.8, "clipping_ratio": 0.0, "transcript": "hi"}
    assert list(QualityFilter(min_snr_db=10.0, min_speech_ratio=0.3).process(record)) == [record]


# ---------------------------------------------------------------- the stage wrapper


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


def test_progress_line_sums_the_workers_reports_and_prints_the_final_state(tmp_path):
    import io
    import json

    from echat.pipelines.progress import ProgressLine

    (tmp_path / "101.json").write_text(json.dumps({"decode": {"in": 3, "out": 3, "audio_s": 1800.0}, "vad": {"out": 5}}))
    (tmp_path / "102.json").write_text(json.dumps({"decode": {"in": 1, "out": 1, "audio_s": 1800.0}, "encode": {"out": 6}}))
    (tmp_path / "103.json.tmp").write_text("{half-written")  # a report being replaced is not read
    stream = io.StringIO()
    with ProgressLine(str(tmp_path), total_files=8, first_slot="decode", split_slot="vad", last_slot="encode", stream=stream):
        pass
    line = stream.getvalue().strip()
    assert line.startswith("files 4/8 | segments 5 | rows 6 | 1.000 h audio | ") and "x real time | ETA " in line
