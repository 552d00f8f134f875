"""Preflight: a build that cannot start says why in one line, before it lists, writes or submits.

`check_runnable` raises ValueError (the command line prints it and exits 2) for:
- `--runner DataflowRunner` without the `dataflow` extra (Beam would end in an ImportError
  traceback once the graph is built);
- a profile value still holding the placeholder `CHANGE_ME` (configs/dataflow.yaml);
- Dataflow without --project, --region or --temp_location, a temp or staging location that is not
  gs://, an input or output on this machine's disk (the workers cannot see it), or no way for the
  workers to get the package (--sdk_container_image, --setup_file or --extra_packages);
- a gs:// or s3:// path whose filesystem is not installed (Beam's, and fsspec's for the audio);
- a gs:// or s3:// input, output, temp or staging bucket that cannot be reached: the input is
  matched and every location the job writes gets a small probe object, written and deleted, all
  within `timeout_s` so an offline machine is told so instead of hanging. Skipped on a dry run
  (`--dry_run=True` touches no bucket) or with `check_buckets=False`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import uuid
from typing import Any

PLACEHOLDER = "CHANGE_ME"
BUCKET_TIMEOUT_S = 30.0  # the environment's ECHAT_PREFLIGHT_TIMEOUT_S overrides it
DATAFLOW_EXTRA = "pip install 'echat-forge[dataflow]'"
AWS_EXTRA = "pip install 'echat-forge[aws]'"
# What Beam's DataflowRunner imports when it translates and submits a job.
DATAFLOW_MODULES = ("google.auth", "google.cloud.dataflow", "apache_beam.runners.dataflow.internal.apiclient",
                    "apache_beam.io.gcp.gcsio")
# Per scheme: (modules Beam's filesystem needs, modules fsspec needs to decode audio there, install hint)
SCHEME_MODULES = {
    "gs": (("google.cloud.storage", "apache_beam.io.gcp.gcsio"), ("gcsfs",), DATAFLOW_EXTRA),
    "s3": (("boto3",), ("s3fs",), AWS_EXTRA),
}


def check_runnable(profile, options, input_path: str, output: str, *, check_buckets: bool | None = None,
                   timeout_s: float | None = None) -> None:
    """Raise ValueError, in one line, naming the first reason this build cannot run.

    `check_buckets`: probe the remote locations (default: unless `--dry_run`), each probe within
    `timeout_s` (default: $ECHAT_PREFLIGHT_TIMEOUT_S, else BUCKET_TIMEOUT_S).
    Beam's FileSystems must already hold `options` (FileSystems.set_options) for s3:// paths.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, TestOptions

    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    dataflow = is_dataflow(runner)
    gcp = options.view_as(GoogleCloudOptions)
    if dataflow:
        missing = _missing_modules(DATAFLOW_MODULES)
        if missing:
            raise ValueError(f"--runner {runner} needs the Google Cloud extra: {DATAFLOW_EXTRA} (cannot import {missing})")
    _check_placeholders(profile, options)
    if dataflow:
        _check_dataflow_options(runner, options, input_path, output)
    reads = [input_path]
    writes = [output] + ([p for p in (gcp.temp_location, gcp.staging_location) if p] if dataflow else [])
    _check_filesystems(reads, writes)
    if check_buckets is None:
        check_buckets = not options.view_as(TestOptions).dry_run
    if check_buckets:
        if timeout_s is None:
            timeout_s = float(os.environ.get("ECHAT_PREFLIGHT_TIMEOUT_S") or BUCKET_TIMEOUT_S)
        _check_reachable(_in_buckets(reads), _in_buckets(writes), timeout_s)


def is_dataflow(runner: str) -> bool:
    name = (runner or "").lower()
    return name.endswith("dataflowrunner") or name == "dataflow"


def _missing_modules(names, *, import_them: bool = True) -> str | None:
    """The first of `names` that cannot be imported (or, not `import_them`, is not installed)."""
    for name in names:
        try:
            if import_them:
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _check_placeholders(profile, options) -> None:
    values = {f"--{k}": v for k, v in options.get_all_options(drop_default=True).items()}
    values["the profile's cache_dir"] = getattr(profile, "cache_dir", "")
    unset = [name for name, value in values.items() if PLACEHOLDER in str(value)]
    if unset:
        raise ValueError(f"set {', '.join(unset)}: the profile ({profile.name}) leaves {'it' if len(unset) == 1 else 'them'} "
                         f"as the placeholder {PLACEHOLDER} (e.g. --project my-project, --set cache_dir=gs://my-bucket/echat-cache)")


def _check_dataflow_options(runner: str, options, input_path: str, output: str) -> None:
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, WorkerOptions

    gcp = options.view_as(GoogleCloudOptions)
    absent = [flag for flag, value in (("--project", gcp.project), ("--region", gcp.region),
                                       ("--temp_location", gcp.temp_location)) if not value]
    if absent:
        raise ValueError(f"--runner {runner} needs {', '.join(absent)} "
                         "(e.g. --project my-project --region us-central1 --temp_location gs://my-bucket/tmp)")
    for flag, value in (("--temp_location", gcp.temp_location), ("--staging_location", gcp.staging_location)):
        if value and not value.startswith("gs://"):
            raise ValueError(f"{flag} must be a gs:// path for --runner {runner}, got {value}")
    for flag, value in (("--output", output), ("--input", input_path)):
        if not _remote(value):
            raise ValueError(f"{flag} {value} is on this machine, which {runner}'s workers cannot reach: "
                             "use a bucket (gs://my-bucket/...)")
    setup = options.view_as(SetupOptions)
    if not (options.view_as(WorkerOptions).sdk_container_image or setup.setup_file or setup.extra_packages):
        raise ValueError(f"--runner {runner}: the workers would not have echat-forge; pass --sdk_container_image "
                         "(built from docker/Dockerfile) or --setup_file ./pyproject.toml (README: Running on Google Cloud Dataflow)")


def _check_filesystems(reads: list[str], writes: list[str]) -> None:
    for path in reads + writes:
        scheme = _scheme(path)
        if scheme not in SCHEME_MODULES:
            continue
        beam_modules, fsspec_modules, hint = SCHEME_MODULES[scheme]
        missing = _missing_modules(beam_modules)
        if missing is None and path in reads:  # the audio under the input is decoded through fsspec
            missing = _missing_modules(fsspec_modules, import_them=False)  # the workers import them
        if missing:
            raise ValueError(f"{scheme}:// paths need {hint} (cannot import {missing}; path {path})")


def _check_reachable(reads: list[str], writes: list[str], timeout_s: float) -> None:
    """Match each input and write (then delete) a probe under each output, within `timeout_s`."""
    state: dict[str, Any] = {"at": None, "problem": None}

    def probe():
        from apache_beam.io.filesystems import FileSystems

        try:
            for path in reads:
                state["at"] = path
                if not FileSystems.exists(path):
                    FileSystems.match([FileSystems.join(path.rstrip("/"), "**")], limits=[1])
            for path in writes:
                state["at"] = path
                marker = FileSystems.join(path.rstrip("/"), f".echat-preflight-{uuid.uuid4().hex}")
                with FileSystems.create(marker) as handle:
                    handle.write(b"echat-forge preflight\n")  # not empty: Beam's S3 writer fails on 0 bytes
                FileSystems.delete([marker])
        except Exception as exc:  # noqa: BLE001 - any failure is the one-line answer
            verb = "read" if state["at"] in reads else "write to"
            cause = _root_cause(exc)
            state["problem"] = f"cannot {verb} {state['at']}: {_one_line(cause)}{_hint(cause)}"
        state["at"] = None

    if not reads and not writes:
        return
    worker = threading.Thread(target=probe, name="echat-preflight", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ValueError(f"cannot reach {state['at']} within {timeout_s:g} s (offline, or no credentials? "
                         "for gs://: gcloud auth application-default login; --dry_run=True skips this check)")
    if state["problem"]:
        raise ValueError(state["problem"])


def _root_cause(exc: BaseException) -> str:
    """The innermost message of Beam's wrapped I/O errors."""
    from apache_beam.io.filesystem import BeamIOError

    seen = 0
    while isinstance(exc, BeamIOError) and exc.exception_details and seen < 5:
        details = exc.exception_details
        inner = next(iter(details.values())) if isinstance(details, dict) else details
        if not isinstance(inner, BaseException):
            break
        exc, seen = inner, seen + 1
    return f"{type(exc).__name__}: {exc}"


def _hint(cause: str) -> str:
    if any(word in cause for word in ("NoSuchBucket", "404", "NotFound")):
        return " (does the bucket exist?)"
    if any(word in cause for word in ("AccessDenied", "Forbidden", "403", "401", "Unauthorized", "credentials")):
        return " (no permission, or no credentials?)"
    return ""


def _in_buckets(paths: list[str]) -> list[str]:
    """The gs:// and s3:// paths among `paths`, once each (other schemes, e.g. hf://, are not probed)."""
    return list(dict.fromkeys(p for p in paths if _scheme(p) in SCHEME_MODULES))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scheme(path: str) -> str | None:
    return path.split("://", 1)[0].lower() if "://" in path else None


def _remote(path: str) -> bool:
    return _scheme(path) not in (None, "file")
