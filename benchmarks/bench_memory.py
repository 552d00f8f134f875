"""Peak memory of a build's driver and workers at 1x and 10x corpus size.

    .venv/bin/python benchmarks/bench_memory.py [--n 48] [--factor 10] [--workdir /tmp/echat-bench-memory]

Makes the demo corpus at n and factor*n utterances, then runs `echat build` (offline profile,
manifest transcripts) as a child process: the small corpus in one pass, the large one in one pass
and in `factor` passes (`--set output.chunks=factor`: each pass a pipeline over 1/factor of the
inputs, so a pass is as large as the small build). The DirectRunner runs in multi-processing mode
with one worker, so the driver (the runner, which holds what passes between fused stages in
memory) and the worker (which runs the stages) are separate processes; every pass but the last
runs in a process of its own (pipelines/passes.py), counted with the workers. Resident memory is
sampled every 0.1 s through psutil: the peak of the driver and of the largest other process are
printed, and the ratio of each large run's peak to the small one's against the target (within 1.2x). Shards hold --rows-per-shard rows at
both sizes, so the comparison is between corpora, not between shard sizes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_RATIO = 1.2


def peak_memory(command: list[str]) -> tuple[int, dict[str, float], float]:
    """Run `command`; (exit code, {"driver": MiB, "workers": MiB of the largest}, seconds)."""
    import psutil

    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    driver = psutil.Process(process.pid)
    peaks = {"driver": 0.0, "workers": 0.0}
    while process.poll() is None:
        try:
            peaks["driver"] = max(peaks["driver"], driver.memory_info().rss / 2**20)
            for child in driver.children(recursive=True):
                try:
                    peaks["workers"] = max(peaks["workers"], child.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if process.returncode:
        print(process.stderr.read().decode()[-3000:], file=sys.stderr)
    return process.returncode, peaks, time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/echat-bench-memory")
    # shards of the same size at both corpus sizes: a shard is written as a stream, but its plan is whole
    parser.add_argument("--rows-per-shard", type=int, default=40)
    args = parser.parse_args()

    from echat.synth.demo_corpus import make_demo_corpus

    work = Path(args.workdir)
    echat = str(Path(sys.executable).with_name("echat"))
    runs = [(args.n, 1), (args.n * args.factor, 1), (args.n * args.factor, args.factor)]
    results = {}
    for n, chunks in runs:
        corpus = work / f"corpus-{n}"
        if not (corpus / "manifest.jsonl").exists():
            make_demo_corpus(corpus, n=n, overwrite=True)
        out, cache = work / f"out-{n}-{chunks}", work / f"cache-{n}-{chunks}"
        for folder in (out, cache):
            shutil.rmtree(folder, ignore_errors=True)
        command = [echat, "build", "--profile", "local", "--input", str(corpus / "manifest.jsonl"), "--output", str(out),
                   "--quiet", "--no-validate", "--set", f"cache_dir={cache}", "--set", f"output.chunks={chunks}",
                   "--set", f"output.rows_per_shard={args.rows_per_shard}",
                   "--direct_running_mode=multi_processing", "--direct_num_workers=1"]
        code, peaks, seconds = peak_memory(command)
        if code:
            print(f"build of {n} utterances in {chunks} pass(es) failed (exit {code})")
            return 1
        results[n, chunks] = peaks
        print(f"{n:>6} utterances, {chunks:>2} pass(es): driver peak {peaks['driver']:.0f} MiB, "
              f"worker peak {peaks['workers']:.0f} MiB, {seconds:.0f} s")
    small = results[runs[0]]
    for n, chunks in runs[1:]:
        for role in ("driver", "workers"):
            ratio = results[n, chunks][role] / small[role] if small[role] else float("nan")
            verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
            print(f"{args.factor}x corpus in {chunks} pass(es), {role}: {ratio:.2f}x the peak memory of 1x "
                  f"(target <= {TARGET_RATIO}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
