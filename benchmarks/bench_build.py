"""Build throughput on the demo corpus: x real time with 1 and 2 workers, time per stage, memory.

    .venv/bin/python benchmarks/bench_build.py [--n 240] [--workdir /tmp/echat-bench] [--only 1]

Makes the demo corpus once, then runs `echat build` on the offline profile (manifest transcripts)
with the DirectRunner: in-process with one worker (the baseline), then in multi-processing mode
with two. Each run gets an empty call cache, so neither reuses the other's synthesized replies.
Prints, per run: audio hours per hour (= x real time), wall time against the sum of the stages'
busy time, and each stage's busy seconds and x real time (Beam counters); then the 2-worker
speed-up and the peak RSS of the driver and of the largest worker process. The issue's targets
are printed beside the figures: 1 worker >= 100x real time, wall <= 1.25x busy (1 worker), and,
on a corpus of an hour or more (--n 720), 2 workers >= 1.8x one.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
from pathlib import Path

RUNS = {
    "1": ("1 worker (in_memory)", ["--direct_num_workers=1", "--direct_running_mode=in_memory"]),
    "2": ("2 workers (multi_processing)", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--workdir", default="/tmp/echat-bench")
    parser.add_argument("--only", choices=list(RUNS), help="run one configuration only")
    args = parser.parse_args()

    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile
    from echat.synth.demo_corpus import make_demo_corpus

    work = Path(args.workdir)
    make_demo_corpus(work / "corpus", n=args.n, overwrite=True)
    manifest = work / "corpus" / "manifest.jsonl"
    results = {}
    for key, (label, beam_args) in RUNS.items():
        if args.only and key != args.only:
            continue
        cache = work / f"cache-{key}"
        shutil.rmtree(cache, ignore_errors=True)
        profile = load_profile("local", [f"cache_dir={cache}"])
        summary = build(profile, str(manifest), str(work / "out"), beam_args=beam_args, overwrite=True)
        results[key] = summary
        busy = sum(s["busy_seconds"] + s["setup_seconds"] for s in summary["stages"].values())
        print(f"\n== {label}")
        print(f"audio in: {summary['inputs']['audio_hours'] * 3600:.1f} s, rows out: {summary['outputs']['rows']}, "
              f"wall: {summary['wall_seconds']:.1f} s, x real time: {summary['x_real_time']} "
              f"(= {summary['audio_hours_per_hour']} audio hours per hour)")
        print(f"busy seconds of the stages and the shard writer, set-up included: {busy:.1f} s; "
              f"wall / busy = {summary['wall_seconds'] / busy:.2f}")
        print(f"{'stage':<10} {'in':>5} {'out':>5} {'rej':>4} {'setup s':>8} {'busy s':>8} {'x RT':>8}")
        for stage, s in summary["stages"].items():
            xrt = "" if s["x_real_time"] is None else f"{s['x_real_time']:.1f}"
            print(f"{stage:<10} {s['in']:>5} {s['out']:>5} {s['rejected']:>4} {s['setup_seconds']:>8.2f} "
                  f"{s['busy_seconds']:>8.2f} {xrt:>8}")

    print("\n== targets")
    if "1" in results:
        one = results["1"]
        busy = sum(s["busy_seconds"] + s["setup_seconds"] for s in one["stages"].values())
        print(f"1 worker x real time: {one['x_real_time']} (target >= 100)")
        print(f"1 worker wall / busy: {one['wall_seconds'] / busy:.2f} (target <= 1.25)")
    if "1" in results and "2" in results:
        ratio = results["2"]["x_real_time"] / results["1"]["x_real_time"]
        hours = results["1"]["inputs"]["audio_hours"]
        print(f"2 workers vs 1: {ratio:.2f}x on {hours:.2f} h of audio (target >= 1.8 on >= 1 h)")
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: driver {peak_self:.0f} MiB, largest worker {peak_children:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
