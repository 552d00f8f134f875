"""A build killed midway (a real SIGKILL of the `echat build` process) and started again finishes
the work: the final shards hold the rows of an uninterrupted run, once each, and every input is
reconciled. Also: an output of another profile is refused, and a finished one is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from echat.schemas.stage import Stage

pytestmark = pytest.mark.slow

N_INPUTS = 12
SLOW_SECONDS = 0.4


class Slow(Stage):
    """Passes records through after a pause, so a kill lands while rows are being saved."""

    name = "slow"
    writes = ()

    def __init__(self, seconds: float = SLOW_SECONDS):
        self.seconds = seconds

    def process(self, record):
        time.sleep(self.seconds)
        yield record


@pytest.fixture(scope="module")
def slow_profile_file(local_profile, tmp_path_factory) -> Path:
    """The offline profile with `Slow` before the encoder and rows saved two at a time."""
    profile = local_profile("output.part_rows=2")
    entry = type(profile.stages[0])(slot="slow", backend="test_resume:Slow", params={"seconds": SLOW_SECONDS})
    stages = [*profile.stages, entry]  # the encoder comes after every profile stage
    path = tmp_path_factory.mktemp("profile") / "slow.yaml"
    path.write_text(yaml.safe_dump(profile.model_copy(update={"stages": stages}).model_dump(mode="json"), allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def small_manifest(demo_corpus, tmp_path_factory) -> Path:
    """N_INPUTS demo files copied beside their manifest, so their source_uris (relative to it) and
    the chunks those fall in are the same in every run."""
    import shutil

    folder = tmp_path_factory.mktemp("manifest")
    rows = [json.loads(line) for line in (demo_corpus / "manifest.jsonl").read_text().splitlines()[:N_INPUTS]]
    for row in rows:
        (folder / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_corpus / row["path"], folder / row["path"])
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def _rows(out: Path) -> list[dict]:
    rows = []
    for shard in sorted((out / "data").glob("train-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def _build(profile_file: Path, manifest: Path, out: Path, *overrides: str):
    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile

    return build(load_profile(str(profile_file), list(overrides)), str(manifest), str(out))


@pytest.fixture(scope="module")
def uninterrupted(slow_profile_file, small_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    summary = _build(slow_profile_file, small_manifest, out)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    return out, summary


def _kill_midway(profile_file: Path, manifest: Path, out: Path) -> int:
    """Run `echat build` as its own process group and SIGKILL it once some rows are saved.
    Returns how many row parts were on disk when it died."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [str(Path(sys.executable).with_name("echat")), "build", "--profile", str(profile_file), "--input", str(manifest),
               "--output", str(out), "--quiet", "--no-validate"]
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "_work" / "parts"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            saved = len(list(parts.glob("rows-*.parquet"))) if parts.exists() else 0
            if saved >= 2:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                return saved
            if process.poll() is not None:
                pytest.fail(f"the build ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        pytest.fail("no rows were saved within the time limit")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return 0


def test_a_killed_build_resumes_to_the_rows_of_an_uninterrupted_one(slow_profile_file, small_manifest, uninterrupted, tmp_path):
    whole_out, whole = uninterrupted
    out = tmp_path / "out"
    saved = _kill_midway(slow_profile_file, small_manifest, out)
    assert saved >= 2 and not (out / "summary.json").exists()

    summary = _build(slow_profile_file, small_manifest, out)

    # It resumed: the inputs finished before the kill were not done again.
    finished_before = summary["resumed"]["sources_finished_before"]
    assert finished_before >= 1
    assert summary["stages"]["slow"]["in"] <= whole["stages"]["slow"]["in"] - finished_before
    # Every input is accounted for, by the runs together.
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["reconciliation"]["sources_checked"] == N_INPUTS
    # The shards hold the rows of an uninterrupted run, each once.
    rows, expected = _rows(out), _rows(whole_out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == summary["outputs"]["rows"] == whole["outputs"]["rows"]
    assert rows == expected
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(p.name for p in (whole_out / "data").iterdir())
    # The rejects too, and the parts are gone once the shards hold their rows.
    def rejects(folder):
        return sorted(line for f in (folder / "rejects").glob("*.jsonl") for line in f.read_text().splitlines())
    assert rejects(out) == rejects(whole_out)
    assert not (out / "_work" / "parts").exists()


def test_an_output_of_another_profile_is_refused_naming_the_difference(slow_profile_file, small_manifest, tmp_path):
    from echat.pipelines.resume import IncompatibleRun

    out = tmp_path / "out"
    _kill_midway(slow_profile_file, small_manifest, out)
    with pytest.raises(IncompatibleRun, match=r"stages\[1\]\.params\.threshold: 0\.\d+ -> 0\.42.*--overwrite"):
        _build(slow_profile_file, small_manifest, out, "vad.params.threshold=0.42")


def test_a_finished_output_is_left_as_it_is(slow_profile_file, small_manifest, uninterrupted):
    whole_out, whole = uninterrupted
    before = {p.name: p.stat().st_mtime_ns for p in (whole_out / "data").iterdir()}
    summary = _build(slow_profile_file, small_manifest, whole_out)
    assert summary["already_complete"] and summary["outputs"] == whole["outputs"]
    assert {p.name: p.stat().st_mtime_ns for p in (whole_out / "data").iterdir()} == before

    from echat.pipelines.resume import IncompatibleRun

    with pytest.raises(IncompatibleRun, match=r"holds a finished build .*threshold: 0\.\d+ -> 0\.42.*--overwrite to replace it"):
        _build(slow_profile_file, small_manifest, whole_out, "vad.params.threshold=0.42")


def test_a_build_in_chunks_writes_the_rows_of_a_build_in_one_pass(slow_profile_file, small_manifest, uninterrupted, tmp_path):
    """`output.chunks=3`: three pipelines, each over a third of the inputs (by a hash of their
    source_uri), the last making the shards from all three passes' parts."""
    from echat.pipelines.resume import chunk_of

    whole_out, whole = uninterrupted
    out = tmp_path / "out"
    summary = _build(slow_profile_file, small_manifest, out, "output.chunks=3")
    uris = {r["source_uri"] for r in _rows(whole_out)}
    assert len({chunk_of(u, 3) for u in uris}) == 3  # the inputs really are spread over the chunks
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["reconciliation"]["sources_checked"] == N_INPUTS
    assert summary["stages"]["slow"]["in"] == whole["stages"]["slow"]["in"]  # each input done once, over the passes
    assert _rows(out) == _rows(whole_out)
    assert summary["outputs"] == {**whole["outputs"], "shard_files": summary["outputs"]["shard_files"]}
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(p.name for p in (whole_out / "data").iterdir())
