"""Local stand-ins for object stores, for tests: moto's S3 server and gcp-storage-emulator.

Each server runs as a child process on 127.0.0.1 on a free port, is waited for until it accepts
connections, and is stopped (by its own pid) when the context ends. `object_store_env` points
Beam's and fsspec's clients at them: the AWS variables (endpoint and keys) serve boto3, Beam's S3
filesystem and s3fs; STORAGE_EMULATOR_HOST serves google-cloud-storage (Beam's GCS filesystem) and
gcsfs. Beam's GCS client would first retry its credential lookup for ~24 s; the test marks the
lookup done with no credentials, so it connects anonymously at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
S3_KEY = "test"
S3_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, name: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s} s")


@contextlib.contextmanager
def _server(argv: list[str], port: int, name: str, log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for(port, proc, name)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_server(log_dir: Path):
    """An S3 server (moto); yields its endpoint URL."""
    exe = BIN / "moto_server"
    if not exe.exists():
        pytest.skip("moto[server] is not installed (pip install 'echat-forge[test-cloud]')")
    port = free_port()
    with _server([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server", log_dir / "moto.log") as url:
        yield url


@contextlib.contextmanager
def gcs_emulator(log_dir: Path, default_bucket: str = "echat-default"):
    """A GCS server (gcp-storage-emulator, in memory); yields its endpoint URL."""
    exe = BIN / "gcp-storage-emulator"
    if not exe.exists():
        pytest.skip("gcp-storage-emulator is not installed (pip install 'echat-forge[test-cloud]')")
    port = free_port()
    argv = [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", default_bucket, "--in-memory"]
    with _server(argv, port, "gcp-storage-emulator", log_dir / "gcs.log") as url:
        yield url


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def s3_beam_args(endpoint: str) -> list[str]:
    """Beam's S3 filesystem options for the moto server (what a user passes to `echat build`)."""
    return [f"--s3_endpoint_url={endpoint}", f"--s3_access_key_id={S3_KEY}", f"--s3_secret_access_key={S3_KEY}",
            f"--s3_region_name={S3_REGION}"]


@contextlib.contextmanager
def object_store_env(s3_endpoint: str | None = None, gcs_endpoint: str | None = None):
    """Point boto3, s3fs, google-cloud-storage, gcsfs and Beam at the local servers; undo after."""
    mp = pytest.MonkeyPatch()
    try:
        if s3_endpoint:
            mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY)
            mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(name, raising=False)
        if gcs_endpoint:
            mp.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
            # else a bucket-type check waits 60 s per try; read when gcsfs is first imported
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            if "gcsfs" in sys.modules and sys.modules["gcsfs"].GCSFileSystem.__module__ != "gcsfs.core":
                import importlib

                importlib.reload(sys.modules["gcsfs"])  # imported earlier: pick the plain filesystem now
            from apache_beam.internal.gcp import auth

            mp.setattr(auth._Credentials, "_credentials_init", True)
            mp.setattr(auth._Credentials, "_credentials", None)
        _clear_fsspec_clients()  # no client made for another endpoint is reused
        yield
    finally:
        mp.undo()
        _clear_fsspec_clients()


def _clear_fsspec_clients() -> None:
    import importlib

    for module, cls in (("s3fs", "S3FileSystem"), ("gcsfs", "GCSFileSystem")):
        with contextlib.suppress(ImportError):
            getattr(importlib.import_module(module), cls).clear_instance_cache()


def gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="echat-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": os.environ["STORAGE_EMULATOR_HOST"]})
