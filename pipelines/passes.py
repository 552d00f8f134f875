"""One pass of a build in chunks (profile `output.chunks`), run in a process of its own.

Beam's local runner keeps some memory of every pipeline it has run in its process (measured:
+25 to 30 MiB of driver memory per pass of the demo corpus, a trivial 30 MiB pipeline run eight
times grows 408 -> 718 MiB, and gc or malloc_trim give little of it back). A build cut into
many passes to bound its memory would grow by that much per pass, so on the local runner every
pass but the last runs in a fresh `spawn`ed process, which takes the memory with it when it
ends. The pass saves its rows and rejects as parts (pipelines/parts.py) and writes its tallies,
label-accuracy accumulator and Beam counters to files the build reads; the last pass, which
makes the shards from all parts, runs in the build's own process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PassPaths:
    data_dir: str
    rejects_prefix: str
    tallies: str
    accuracy: str
    counters: str
    shares: str
    parts_dir: str


def run_pass(profile, sources, beam_args: list[str], *, verbose: bool, chunk: int, chunks: int, paths: PassPaths,
             progress_dir: str | None) -> dict[str, int]:
    """Run pass `chunk` of `chunks` (not the last) in a spawned process; returns its counters."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=_pass_main, args=(profile, sources, list(beam_args), verbose, chunk, chunks, paths, progress_dir),
        name=f"echat-build-pass-{chunk}")
    process.start()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"pass {chunk + 1} of {chunks} failed (exit code {process.exitcode}; its lines are in the "
                           f"build's log); run the same command again to resume")
    return _read_json(paths.counters)


def _pass_main(profile, sources, beam_args, verbose, chunk, chunks, paths: PassPaths, progress_dir) -> None:
    import logging

    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    from .build import _runner, pipeline_options
    from .graph import build_graph
    from .resume import InputSelection, read_resume
    from .summary import read_counters

    # The parent pointed standard error at the build's log: this process's log lines go there too.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = pipeline_options(profile, beam_args, verbose=verbose)
    FileSystems.set_options(options)
    state = read_resume(paths.parts_dir)  # the parts of earlier runs and passes: their inputs are done
    pipeline = beam.Pipeline(runner=_runner(options), options=options)
    build_graph(pipeline, sources, [], profile, data_dir=paths.data_dir, rejects_prefix=paths.rejects_prefix,
                tallies_path=paths.tallies, accuracy_path=paths.accuracy, progress_dir=progress_dir,
                done_inputs=InputSelection(state.done_inputs, chunk, chunks), resume=state, shares_path=paths.shares,
                final=False)
    result = pipeline.run()
    result.wait_until_finish()
    with FileSystems.create(paths.counters) as handle:
        handle.write(json.dumps(read_counters(result)).encode("utf-8"))


def _read_json(path: str) -> Any:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))
