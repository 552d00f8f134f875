"""Throughput of the LLM reply backend against a local endpoint with a fixed latency per request.

Run:
    .venv/bin/python benchmarks/bench_llm.py                              # 200 ms, 32 and 64 in flight
    .venv/bin/python benchmarks/bench_llm.py --latency 0.2 --records 640 --in-flight 1 8 32 64 --build

The endpoint is tests/llm_server.py: an OpenAI-compatible chat-completions server on 127.0.0.1
(http.server.ThreadingHTTPServer), run in its own process so that it does not share this one's
GIL, that sleeps --latency seconds before each answer and counts the requests in flight at once
(the peak is measured at the server, not assumed; read from its /_stats). The reply stage
(synth/llm_reply.py, the real `openai` client) runs under the stage runner as a build runs it
(`run_stages`: batches of 4 x max_in_flight records through max_in_flight threads), with no
cache, so every record is one request. For each in-flight setting it prints replies per second,
the peak in flight at the server, and the ratio to the bound that latency and concurrency set
(in_flight / latency replies per second). With --build it also runs a real Beam build (the demo
corpus, DirectRunner, the reply slot on the local endpoint, TTS off) and prints the reply stage's
peak in flight and its busy-time rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Endpoint:
    """tests/llm_server.py in a child process: its URL, and its counters over HTTP."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(latency_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the endpoint did not start: {self.url!r}")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats") as response:
            return json.loads(response.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/_reset", data=b"{}", method="POST")).read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

SENTENCES = (
    "I failed my exam again and I feel terrible.",
    "My dog learned a new trick today!",
    "The train was late and I missed my interview.",
    "我今天终于把论文写完了！",
    "Can you tell me how to get to the station?",
    "我的猫生病了，我很担心它。",
)


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        text = f"{SENTENCES[i % len(SENTENCES)]} ({i})"
        out.append({"id": f"b{i}", "source_uri": f"/bench/{i}.wav", "segment_start": 0.0, "segment_end": 2.0,
                    "transcript": text, "language": "zh" if "我" in text else "en",
                    "emotion": "sad", "emotion_score": 0.7, "emotion_model": "heuristic-prosody",
                    "gender": "female", "gender_score": 0.8, "gender_model": "pitch"})
    return out


def run_stage(server: Endpoint, n: int, in_flight: int) -> dict:
    from echat.schemas.stage_runner import run_stages
    from echat.synth.llm_reply import OpenAIReply

    server.reset()
    stage = OpenAIReply(model="bench-model", base_url=server.url, cache_dir=None, timeout_s=30.0)
    stage.max_in_flight = in_flight
    started = time.perf_counter()
    out, rejects = run_stages([stage], records(n))
    wall = time.perf_counter() - started
    assert not rejects and len(out) == n, rejects[:3]
    bound = in_flight / server.latency_s
    return {"in_flight": in_flight, "records": n, "wall_s": round(wall, 2), "replies_per_s": round(n / wall, 1),
            "peak_in_flight_at_server": server.stats()["peak_in_flight"], "bound_per_s": round(bound, 1),
            "ratio_to_bound": round(n / wall / bound, 3), "requests": stage.usage()["requests"]}


def run_build(server: Endpoint, in_flight: int) -> dict:
    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile
    from echat.synth.demo_corpus import make_demo_corpus

    server.reset()
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        make_demo_corpus(f"{tmp}/corpus", n=96, overwrite=True)
        profile = load_profile("local", [
            f"cache_dir={tmp}/cache", "reply.backend=openai", f"reply.params.base_url={server.url}",
            "reply.params.model=bench-model", f"reply.max_in_flight={in_flight}", "tts.backend=none",
        ])
        started = time.perf_counter()
        summary = build(profile, f"{tmp}/corpus/manifest.jsonl", f"{tmp}/out")
        wall = time.perf_counter() - started
    reply = summary["stages"]["reply"]
    return {"in_flight": in_flight, "rows": summary["outputs"]["rows"], "build_wall_s": round(wall, 2),
            "reply_busy_s": reply["busy_seconds"], "reply_per_busy_s": round(reply["out"] / reply["busy_seconds"], 1),
            "peak_in_flight_at_server": server.stats()["peak_in_flight"], "requests": reply["usage"]["requests"],
            "reconciled": summary["reconciliation"]["ok"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the endpoint takes per request (default 0.2)")
    parser.add_argument("--records", type=int, default=640, help="records per setting (default 640)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[32, 64], help="max_in_flight settings (default 32 64)")
    parser.add_argument("--build", action="store_true", help="also run a real Beam build on the demo corpus")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-real-key")

    results = []
    with Endpoint(args.latency) as server:
        print(f"local endpoint {server.url}, {args.latency * 1000:.0f} ms per request, {args.records} records per setting")
        print(f"{'in flight':>9} {'wall s':>7} {'replies/s':>10} {'peak at server':>15} {'bound/s':>8} {'ratio':>6}")
        for in_flight in args.in_flight:
            r = run_stage(server, args.records, in_flight)
            results.append(r)
            print(f"{r['in_flight']:>9} {r['wall_s']:>7} {r['replies_per_s']:>10} {r['peak_in_flight_at_server']:>15} "
                  f"{r['bound_per_s']:>8} {r['ratio_to_bound']:>6}")
        if args.build:
            b = run_build(server, max(args.in_flight))
            results.append({"build": b})
            print(f"build (Beam DirectRunner, {b['rows']} rows): reply stage {b['reply_per_busy_s']} replies per busy second, "
                  f"peak {b['peak_in_flight_at_server']} in flight at the server, build {b['build_wall_s']} s, reconciled {b['reconciled']}")
    print(json.dumps(results))
    ok = any(r.get("peak_in_flight_at_server", 0) >= 32 for r in results if "in_flight" in r)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
