"""Start-up cost of listing `--input`: time to the first record entering the first stage, and the
driver's peak RSS, for a folder of N tiny (empty) .wav files spread over subfolders.

Two ways of starting, each in a fresh process (so peak RSS is that run's own):
- `pipeline`: the build's way (pipelines/read_sources.py): the driver probes the input (stops at
  the first audio file), the pipeline lists it in DoFns, drops duplicates, Reshuffles;
- `driver`: the former way: `list_sources` lists everything in the driver, then
  `beam.Create(records)` puts every record into the job graph, then Reshuffle.
Both end in the same stand-in for the first stage (a Map noting when its first record arrives),
so the figure is listing and shuffling only: a listing-only pipeline, not a build (an empty file
would only be rejected by the decoder anyway). Runner: Beam's Python direct runner (FnApiRunner,
in memory: its workers share the driver's process, and it holds each stage's output in memory, so
the driver's RSS includes what the runner buffers; on Dataflow the driver holds neither).

    .venv/bin/python benchmarks/bench_listing.py --files 1000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

FILES_PER_FOLDER = 1000


def make_folder(root: str, n: int) -> None:
    for i in range(n):
        sub = os.path.join(root, f"spk{i // FILES_PER_FOLDER:04d}")
        if i % FILES_PER_FOLDER == 0:
            os.makedirs(sub, exist_ok=True)
        open(os.path.join(sub, f"utt{i:07d}.wav"), "wb").close()


def _first_seen(element, folder: str) -> None:
    """The first-stage stand-in: the time each bundle's first record arrived, as a file name."""
    marker = os.path.join(folder, f"{os.getpid()}")
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(repr(time.time()))


def run_one(mode: str, folder: str) -> dict:
    import resource

    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from echat.pipelines.read_sources import GivenSources, ReadSources
    from echat.pipelines.source_rows import SourceContext
    from echat.pipelines.sources import list_sources, probe_input

    marks = tempfile.mkdtemp(prefix="bench-listing-")
    started = time.time()
    pipeline = beam.Pipeline(runner=FnApiRunner())
    if mode == "pipeline":
        probe = probe_input(folder)
        source = ReadSources(folder, SourceContext(root=probe.root, dataset_name="bench"), probe=probe)
    else:
        listing = list_sources(folder, dataset_name="bench", license=None)
        source = GivenSources(listing.records)
    records, _, _ = pipeline | "Sources" >> source
    count = records | "SpreadFiles" >> beam.Reshuffle() | "FirstStage" >> beam.Map(_first_seen, marks)
    del count
    graph_built = time.time()
    pipeline.run().wait_until_finish()
    ended = time.time()
    firsts = [float(open(os.path.join(marks, name)).read()) for name in os.listdir(marks)]
    return {"mode": mode, "graph_built_s": round(graph_built - started, 2), "first_record_s": round(min(firsts) - started, 2),
            "wall_s": round(ended - started, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--modes", nargs="+", default=["pipeline", "driver"])
    parser.add_argument("--one", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    print(f"{'files':>8} {'mode':>9} {'graph built s':>14} {'first record s':>15} {'wall s':>8} {'peak RSS MiB':>13}")
    for n in args.files:
        with tempfile.TemporaryDirectory(prefix="bench-listing-in-") as folder:
            make_folder(folder, n)
            for mode in args.modes:
                out = subprocess.run([sys.executable, __file__, "--one", mode, folder], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>8} {mode:>9} {r['graph_built_s']:>14} {r['first_record_s']:>15} {r['wall_s']:>8} {r['peak_rss_mib']:>13}",
                      flush=True)


if __name__ == "__main__":
    main()
