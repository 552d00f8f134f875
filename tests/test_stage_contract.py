"""The stage contract (DESIGN.md), enforced by StageRunner and the Beam wrapper.

Beam cases run the real DirectRunner (Python FnApiRunner, in memory). Stages count their calls in
a file, since Beam pickles the stage and a counter in the test's memory would not see the calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from echat.pipelines.stage_transform import ApplyStage, StageSpec
from echat.schemas.stage import Reject, Stage, TransientError
from echat.schemas.stage_runner import RetryPolicy, StageRunner, run_stages

NO_WAIT = RetryPolicy(max_attempts=3, backoff_s=0.0)


def _calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class CountingStage(Stage):
    """Notes each record it processes in `log`; raises on `bad`, transiently on `flaky` (first
    try only) and on `down` (every try)."""

    name = "counting"
    writes = ("seen",)
    batch_size = 8

    def __init__(self, log: str):
        self.log = log

    def process(self, record):
        uri = record["source_uri"]
        with open(self.log, "a") as f:
            f.write(uri + "\n")
        if record.get("bad"):
            raise RuntimeError(f"cannot handle {uri}")
        if uri == "down" or (uri == "flaky" and _calls(Path(self.log)).count(uri) == 1):
            raise TransientError("HTTP 503 from the endpoint")
        yield {**record, "seen": True}


def test_one_raising_record_of_a_batch_of_8_is_rejected_and_the_other_7_run_once(tmp_path):
    log = tmp_path / "calls.txt"
    records = [{"source_uri": f"f{i}", "bad": i == 3} for i in range(8)]
    spec = StageSpec("counting", None, {"log": str(log)}, factory=CountingStage, retry=NO_WAIT)
    with BeamTestPipeline() as p:
        good, rejects, _ = p | beam.Create(records) | ApplyStage(spec)
        assert_that(good | "uris" >> beam.Map(lambda r: r["source_uri"]),
                    equal_to([f"f{i}" for i in range(8) if i != 3]), label="good")
        assert_that(rejects | "why" >> beam.Map(lambda r: (r["source_uri"], r["stage"], r["reason"])),
                    equal_to([("f3", "counting", "stage_error")]), label="rejects")
    calls = _calls(log)
    assert sorted(calls) == sorted(f"f{i}" for i in range(8))  # each of the 8, the bad one too, once


def test_a_transient_error_is_retried_then_rejected_saying_so_and_a_recovered_record_is_written_once(tmp_path):
    log = tmp_path / "calls.txt"
    records = [{"source_uri": uri} for uri in ("ok", "flaky", "down")]
    spec = StageSpec("counting", None, {"log": str(log)}, factory=CountingStage, retry=NO_WAIT)
    with BeamTestPipeline() as p:
        good, rejects, _ = p | beam.Create(records) | ApplyStage(spec)
        assert_that(good | "uris" >> beam.Map(lambda r: r["source_uri"]), equal_to(["ok", "flaky"]), label="good")
        assert_that(rejects | "why" >> beam.Map(lambda r: (r["source_uri"], r["reason"], "after 3 tries" in r["detail"])),
                    equal_to([("down", "transient_error", True)]), label="rejects")
    calls = _calls(log)
    assert (calls.count("ok"), calls.count("flaky"), calls.count("down")) == (1, 2, 3)


def test_retries_back_off_with_jitter_and_honour_retry_after():
    waits = []
    runner = StageRunner(CountingStage("/dev/null"), retry=RetryPolicy(max_attempts=4, backoff_s=1.0), sleep=waits.append, seed=1)
    (result,) = runner.run([{"source_uri": "down"}])
    assert isinstance(result, Reject) and result.reason == "transient_error"
    assert len(waits) == 3
    for attempt, wait in enumerate(waits, start=1):  # 1, 2, 4 s, each scaled into [0.5, 1.5)
        assert 0.5 * 2 ** (attempt - 1) <= wait < 1.5 * 2 ** (attempt - 1)
    assert RetryPolicy().delay(1, retry_after=7.0, rng=None) == 7.0


class Halves(Stage):
    """A splitting stage that is not VAD: each segment becomes its two halves; a half shorter than
    `min_s` is rejected as a piece."""

    name = "halves"
    splits = True
    writes = ("id", "segment_start", "segment_end", "duration", "_waveform", "_speech_spans")

    def __init__(self, min_s: float = 0.0):
        self.min_s = min_s

    def process(self, record):
        wave = record["_waveform"]
        mid = len(wave) // 2
        for i, piece in enumerate((wave[:mid], wave[mid:])):
            start = record["segment_start"] + (0 if i == 0 else mid / 16000)
            out = {**record, "_waveform": piece, "duration": len(piece) / 16000, "id": f"{record['id']}-{i}",
                   "segment_start": start, "segment_end": start + len(piece) / 16000, "_speech_spans": None}
            if out["duration"] < self.min_s:
                yield Reject.of(out, self.slot_name, "piece_too_short", f"{out['duration']:.2f} s")
            else:
                yield out


def test_a_build_with_a_splitting_stage_other_than_vad_reconciles(demo_corpus, local_profile, tmp_path):
    from echat.pipelines.build import build

    profile = local_profile()
    entry = type(profile.stages[0])(slot="halves", backend="test_stage_contract:Halves", params={"min_s": 1.6})
    stages = list(profile.stages)
    stages.insert(2, entry)  # after decode and vad
    profile = profile.model_copy(update={"stages": stages})
    manifest = tmp_path / "manifest.jsonl"
    lines = (demo_corpus / "manifest.jsonl").read_text().splitlines()[:6]
    manifest.write_text("".join(json.dumps({**json.loads(l), "path": str(demo_corpus / json.loads(l)["path"])}) + "\n" for l in lines))
    summary = build(profile, str(manifest), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    halves = summary["stages"]["halves"]
    pieces_rejected = summary["rejects"]["by_stage_reason"].get("halves/piece_too_short", 0)
    assert halves["in"] == 6 and halves["out"] + pieces_rejected == 12 and pieces_rejected > 0
    rows = summary["outputs"]["rows"]
    assert rows + summary["rejects"]["segments"] == 12


class WritesTooMuch(Stage):
    name = "sloppy"
    writes = ("emotion",)

    def process(self, record):
        yield {**record, "emotion": "sad", "transcript": None, "_scratch": 1}


def test_an_undeclared_write_is_a_stage_error_naming_the_fields():
    (result,) = StageRunner(WritesTooMuch()).run([{"source_uri": "a", "transcript": "hi"}])
    assert isinstance(result, Reject) and result.reason == "stage_error"
    assert "_scratch" in result.detail and "transcript" in result.detail and "emotion" not in result.detail


class Labeller(Stage):
    """Writes whatever gender it was given; a heuristic, as the pitch rule is."""

    name = "gender"
    origin = "heuristic"
    writes = ("gender", "gender_score")

    def __init__(self, value="female"):
        self.value = value

    def process(self, record):
        yield {**record, "gender": self.value, "gender_score": 0.7}

    def describe(self):
        return f"labeller-{self.value}"


def test_an_off_vocabulary_label_is_rejected_naming_field_and_value_and_an_alias_is_normalised():
    (bad,) = StageRunner(Labeller("robot")).run([{"source_uri": "a"}])
    assert isinstance(bad, Reject) and bad.reason == "invalid_label"
    assert "gender" in bad.detail and "robot" in bad.detail
    ((good,),) = StageRunner(Labeller("F")).run([{"source_uri": "a"}])
    assert good["gender"] == "female"


def test_the_runner_stamps_provenance_from_describe():
    ((out,),) = StageRunner(Labeller("male")).run([{"source_uri": "a"}])
    assert out["gender_model"] == "labeller-male" and out["gender_score"] == 0.7


def test_precedence_keeps_the_manifest_label_and_skips_a_stage_with_nothing_to_write():
    manifest = {"source_uri": "a", "gender": "male", "gender_score": 1.0, "gender_model": "manifest"}
    runner = StageRunner(Labeller("female"))
    ((kept,), (filled,)) = runner.run([manifest, {"source_uri": "b"}])
    assert kept == manifest and runner.stats.skipped == 1
    assert filled["gender"] == "female" and filled["_origins"] == {"gender": "heuristic"}
    # A profile that ranks the heuristic first lets it replace the manifest's label.
    ((replaced,),) = StageRunner(Labeller("female"), precedence=("heuristic", "manifest", "model")).run([manifest])
    assert replaced["gender"] == "female" and replaced["gender_model"] == "labeller-female"


def test_a_model_label_replaces_a_heuristic_one_but_not_the_reverse():
    class ModelGender(Labeller):
        origin = "model"

    heuristic, = run_stages([Labeller("female"), ModelGender("male")], [{"source_uri": "a"}])[0]
    assert heuristic["gender"] == "male" and heuristic["_origins"]["gender"] == "model"
    model_first, = run_stages([ModelGender("male"), Labeller("female")], [{"source_uri": "a"}])[0]
    assert model_first["gender"] == "male" and model_first["gender_model"] == "labeller-male"


class MiscountingBatch(Stage):
    name = "miscount"
    writes = ("seen",)

    def process(self, record):
        yield record

    def process_batch(self, records):
        return [[r] for r in records[:-1]]  # one result short


def test_process_batch_must_return_one_result_per_input():
    results = StageRunner(MiscountingBatch()).run([{"source_uri": "a"}, {"source_uri": "b"}])
    assert all(isinstance(r, Reject) and "2 records" in r.detail for r in results)


class Silent(Stage):
    name = "silent"

    def process(self, record):
        return iter(())


def test_a_stage_that_drops_a_record_without_a_reject_is_caught():
    (result,) = StageRunner(Silent()).run([{"source_uri": "a"}])
    assert isinstance(result, Reject) and "no output" in result.detail


def test_every_offline_stage_keeps_to_its_declared_writes(demo_corpus, local_profile):
    """The local profile's stages in order on real demo files, under the contract: no stage_error."""
    from echat.pipelines.graph import stage_specs

    lines = [json.loads(l) for l in (demo_corpus / "manifest.jsonl").read_text().splitlines()[:4]]
    # Without the manifest's labels, so every labeller writes (asr, gender, emotion all run).
    records = [{"source_uri": str(demo_corpus / l["path"]), "source_dataset": "demo"} for l in lines]
    stages = [spec.build() for spec in stage_specs(local_profile("filter.params.require_transcript=false"))]
    outputs, rejects = run_stages(stages, records)
    assert not [r for r in rejects if r.reason in ("stage_error", "invalid_label")], rejects
    # a voice in the pitch rule's uncertain band is left unknown, and says so
    assert outputs and all((o["gender_model"] or "gender_unknown" in o["quality_flags"]) and o["emotion_model"]
                           and o["events_model"] and o["transcript_origin"] for o in outputs)
    assert all(np.isfinite(o["snr_db"]) for o in outputs)


def test_a_stage_with_resource_hints_runs_after_a_reshuffle_and_segments_fan_out_after_vad(local_profile, tmp_path):
    """The graph Dataflow would get: the GPU-style stage is not fusable with decode, and the
    segments a splitting stage makes are spread over workers."""
    from echat.pipelines.graph import build_graph
    from echat.pipelines.resume import Resume

    profile = local_profile("tts.resources={min_ram: 2GB, accelerator: 'type:nvidia-l4;count:1;install-nvidia-driver'}")
    pipeline = beam.Pipeline()
    build_graph(pipeline, [{"source_uri": "a.wav"}], [], profile, data_dir=str(tmp_path / "d"),
                rejects_prefix=str(tmp_path / "r"), tallies_path=str(tmp_path / "t.json"), resume=Resume(str(tmp_path / "p")))
    proto = pipeline.to_runner_api()
    names = {t.unique_name: t for t in proto.components.transforms.values()}
    assert "Stage[tts]/Unfuse" in names and "SpreadAfter[vad]" in names
    assert [n for n in names if n.startswith("SpreadAfter[") and "/" not in n] == ["SpreadAfter[vad]"]

    def hints(prefix):  # the resource hints of the stage's DoFn (the leaf transform under Run)
        (leaf,) = [t for n, t in names.items() if n.startswith(prefix) and t.spec.urn == "beam:transform:pardo:v1"]
        return proto.components.environments[leaf.environment_id].resource_hints

    assert hints("Stage[tts]/Run")["beam:resources:min_ram_bytes:v1"] == b"2000000000"
    assert b"nvidia-l4" in hints("Stage[tts]/Run")["beam:resources:accelerator:v1"]
    assert not hints("Stage[decode]/Run")


class PidLogger(Stage):
    """Notes which worker process handled each record."""

    name = "pidlog"

    def __init__(self, log: str):
        self.log = log

    def process(self, record):
        import os

        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        yield record


def test_the_segments_of_one_long_recording_spread_over_two_worker_processes(demo_corpus, local_profile, tmp_path, monkeypatch):
    """One file, many segments: after VAD they fan out, so both workers of a 2-process run work."""
    import soundfile as sf

    from echat.pipelines.build import build

    parts = []
    for wav in sorted((demo_corpus / "audio").glob("*.wav"))[:8]:
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
        parts += [audio.mean(axis=1), np.zeros(rate, dtype="float32")]
    long_file = tmp_path / "long.wav"
    sf.write(str(long_file), np.concatenate(parts), rate)
    log = tmp_path / "pids.txt"
    profile = local_profile("asr.backend=none", "filter.params.require_transcript=false", "reply.backend=none", "tts.backend=none")
    stages = list(profile.stages)
    stages.insert(2, type(stages[0])(slot="pidlog", backend="test_stage_contract:PidLogger", params={"log": str(log)}))
    # The worker processes import this module to rebuild the stage.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    summary = build(profile.model_copy(update={"stages": stages}), str(long_file), str(tmp_path / "out"), overwrite=True,
                    beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert summary["reconciliation"]["ok"] and summary["stages"]["vad"]["out"] >= 8
    pids = log.read_text().split()
    assert len(pids) == summary["stages"]["vad"]["out"]
    assert len(set(pids)) == 2, f"all segments on one worker: {pids}"
