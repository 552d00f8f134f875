"""Shared fixtures: the demo corpus and its build, made once per test session.

The build runs the real Beam DirectRunner on the offline profile and writes real parquet; the
pipeline tests read it and the model tests train on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

DEMO_N = 44  # the issue asks for at least 40 utterances


@pytest.fixture(scope="session")
def local_profile(tmp_path_factory):
    """`load_profile("local", overrides)` with the call cache in a session folder, so no test reads
    (or fills) the user's ~/.cache/echat-forge and every build synthesizes its own replies."""
    from echat.pipelines.profile import load_profile

    cache = tmp_path_factory.mktemp("echat-cache")

    def load(*overrides: str):
        return load_profile("local", [f"cache_dir={cache}", *overrides])

    return load


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """Folder holding the demo corpus: audio/ and manifest.jsonl."""
    from echat.synth.demo_corpus import make_demo_corpus

    out = tmp_path_factory.mktemp("demo-corpus")
    make_demo_corpus(out, n=DEMO_N, overwrite=True)
    return out


@pytest.fixture(scope="session")
def demo_build(demo_corpus, local_profile, tmp_path_factory) -> tuple[Path, dict]:
    """(output folder, summary) of `echat build --profile local` on the demo manifest."""
    from echat.pipelines.build import build

    out = tmp_path_factory.mktemp("demo-build")
    summary = build(local_profile(), str(demo_corpus / "manifest.jsonl"), str(out), overwrite=True)
    return out, summary


@pytest.fixture(scope="session")
def demo_shards(demo_build) -> Path:
    """A build folder with data/*.parquet shards made from the demo corpus."""
    return demo_build[0]
