"""Build throughput on the demo corpus: x real time with 1 and 2 workers, and time per stage.

    .venv/bin/python benchmarks/bench_build.py [--n 48] [--workdir /tmp/echat-bench]

Makes the demo corpus once, then runs `echat build` on the offline profile with the
DirectRunner: once in-process with one worker (the baseline), once in multi-processing mode with
two. Prints audio hours per hour (= x real time) for each, their ratio, and the busy seconds and
x real time of every stage from the Beam counters. Peak memory is the largest RSS of this process
and its workers.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--workdir", default="/tmp/echat-bench")
    args = parser.parse_args()

    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile
    from echat.synth.demo_corpus import make_demo_corpus

    work = Path(args.workdir)
    make_demo_corpus(work / "corpus", n=args.n, overwrite=True)
    manifest = work / "corpus" / "manifest.jsonl"
    profile = load_profile("local")
    runs = {
        "1 worker (in_memory)": ["--direct_num_workers=1", "--direct_running_mode=in_memory"],
        "2 workers (multi_processing)": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    }
    results = {}
    for label, beam_args in runs.items():
        summary = build(profile, str(manifest), str(work / "out"), beam_args=beam_args, overwrite=True)
        results[label] = summary
        print(f"\n== {label}")
        print(f"audio in: {summary['inputs']['audio_hours'] * 3600:.1f} s, rows out: {summary['outputs']['rows']}, "
              f"wall: {summary['wall_seconds']:.1f} s, x real time: {summary['x_real_time']} "
              f"(= {summary['audio_hours_per_hour']} audio hours per hour)")
        print(f"{'stage':<10} {'in':>5} {'out':>5} {'rej':>4} {'busy s':>8} {'x RT':>8}")
        for stage, s in summary["stages"].items():
            xrt = "" if s["x_real_time"] is None else f"{s['x_real_time']:.1f}"
            print(f"{stage:<10} {s['in']:>5} {s['out']:>5} {s['rejected']:>4} {s['busy_seconds']:>8.2f} {xrt:>8}")
    one, two = (results[k]["x_real_time"] for k in runs)
    print(f"\nspeed-up 2 workers vs 1: {two / one:.2f}x")
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: driver {peak_self:.0f} MiB, largest worker {peak_children:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
