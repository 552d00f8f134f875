"""A build that cannot start says why in one line (exit 2, no traceback), before any work.

Through the `echat build` command line; each case fails in preflight, so nothing is listed,
written or submitted and no network is needed. (Bucket reachability: tests/test_object_stores.py.)
"""

from __future__ import annotations

import sys

import pytest

def _installed(*modules: str) -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


# Without the extra every Dataflow case stops at the first check (the one the first test makes).
needs_gcp = pytest.mark.skipif(not _installed("google.cloud.dataflow", "google.cloud.storage", "gcsfs"),
                               reason="needs the dataflow extra (apache-beam[gcp], gcsfs)")

DATAFLOW = ["--runner", "DataflowRunner", "--project", "dummy-proj", "--region", "us-central1",
            "--temp_location", "gs://dummy-bucket/tmp", "--sdk_container_image", "gcr.io/dummy-proj/echat:1"]
BUCKET_IO = ["--input", "gs://dummy-bucket/in/manifest.jsonl", "--output", "gs://dummy-bucket/out"]


def _fails_in_one_line(capsys, *argv: str) -> str:
    from echat.cli import main

    rc = main(["build", *argv])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.startswith("echat build: "), err
    assert "Traceback" not in err + captured.out
    return err.strip()


@pytest.fixture
def without_dataflow_extra(monkeypatch):
    """Imports of the Google Cloud packages fail, as in an environment without the extra."""
    for name in ("google.cloud.dataflow", "apache_beam.runners.dataflow.internal.apiclient"):
        monkeypatch.setitem(sys.modules, name, None)


def test_dataflow_without_the_extra_names_the_install(capsys, without_dataflow_extra):
    err = _fails_in_one_line(capsys, *BUCKET_IO, *DATAFLOW)
    assert "pip install 'echat-forge[dataflow]'" in err and "DataflowRunner" in err


@needs_gcp
def test_dataflow_profile_placeholders_must_be_set(capsys):
    err = _fails_in_one_line(capsys, "--profile", "dataflow", *BUCKET_IO)
    for flag in ("--project", "--region", "--temp_location", "--sdk_container_image", "cache_dir"):
        assert flag in err, err
    assert "CHANGE_ME" in err


@needs_gcp
def test_dataflow_profile_with_placeholders_set_gets_past_them(capsys):
    """The command line's values replace the profile's placeholders; the next check speaks."""
    err = _fails_in_one_line(capsys, "--profile", "dataflow", "--set", "cache_dir=gs://dummy-bucket/cache",
                             "--input", "gs://dummy-bucket/in/manifest.jsonl", "--output", "/tmp/echat-out", *DATAFLOW)
    assert "CHANGE_ME" not in err and "--output /tmp/echat-out is on this machine" in err


@needs_gcp
@pytest.mark.parametrize("missing", ["--project", "--region", "--temp_location"])
def test_dataflow_needs_project_region_and_temp_location(capsys, missing):
    args = list(DATAFLOW)
    i = args.index(missing)
    del args[i:i + 2]
    err = _fails_in_one_line(capsys, *BUCKET_IO, *args)
    assert f"needs {missing}" in err, err


@needs_gcp
def test_dataflow_temp_location_must_be_gcs(capsys, tmp_path):
    args = [a if a != "gs://dummy-bucket/tmp" else str(tmp_path) for a in DATAFLOW]
    err = _fails_in_one_line(capsys, *BUCKET_IO, *args)
    assert "--temp_location must be a gs:// path" in err and str(tmp_path) in err


@needs_gcp
def test_dataflow_staging_location_must_be_gcs(capsys, tmp_path):
    err = _fails_in_one_line(capsys, *BUCKET_IO, *DATAFLOW, "--staging_location", str(tmp_path))
    assert "--staging_location must be a gs:// path" in err


@needs_gcp
def test_dataflow_local_output_or_input_is_refused(capsys, tmp_path):
    err = _fails_in_one_line(capsys, "--input", "gs://dummy-bucket/in/manifest.jsonl", "--output", str(tmp_path / "out"), *DATAFLOW)
    assert f"--output {tmp_path / 'out'} is on this machine" in err
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    err = _fails_in_one_line(capsys, "--input", str(manifest), "--output", "gs://dummy-bucket/out", *DATAFLOW)
    assert f"--input {manifest} is on this machine" in err


@needs_gcp
def test_dataflow_workers_need_the_package(capsys):
    args = DATAFLOW[: DATAFLOW.index("--sdk_container_image")]
    err = _fails_in_one_line(capsys, *BUCKET_IO, *args)
    assert "--sdk_container_image" in err and "--setup_file" in err


@needs_gcp
def test_gcs_path_without_gcsfs_names_the_extra(capsys, monkeypatch):
    """Any runner: audio under a gs:// input is decoded through fsspec, which needs gcsfs."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    err = _fails_in_one_line(capsys, *BUCKET_IO, "--dry_run=True")
    assert "gs:// paths need pip install 'echat-forge[dataflow]'" in err and "gcsfs" in err


def test_local_build_passes_preflight_without_touching_anything(tmp_path):
    """The direct runner on local paths: no check that could cost time or need a network."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from echat.pipelines.preflight import check_runnable
    from echat.pipelines.profile import load_profile

    check_runnable(load_profile("local"), PipelineOptions([]), str(tmp_path / "in"), str(tmp_path / "out"), timeout_s=0.001)
    assert not (tmp_path / "out").exists()
