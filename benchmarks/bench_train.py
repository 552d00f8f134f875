"""Training throughput of the tiny model vs. the data loader alone, on the same shards.

    .venv/bin/python benchmarks/bench_train.py [SHARDS ...] [--steps 40] [--workers 0 1]
        [--config tiny] [--set KEY=VALUE ...]

SHARDS are parquet shards or shard folders (the output of `echat build`). With none, the demo
corpus is synthesized and built with `echat build --profile local` into a temporary folder first
(about half a minute), so the figures are for the shards the tests train on.

For each data-loader worker count it prints:
  - loader alone: samples/s and batches/s of `build_dataloader` with the training config's data
    settings (tasks, frames per batch, shuffle buffer), iterated as fast as it goes;
  - training: samples/s and optimiser steps/s of `echat train` end to end (loading included) over
    the steps after the first two (start-up excluded), and the share of that time spent waiting
    for data;
  - their ratio: the loader is not the bottleneck while it delivers samples faster than training
    consumes them (ratio well above 1) and the training's data-wait share stays small.
This machine has no GPU, so training runs in fp32 on CPU; on a GPU the same config trains with
bf16 autocast (run.precision: auto), much faster per sample, which is when the ratio matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def demo_shards(folder: Path) -> Path:
    """`echat build` of the demo corpus (the same path the tests' `demo_shards` fixture takes)."""
    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile
    from echat.synth.demo_corpus import make_demo_corpus

    corpus, out = folder / "demo-corpus", folder / "demo-build"
    make_demo_corpus(corpus, n=44)
    build(load_profile("local"), str(corpus / "manifest.jsonl"), str(out), overwrite=True)
    return out


def loader_alone(cfg, workers: int, batches: int) -> dict:
    """Samples/s of the training data path with nothing consuming it."""
    from echat.model.config import load_config
    from echat.model.data import build_dataloader
    from echat.model.encoder import max_input_frames, whisper_config
    from echat.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.config)
    encoder_config = whisper_config(load_config(cfg.model.config).encoder.architecture)
    loader = build_dataloader(
        cfg.data.train, tokenizer, tasks=cfg.data.tasks, num_workers=workers,
        max_frames_per_batch=cfg.data.max_frames_per_batch, shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.run.seed, think_text_ratio=cfg.data.think_text_ratio, epochs=None,
        max_tokens_per_batch=cfg.data.max_tokens_per_batch, sort_window=cfg.data.sort_window,
        min_label_score=cfg.data.min_label_score, chat_instruction_ratio=cfg.data.chat_instruction_ratio,
        max_audio_frames=max_input_frames(encoder_config),  # as train.py gives it
    )
    it = iter(loader)
    started = time.perf_counter()
    first = next(it)  # worker start-up and the shuffle buffer filling: reported apart
    first_s = time.perf_counter() - started
    samples, frames = 0, 0
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        samples += len(batch)
        frames += int(batch.feature_lengths.sum())
    seconds = time.perf_counter() - started
    del first
    return {"first_batch_s": first_s, "samples_per_s": samples / seconds, "batches_per_s": batches / seconds,
            "frames_per_s": frames / seconds, "batches": batches}


def training(cfg, workers: int, steps: int, out: Path) -> dict:
    """End-to-end training figures from the run's own metrics (steps after the first two)."""
    from echat.model.train import train

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(out)
    cfg.data.num_workers = workers
    cfg.run.max_steps = steps
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps)
    cfg.checkpoint.every = steps  # one save at the end, outside the timed steps' windows
    cfg.log.every = 1
    cfg.log.tensorboard = False
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = seconds = wait = 0.0
    for prev, row in zip(rows[1:], rows[2:]):  # from the third step: start-up excluded
        n = row["samples_seen"] - prev["samples_seen"]  # one record per step; samples_seen is a running total
        t = n / row["samples_per_s"]
        samples, seconds, wait = samples + n, seconds + t, wait + t * row["data_wait_frac"]
    steps = len(rows) - 2
    return {"samples_per_s": samples / seconds, "steps_per_s": steps / seconds, "data_wait_frac": wait / seconds,
            "first_loss": summary.losses[0], "last_loss": summary.losses[-1], "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="*", help="parquet shards or shard folders (default: build the demo corpus)")
    parser.add_argument("--config", default="tiny", help="training config (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of the training run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data-loader worker counts to try")
    args = parser.parse_args(argv)

    import torch

    from echat.model.train_config import load_train_config

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        shards = args.shards
        if not shards:
            started, threads = time.perf_counter(), torch.get_num_threads()
            shards = [str(demo_shards(tmp))]
            torch.set_num_threads(threads)  # the build's labelers pin torch to one thread
            print(f"built the demo corpus into shards in {time.perf_counter() - started:.0f} s", flush=True)
        cfg = load_train_config(args.config, [*args.overrides, f"data.train={json.dumps(shards)}"])
        device = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
        precision = "bf16 autocast" if device == "cuda" and cfg.run.precision != "fp32" else "fp32"
        print(f"config {cfg.name} (model {cfg.model.config}), {device}, {precision}, {torch.get_num_threads()} torch threads, "
              f"max {cfg.data.max_frames_per_batch} frames per batch, grad_accum {cfg.optim.grad_accum}")
        results = []
        for workers in args.workers:
            train_fig = training(cfg, workers, args.steps, tmp / f"run-w{workers}")
            load_fig = loader_alone(cfg, workers, batches=max(20, train_fig["steps"] * cfg.optim.grad_accum))
            ratio = load_fig["samples_per_s"] / train_fig["samples_per_s"]
            results.append((workers, load_fig, train_fig, ratio))
            print(f"\nworkers {workers}:")
            print(f"  loader alone   {load_fig['samples_per_s']:8.1f} samples/s  {load_fig['batches_per_s']:6.2f} batches/s"
                  f"  {load_fig['frames_per_s'] / 100:7.1f} s of audio/s  (first batch after {load_fig['first_batch_s']:.2f} s)")
            print(f"  training       {train_fig['samples_per_s']:8.1f} samples/s  {train_fig['steps_per_s']:6.2f} steps/s"
                  f"  data wait {100 * train_fig['data_wait_frac']:.0f}%  loss {train_fig['first_loss']:.3f} -> {train_fig['last_loss']:.3f}")
            verdict = "not the bottleneck" if ratio >= 1.5 and train_fig["data_wait_frac"] < 0.25 else "a bottleneck: add workers"
            print(f"  loader/training {ratio:6.1f}x  -> the loader is {verdict}")
        if device == "cpu":
            print("\nno GPU here: training ran in fp32 on CPU. On a GPU the same config runs with bf16 autocast and "
                  "consumes samples far faster, so rerun there to size data.num_workers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
