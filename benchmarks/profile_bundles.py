"""Where a build's wall time goes: seconds per fused Beam stage (FnApiRunner bundle), slowest first.

    .venv/bin/python benchmarks/profile_bundles.py MANIFEST [beam flags...]
    .venv/bin/python benchmarks/profile_bundles.py /tmp/bench240/corpus/manifest.jsonl --direct_num_workers=2 --direct_running_mode=multi_processing

Wraps the Python direct runner's `_execute_bundle` with a timer, runs `echat build` on the offline
profile (a fresh call cache), and prints the build's wall and stage busy seconds, then each bundle's
seconds and the fused transforms it ran. The difference between the bundles and the stages' busy
time is Beam's own work: encoding at each Reshuffle, bundle bookkeeping, worker start-up.
"""

from __future__ import annotations

import sys
import tempfile
import time


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile

    original = fn_runner.FnApiRunner._execute_bundle
    bundles: list[tuple[float, str]] = []

    def timed(self, runner_execution_context, bundle_context_manager, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, runner_execution_context, bundle_context_manager, *args, **kwargs)
        finally:
            bundles.append((time.perf_counter() - started, bundle_context_manager.stage.name))

    fn_runner.FnApiRunner._execute_bundle = timed
    with tempfile.TemporaryDirectory() as work:
        profile = load_profile("local", [f"cache_dir={work}/cache"])
        summary = build(profile, sys.argv[1], f"{work}/out", beam_args=sys.argv[2:], overwrite=True)
    busy = sum(s["busy_seconds"] + s["setup_seconds"] for s in summary["stages"].values())
    print(f"wall {summary['wall_seconds']:.2f} s; stages, set-up and shard writer busy {busy:.2f} s; "
          f"bundles {sum(d for d, _ in bundles):.2f} s")
    for seconds, name in sorted(bundles, reverse=True)[:12]:
        print(f"{seconds:7.2f} s  {name[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
