"""The build for Google Cloud Dataflow, checked offline: Beam's DataflowRunner with
`--dry_run=True` translates the job and validates its options without any network call or
submission. The job graph holds every stage, the worker settings and the container reach the job,
resource hints reach the stage that has them; every DoFn and StageSpec of the local and Dataflow
profiles survives pickling; `echat build ... --dry_run=True` says that nothing ran.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cloud_servers import _installed, gcs_client, gcs_emulator, object_store_env

if not all(_installed(m) for m in ("google.cloud.dataflow", "google.cloud.storage", "apache_beam.runners.dataflow")):
    pytest.skip("needs the dataflow extra (apache-beam[gcp])", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "us-central1-docker.pkg.dev/dummy-proj/echat/echat-forge-worker:test"
DRY = ["--runner=DataflowRunner", "--project=dummy-proj", "--region=us-central1",
       "--temp_location=gs://dummy-bucket/tmp", f"--sdk_container_image={IMAGE}", "--dry_run=True"]
GPU = "type:nvidia-l4;count:1;install-nvidia-driver"
# What the Dataflow profile's placeholders become in these tests, and a GPU hint on one stage.
DATAFLOW_SET = ["cache_dir=gs://dummy-bucket/cache", f"tts.resources={{accelerator: '{GPU}', min_ram: 16GB}}"]
RECORDS = [{"source_uri": f"audio/{i}.wav", "source_dataset": "echat-test", "license": None,
            "_source_path": f"gs://dummy-bucket/in/audio/{i}.wav"} for i in range(3)]


def _profile(name: str):
    from echat.pipelines.profile import load_profile

    return load_profile(name, DATAFLOW_SET if name == "dataflow" else [])


def _graph(profile, args: list[str]):
    """(pipeline, options, specs) with the build's graph for `profile`, writing under gs://dummy-bucket."""
    import apache_beam as beam

    from echat.pipelines.build import _runner, pipeline_options
    from echat.pipelines.graph import build_graph, stage_specs, write_list
    from echat.pipelines.resume import Resume

    options = pipeline_options(profile, args, verbose=False)
    pipeline = beam.Pipeline(runner=_runner(options), options=options)
    out = "gs://dummy-bucket/out"
    shards = build_graph(pipeline, RECORDS, [], profile, data_dir=f"{out}/data", rejects_prefix=f"{out}/rejects/rejects",
                         tallies_path=f"{out}/_work/tallies.json", accuracy_path=f"{out}/_work/label_accuracy.json",
                         resume=Resume(f"{out}/_work/parts"), shares_path=f"{out}/_work/shares.json")
    write_list(shards, f"{out}/_work/shards.json", "Shards")
    return pipeline, options, stage_specs(profile)


def test_dataflow_profile_runs_the_local_stages():
    """configs/dataflow.yaml is the local profile's stages plus the runner's options."""
    from echat.pipelines.profile import load_profile

    local, dataflow = load_profile("local"), load_profile("dataflow")
    assert [s.model_dump() for s in dataflow.stages] == [s.model_dump() for s in local.stages], \
        "configs/dataflow.yaml's stages: copy the stages of configs/local.yaml"
    for key in ("trust_manifest", "precedence", "retry", "output", "dedup"):
        assert getattr(dataflow, key) == getattr(local, key), key
    assert dataflow.beam.runner == "DataflowRunner"
    extra = dataflow.beam.extra
    assert extra["machine_type"] and int(extra["disk_size_gb"]) >= 50
    assert {"project", "region", "temp_location", "sdk_container_image"} <= set(extra)


@pytest.mark.parametrize("name", ["local", "dataflow"])
def test_dry_run_translates_the_job_offline(name):
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2
    from apache_beam.runners.dataflow.internal import apiclient
    from apache_beam.runners.runner import PipelineState

    from echat.pipelines.preflight import check_runnable

    profile = _profile(name)
    pipeline, options, specs = _graph(profile, DRY)
    check_runnable(profile, options, "gs://dummy-bucket/in/manifest.jsonl", "gs://dummy-bucket/out")  # dry run: no bucket probe
    result = pipeline.run()
    assert result.state == PipelineState.DONE
    job = result.job
    assert job.proto.name and job.google_cloud_options.project == "dummy-proj"

    proto = job.proto_pipeline
    transforms = {t.unique_name: t for t in proto.components.transforms.values()}
    for spec in specs:
        assert f"Stage[{spec.slot}]/Run/ParDo(_StageDoFn)" in transforms, spec.slot
    for step in ("Sources", "SpreadFiles", "SpreadAfter[vad]", "WriteRejects", "Shards", "WriteTallies", "ShardsWrite"):
        assert step in transforms, step

    # the workers' container and machine: the environment the job would be submitted with
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in proto.components.environments.values() if env.urn == common_urns.environments.DOCKER.urn}
    assert images == {IMAGE}
    env = apiclient.Environment(packages=[], options=options, environment_version="8",
                                proto_pipeline_staged_url="gs://dummy-bucket/tmp/pipeline.pb", proto_pipeline=proto).proto
    pool = env.worker_pools[0]
    if name == "dataflow":
        assert pool.machine_type == "n1-standard-8" and pool.disk_size_gb == 100
        # the hinted stage: after its own Reshuffle, in an environment asking for the GPU; no other
        assert "Stage[tts]/Unfuse" in transforms and "Stage[asr]/Unfuse" not in transforms
        envs = proto.components.environments
        hinted = {name for name, t in transforms.items() if t.environment_id and envs[t.environment_id].resource_hints}
        assert hinted == {"Stage[tts]/Run/ParDo(_StageDoFn)"}
        hints = envs[transforms["Stage[tts]/Run/ParDo(_StageDoFn)"].environment_id].resource_hints
        assert hints[common_urns.resource_hints.ACCELERATOR.urn] == GPU.encode()
        assert hints[common_urns.resource_hints.MIN_RAM_BYTES.urn] == str(16 * 1000 ** 3).encode()
    else:
        assert pool.machine_type == ""  # the local profile leaves it to Dataflow


@pytest.mark.parametrize("name", ["local", "dataflow"])
def test_every_dofn_and_stage_spec_pickles(name):
    import apache_beam as beam
    from apache_beam.internal import pickler
    from apache_beam.pipeline import PipelineVisitor

    pipeline, _, specs = _graph(_profile(name), DRY)
    for spec in specs:
        copy = pickler.loads(pickler.dumps(spec))
        assert (copy.slot, copy.class_path, copy.params, copy.resources, copy.precedence, copy.retry) == \
               (spec.slot, spec.class_path, spec.params, spec.resources, spec.precedence, spec.retry)
        assert copy.stage_class() is spec.stage_class()
        assert type(copy.build()) is spec.stage_class()  # a worker rebuilds the stage from it

    fns = []

    class Collect(PipelineVisitor):
        def visit_transform(self, applied):
            fn = getattr(applied.transform, "fn", None)
            if isinstance(applied.transform, beam.ParDo) or fn is not None:
                fns.append((applied.full_label, fn))

    pipeline.visit(Collect())
    assert len(fns) > 2 * len(specs)
    stage_fns = [label for label, fn in fns if type(fn).__name__ == "_StageDoFn"]
    assert len(stage_fns) == len(specs)
    for label, fn in fns:
        copy = pickler.loads(pickler.dumps(fn))
        assert type(copy) is type(fn), label
        if type(fn).__name__ == "_StageDoFn":
            assert copy.spec.slot == fn.spec.slot and copy.spec.params == fn.spec.params


@pytest.fixture(scope="module")
def gcs_input(tmp_path_factory):
    """A manifest in a bucket of a local GCS emulator (a dry run still lists its input)."""
    logs = tmp_path_factory.mktemp("gcs")
    with gcs_emulator(logs) as url, object_store_env(gcs_endpoint=url):
        client = gcs_client()
        client.create_bucket("echat-in")
        rows = "".join(json.dumps({"path": f"audio/{i}.wav", "text": "hello there"}) + "\n" for i in range(3))
        client.bucket("echat-in").blob("corpus/manifest.jsonl").upload_from_string(rows)
        client.create_bucket("echat-out")
        yield client


def test_cli_dry_run_for_dataflow_runs_nothing(gcs_input, capsys):
    from echat.cli import main

    rc = main(["build", "--profile", "dataflow", "--set", "cache_dir=gs://dummy-bucket/cache",
               "--input", "gs://echat-in/corpus/manifest.jsonl", "--output", "gs://echat-out/build", *DRY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    line = captured.out.strip()
    assert re.search(r"dry run: the job graph for 3 sources .* translated for DataflowRunner and its options checked", line), line
    assert "nothing ran and nothing was written to gs://echat-out/build" in line
    assert list(gcs_input.list_blobs("echat-out")) == []  # not even the output's folders


def test_cli_dry_run_on_the_direct_runner_builds_the_graph_only(tmp_path, capsys):
    from echat.cli import main

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"audio/{i}.wav", "text": "hi"}) + "\n" for i in range(2)))
    rc = main(["build", "--input", str(manifest), "--output", str(tmp_path / "out"), "--dry_run=True"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "dry run: the job graph for 2 sources" in out and "was built; nothing ran" in out
    assert not (tmp_path / "out").exists()


def test_worker_dockerfile_matches_the_lock():
    """docker/Dockerfile starts from the Beam SDK image of the locked Beam and Python versions."""
    import tomllib

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    lock = (ROOT / "requirements.lock").read_text()
    beam = re.search(r"^apache-beam==(\S+)", lock, re.M).group(1)
    python = re.search(r">=(3\.\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]).group(1)
    assert re.search(rf"^ARG BEAM_VERSION={re.escape(beam)}$", dockerfile, re.M), beam
    assert f"FROM apache/beam_python{python}_sdk:${{BEAM_VERSION}}" in dockerfile
    for needed in ("espeak-ng", "ffmpeg", "requirements.lock", "download.pytorch.org/whl/cpu"):
        assert needed in dockerfile, needed


def _readme_commands() -> list[str]:
    """The `echat build --profile dataflow` commands and flag snippets of the README's Dataflow section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on Google Cloud Dataflow", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [re.sub(r"\s+#[^\n]*", "", b).replace("\\\n", " ") for b in blocks if "--profile dataflow" in b or "--set asr" in b]


def _argv(command: str) -> list[str]:
    import os
    import shlex

    argv = shlex.split(os.path.expandvars(command))
    return argv[argv.index("build"):] if "build" in argv else argv


def test_readme_dataflow_commands_pass_a_dry_run(gcs_input, capsys, monkeypatch):
    """The README's check, run and GPU commands, pasted with the variables set, build the job offline."""
    from echat.cli import main

    for name, value in {"PROJECT": "dummy-proj", "REGION": "us-central1", "BUCKET": "gs://echat-in",
                        "IMAGE": IMAGE}.items():
        monkeypatch.setenv(name, value)
    gcs_input.bucket("echat-in").blob("corpus/manifest.jsonl").upload_from_string(
        json.dumps({"path": "audio/0.wav", "text": "hello"}) + "\n")
    check, run, gpu = _readme_commands()
    assert "--dry_run=True" in check and "--dry_run" not in run
    for argv in (_argv(check), _argv(run) + ["--dry_run=True"], _argv(run) + _argv(gpu) + ["--dry_run=True"]):
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 0, (argv, captured.err)
        assert "dry run:" in captured.out and "translated for DataflowRunner" in captured.out
