"""`echat train`: train an OSUM-EChat model on parquet shards.

    echat train --config tiny --set data.train='[shards/]'            # one process
    torchrun --nproc_per_node 2 -m echat.model.train --config tiny    # DDP (gloo on CPU, nccl on GPU)
    echat train --config tiny --out runs/tiny --resume                # continue from the newest checkpoint

One optimiser step = `optim.grad_accum` micro-batches per rank (gradients all-reduced only on the
last), then clipping, AdamW and the warm-up/decay schedule. Every target token of a step weighs the
same, whichever micro-batch or rank it is in: the step's gradient is that of the CE summed over all
its targets divided by their number, as for one batch holding them all (`accumulate_gradients`).
bf16 autocast runs on CUDA only.
Every `checkpoint.every` steps the whole training state is saved (model/checkpoint.py); a run
resumed from step k reproduces the uninterrupted run's losses. A resumed run may set another
run.max_steps (the schedule is rebuilt to decay over it); the optimiser and schedule settings
(optim.lr, betas, warm-up, decay...) must stay those of the checkpoint. Rank 0 writes metrics to
OUT/metrics.jsonl and TensorBoard (OUT/tensorboard) and a progress line to the console.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .train_config import TrainConfig, TrainConfigError, load_train_config

MEL_FRAMES_PER_SECOND = 100  # 10 ms hop: features are (n_mels, frames)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config: a name from model/configs/train/ (tiny, tiny-learning, understanding, generation, empathy) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 --set data.train='[shards/]' (repeatable; value read as YAML)")
    parser.add_argument("--out", help="output folder (overrides the config's output_dir)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in the output folder (bare --resume), from a given "
                             "checkpoint folder, or 'auto': the newest if there is one, else start (for re-queued jobs)")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="checkpoint and stop at step N without changing the schedule (a time-sliced job; resume later)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import ModelConfigError
    from .data_sources import DataSourceError

    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.out:
            cfg.output_dir = args.out
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        train(cfg, resume=args.resume, stop_after=args.stop_after_steps)
    except (TrainConfigError, CheckpointError, ModelConfigError, DataSourceError) as exc:
        # A mistake in the config, the data paths or the checkpoint: the message says which.
        print(f"echat train: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echat train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# ---------------------------------------------------------------- pieces of a run


class WarmupDecay:
    """LR factor per optimiser step: linear warm-up to 1, then cosine or linear decay to
    `min_ratio` at `total` steps. A class (not a lambda) so LambdaLR saves its settings."""

    def __init__(self, warmup: int, total: int, decay: str, min_ratio: float):
        self.warmup, self.total, self.decay, self.min_ratio = warmup, total, decay, min_ratio

    def __call__(self, step: int) -> float:
        # `step` counts optimiser steps taken; the first update uses step 0 and is not at lr 0.
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_optimizer(model, optim_cfg):
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay."""
    import torch

    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise RuntimeError("the model has no trainable parameter (check model.stage)")
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def build_scheduler(optimizer, optim_cfg, max_steps: int):
    import torch

    shape = WarmupDecay(optim_cfg.warmup_steps, max_steps, optim_cfg.decay, optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


# Optimiser and schedule settings a resumed run must share with the run it continues: the saved
# optimiser and scheduler state carry them, and loading that state would silently bring the old
# values back. run.max_steps may change: the schedule is rebuilt for the new length.
FIXED_ON_RESUME = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "decay", "min_lr_ratio")


def check_resume_config(saved_yaml: str, cfg: TrainConfig) -> int | None:
    """Compare the config a checkpoint was written with (its train_config.yaml) with `cfg`.

    Raises TrainConfigError naming every optim.* key of FIXED_ON_RESUME that changed. Returns the
    saved run.max_steps when it differs from cfg's (the schedule must then be rebuilt), else None.
    """
    import yaml

    saved = yaml.safe_load(saved_yaml) or {}
    now = cfg.model_dump(mode="json")
    saved_optim = saved.get("optim") or {}
    changed = [
        f"optim.{key} ({saved_optim[key]!r} -> {now['optim'][key]!r})"
        for key in FIXED_ON_RESUME if key in saved_optim and saved_optim[key] != now["optim"][key]
    ]
    if changed:
        raise TrainConfigError(
            f"--resume cannot change {', '.join(changed)}: the checkpoint's optimiser and schedule state "
            "were made with the old values. Resume with them, or start a new run from these weights "
            "with model.init_from"
        )
    saved_steps = (saved.get("run") or {}).get("max_steps")
    return saved_steps if saved_steps is not None and saved_steps != cfg.run.max_steps else None


def reschedule(scheduler, optim_cfg, max_steps: int) -> None:
    """Give a loaded LambdaLR the schedule of `max_steps` at its current step (load_state_dict
    restores the saved WarmupDecay, run length included), and set the learning rate the next
    optimiser step uses accordingly."""
    shape = WarmupDecay(optim_cfg.warmup_steps, max_steps, optim_cfg.decay, optim_cfg.min_lr_ratio)
    scheduler.lr_lambdas = [shape for _ in scheduler.lr_lambdas]
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * shape(scheduler.last_epoch)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- metrics


class MetricsLog:
    """Rank 0's metric sinks: OUT/metrics.jsonl, TensorBoard, and the console line."""

    def __init__(self, output_dir: Path, start_step: int, max_steps: int, tensorboard: bool, enabled: bool):
        self.enabled, self.max_steps = enabled, max_steps
        self.writer = None
        self.path = output_dir / "metrics.jsonl"
        if not enabled:
            return
        _truncate_jsonl(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def record(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, metrics["step"])

    def console(self, metrics: dict[str, Any], eta_s: float | None) -> None:
        if not self.enabled:
            return
        parts = [f"step {metrics['step']:>{len(str(self.max_steps))}}/{self.max_steps}", f"loss {metrics['loss']:.4f}"]
        sub = [f"{k.split('_')[0]} {metrics[k]:.4f}" for k in ("text_loss", "speech_loss") if metrics.get(k) is not None]
        if sub:
            parts[-1] += f" ({', '.join(sub)})"
        parts += [f"lr {metrics['lr']:.2e}", f"grad {metrics['grad_norm']:.3g}",
                  f"{metrics['samples_per_s']:.1f} samples/s", f"{metrics['frames_per_s']:.0f} frames/s",
                  f"data wait {100 * metrics['data_wait_frac']:.0f}%"]
        if eta_s is not None:
            minutes, seconds = divmod(int(eta_s), 60)
            parts.append(f"eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
        print(" | ".join(parts), flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


@dataclass
class TrainSummary:
    output_dir: Path
    start_step: int
    last_step: int
    completed: bool  # reached run.max_steps
    stopped_early: bool  # --stop-after-steps or a signal: checkpointed, resumable
    losses: list[float] = field(default_factory=list)  # per optimiser step, this run's steps only
    checkpoint: Path | None = None
    seconds: float = 0.0


class _StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary (a second SIGINT aborts)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- the model package's side


def _model_parts(cfg: TrainConfig, device):
    """(model, tokenizer, model_config) built by the model package, parameters in the training
    dtype (model.dtype: fp32 master weights by default; bf16 compute comes from autocast)."""
    import torch

    from .config import load_config
    from .osum import build_model
    from .tokenizer import load_tokenizer

    model_config = load_config(cfg.model.config)
    tokenizer = load_tokenizer(model_config)
    model = build_model(model_config, device=device, load_weights=cfg.model.load_weights,
                        tokenizer=tokenizer, dtype=getattr(torch, cfg.model.dtype))
    return model, tokenizer, model_config


# ---------------------------------------------------------------- the loop


def _find_resume_point(resume: str | None, out: Path):
    """The checkpoint to continue from: None for a fresh run. `resume` is None, "latest" (the
    newest in OUT, which must exist), "auto" (the newest if any), or a checkpoint path."""
    from . import checkpoint as ckpt

    if resume is None:
        existing = ckpt.list_checkpoints(ckpt.checkpoints_root(out))
        if existing:
            raise ckpt.CheckpointError(
                f"{out} already holds checkpoints (newest: {existing[-1][1].name}); pass --resume to continue "
                "that run, or choose another --out"
            )
        return None
    if resume in ("latest", "auto"):
        found = ckpt.latest_checkpoint(out)
        if found is None and resume == "latest":
            raise ckpt.CheckpointError(f"--resume: no checkpoint under {ckpt.checkpoints_root(out)}")
        return found
    return ckpt.resolve_checkpoint(resume)


def train(cfg: TrainConfig, *, resume: str | None = None, stop_after: int | None = None) -> TrainSummary:
    """Run (or continue) the training `cfg` describes; every rank calls this.

    resume: None (fresh run; the output folder must hold no checkpoint), "latest", "auto" (latest
    if there is one, else fresh) or a checkpoint path. stop_after: checkpoint and stop at this step.
    """
    import torch

    from . import checkpoint as ckpt
    from . import distributed
    from .data import build_dataloader
    from .data_sources import resolve_files

    started = time.perf_counter()
    ctx = distributed.init(cfg.run.device)
    stop = _StopRequest()
    log: MetricsLog | None = None
    keys_log: _KeysLog | None = None
    try:
        out = Path(cfg.output_dir)
        use_bf16 = ctx.device.type == "cuda" and cfg.run.precision in ("auto", "bf16")
        if cfg.run.precision == "bf16" and ctx.device.type != "cuda":
            raise TrainConfigError("run.precision bf16 needs CUDA; use auto or fp32 on CPU")
        files = [path for path, _ in resolve_files(cfg.data.train)]  # fails early, naming a bad entry
        resume_from = _find_resume_point(resume, out)
        old_max_steps = None
        if resume_from is not None:
            old_max_steps = check_resume_config((resume_from / "train_config.yaml").read_text(encoding="utf-8"), cfg)
        init_from = None
        if cfg.model.init_from and resume_from is None:
            init_from = ckpt.resolve_checkpoint(cfg.model.init_from)
            if ckpt.read_trainer_state(init_from)["weights"] == "trainable" and not cfg.model.load_weights:
                raise TrainConfigError(
                    f"model.init_from {init_from} holds only trainable parameters: set model.load_weights: true "
                    "so the frozen part comes from the pretrained weights"
                )

        # Same seed on every rank for identical initial weights (DDP also broadcasts rank 0's).
        seed_everything(cfg.run.seed)
        model, tokenizer, model_config = _model_parts(cfg, ctx.device)
        if init_from is not None:
            ckpt.load_model_weights(model, init_from)
        if cfg.model.stage is not None:
            from .osum import set_trainable

            set_trainable(model, cfg.model.stage)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # What a "trainable" checkpoint must hold beyond this stage's trainable parameters: the
        # groups earlier stages trained (init_from) or this run trained before it was resumed.
        trained_groups = ckpt.trained_groups(model, resume_from or init_from)
        n_total = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        wrapped = distributed.wrap(
            model, ctx, parallel=cfg.run.parallel, find_unused_parameters=cfg.run.find_unused_parameters,
            bf16=use_bf16, fsdp_units=list(model.decoder.layers),  # the LLM's layers run in every forward
        )
        optimizer = build_optimizer(wrapped, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.max_steps)
        loader = build_dataloader(
            files, tokenizer, tasks=cfg.data.tasks, rank=ctx.rank, world_size=ctx.world_size,
            num_workers=cfg.data.num_workers, max_frames_per_batch=cfg.data.max_frames_per_batch,
            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed,
            think_text_ratio=cfg.data.think_text_ratio, epochs=cfg.data.epochs,
            max_tokens_per_batch=cfg.data.max_tokens_per_batch, sort_window=cfg.data.sort_window,
            min_label_score=cfg.data.min_label_score, chat_instruction_ratio=cfg.data.chat_instruction_ratio,
            max_audio_frames=model.encoder.max_input_frames,  # longer audio would stop the run in the encoder
            pin_memory=ctx.device.type == "cuda",
        )

        step = start_step = 0
        counters = {"samples_seen": 0, "frames_seen": 0}
        # Each rank's own stream for dropout etc.; a resume replaces it with the saved one below.
        seed_everything(cfg.run.seed + 1 + ctx.rank)
        rank_state = None
        if resume_from is not None:
            rank_state = ckpt.load_training_state(resume_from, wrapped, optimizer, scheduler, ctx)
            if old_max_steps is not None:
                reschedule(scheduler, cfg.optim, cfg.run.max_steps)
            step = start_step = int(rank_state["trainer"]["step"])
            counters.update(rank_state["trainer"].get("counters", {}))
            loader.load_state_dict(rank_state["data"])
        batches = iter(loader)
        if rank_state is not None:
            # Last, after everything that draws random numbers during set-up (iter() included).
            ckpt.restore_rng(rank_state["rng"])

        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        distributed.barrier(ctx)
        log = MetricsLog(out, step, cfg.run.max_steps, cfg.log.tensorboard, ctx.is_main)
        if cfg.log.sample_keys:
            keys_log = _KeysLog(out, ctx.rank, step)
        log.info(
            f"echat train {cfg.name}: {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable"
            f" (stage {cfg.model.stage or 'all'}); {ctx.world_size} process(es) on {ctx.device.type}"
            f" ({cfg.run.parallel if ctx.is_distributed else 'single'}), {'bf16 autocast' if use_bf16 else 'fp32'};"
            f" {len(files)} shard file(s); "
            + (f"resuming at step {step} from {resume_from}" if resume_from else
               f"initialised from {init_from}" if init_from else "from scratch")
        )
        if old_max_steps is not None:
            log.info(f"run.max_steps changed from {old_max_steps} to {cfg.run.max_steps}: the learning-rate "
                     f"schedule now decays over {cfg.run.max_steps} steps (from step {step} on)")
        if stop_after is not None and stop_after <= step:
            log.info(f"nothing to do: the run is at step {step}, --stop-after-steps {stop_after}")
            return TrainSummary(out, start_step, step, step >= cfg.run.max_steps, True, [], resume_from,
                                time.perf_counter() - started)

        stop.install()
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        accum = cfg.optim.grad_accum
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        losses: list[float] = []
        last_saved: Path | None = None
        saved_step = start_step
        window = _Window()
        stopped_early = False

        def save(at_step: int) -> Path:
            path = ckpt.save_checkpoint(
                out, at_step, wrapped, optimizer, scheduler, ctx,
                ckpt.SaveInputs(train_config_yaml=cfg.to_yaml(), model_config=model_config,
                                weights=cfg.checkpoint.weights, counters=dict(counters),
                                rank_state=loader.state_dict(), tokenizer=tokenizer,
                                trained_groups=trained_groups),
                keep_last=cfg.checkpoint.keep_last,
            )
            log.info(f"checkpoint {path}")
            return path

        wrapped.train()
        while step < cfg.run.max_steps:
            t_fetch = time.perf_counter()
            micro = []
            for _ in range(accum):
                batch = _next_batch(batches)
                if batch is None:
                    break
                micro.append(batch)
            window.data_wait += time.perf_counter() - t_fetch
            # Every rank must take the step or none: a rank out of data would leave the others
            # waiting in a collective.
            short = torch.tensor([0.0 if len(micro) == accum else 1.0])
            if distributed.all_reduce_sum(short, ctx).item() > 0:
                log.info(f"data exhausted after step {step} (data.epochs={cfg.data.epochs})")
                break

            totals, step_targets = accumulate_gradients(wrapped, micro, ctx, autocast)
            grad_norm = _clip(trainable, cfg.optim.grad_clip)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"non-finite gradient norm at step {step + 1}; lower optim.lr or check the data "
                    f"(last checkpoint: {last_saved or resume_from})"
                )
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if keys_log is not None:
                keys_log.write(step, loader.epoch, [key for batch in micro for key in batch.keys])

            totals[5] = 1.0 if stop.requested else 0.0
            reduced = distributed.all_reduce_sum(totals, ctx)
            # The step's loss: the mean CE over all its targets (micro-batches and ranks together).
            loss_mean = float(reduced[0] / step_targets) if step_targets > 0 else 0.0
            losses.append(loss_mean)
            counters["samples_seen"] += int(reduced[6])
            counters["frames_seen"] += int(reduced[7])
            window.add(int(reduced[6]), int(reduced[7]))

            if step % cfg.log.every == 0 or step == cfg.run.max_steps:
                elapsed = window.elapsed()
                metrics = {
                    "step": step,
                    "loss": loss_mean,
                    "text_loss": float(reduced[1] / reduced[3]) if reduced[3] > 0 else None,
                    "speech_loss": float(reduced[2] / reduced[4]) if reduced[4] > 0 else None,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": window.samples / elapsed,
                    "frames_per_s": window.frames / elapsed,
                    "audio_s_per_s": window.frames / MEL_FRAMES_PER_SECOND / elapsed,
                    "data_wait_frac": min(1.0, window.data_wait / elapsed),
                    "samples_seen": counters["samples_seen"],
                    "epoch": loader.epoch,
                }
                log.record(metrics)
                steps_per_s = window.steps / elapsed
                log.console(metrics, (cfg.run.max_steps - step) / steps_per_s if steps_per_s > 0 else None)
                window = _Window()

            stop_now = bool(reduced[5] > 0) or (stop_after is not None and step >= stop_after)
            if step % cfg.checkpoint.every == 0 or step == cfg.run.max_steps or stop_now:
                last_saved, saved_step = save(step), step
                window = _Window()  # saving time is not training throughput
            if stop_now:
                stopped_early = step < cfg.run.max_steps
                if stopped_early:
                    log.info(f"stopped at step {step}; continue with --resume")
                break

        if saved_step != step:  # the data ran out between checkpoints
            last_saved = save(step)
        return TrainSummary(
            output_dir=out,
            start_step=start_step,
            last_step=step,
            completed=step >= cfg.run.max_steps,
            stopped_early=stopped_early,
            losses=losses,
            checkpoint=last_saved,
            seconds=time.perf_counter() - started,
        )
    finally:
        stop.uninstall()
        for sink in (log, keys_log):
            if sink is not None:
                sink.close()
        distributed.teardown(ctx)


def _next_batch(batches):
    """The next batch (None at the end), leaving the global RNGs as they were.

    Training randomness (dropout) draws from the global generators, so it must not depend on when
    the loader happens to draw from them: torch's DataLoader takes a seed from the global torch
    generator each time it starts its workers, which a resumed run does at a different point
    than an uninterrupted one.
    """
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return next(batches)
        except StopIteration:
            return None
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _KeysLog:
    """Each rank's record ids per step (OUT/sample_keys/rank-XXXXX.jsonl): which data a rank
    trained on, to audit the sharding and the data order of a run."""

    def __init__(self, output_dir: Path, rank: int, start_step: int):
        folder = output_dir / "sample_keys"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank:05d}.jsonl"
        _truncate_jsonl(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep the records of steps up to `start_step` (all gone for a fresh run): a resumed run
    replaces what the interrupted one logged after its checkpoint."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class _Window:
    """Throughput over the steps since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = self.frames = self.steps = 0
        self.data_wait = 0.0

    def add(self, samples: int, frames: int) -> None:
        self.samples += samples
        self.frames += frames
        self.steps += 1

    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.start)


def accumulate_gradients(wrapped, micro: list, ctx, autocast=contextlib.nullcontext):
    """Forward and backward one optimiser step's micro-batches on this rank, leaving in `.grad`
    the gradient of the mean CE over every target of the step, all ranks together: each target
    token weighs the same whatever the size of its micro-batch or the rank it is on, as in one
    batch holding them all (the reference's single mean CE over a batch, extended to accumulation
    and data parallelism). Averaging per-micro-batch means instead would weigh a token of a
    29-target micro-batch 12x one of a 345-target micro-batch.

    Each micro-batch backwards its summed CE; after the last one (whose backward all-reduces the
    gradients) the step's target count is summed over the ranks and the gradients are divided by it.

    Returns (totals, step_targets): totals, float64 on ctx.device, summed over this rank's
    micro-batches: [0] CE summed over all targets, [1] over text targets, [2] over speech targets,
    [3] text targets, [4] speech targets, [5] 0 (the loop's stop flag), [6] samples, [7] mel
    frames; step_targets: text + speech targets of the step over all ranks.
    """
    import torch

    from . import distributed

    totals = torch.zeros(8, dtype=torch.float64, device=ctx.device)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    for i, batch in enumerate(micro):
        totals[6] += len(batch)
        totals[7] += batch.feature_lengths.sum()
        batch = batch.to(ctx.device, non_blocking=True)
        # Gradients are all-reduced only in the backward of the last micro-batch.
        with distributed.gradient_sync(wrapped, enabled=i == len(micro) - 1):
            with autocast():
                output = wrapped(batch)
            _token_weighted_backward(output)
        n_text, n_speech = int(output.n_text_tokens or 0), int(output.n_speech_tokens or 0)
        totals[0] += output.loss.detach().double() * (n_text + n_speech)
        for j, name, n in ((1, "text_loss", n_text), (2, "speech_loss", n_speech)):
            value = getattr(output, name, None)
            if value is not None:
                totals[j] += value.detach().double() * n
        totals[3] += n_text
        totals[4] += n_speech
    step_targets = float(distributed.all_reduce_sum(totals[3] + totals[4], ctx))
    _scale_gradients(trainable, ctx.world_size / step_targets if step_targets > 0 else 1.0)
    return totals, step_targets


def _token_weighted_backward(output) -> None:
    """Backward the micro-batch's CE summed over its targets (not its mean), so that after the
    step's micro-batches the gradients hold the sum over all the step's targets; `_scale_gradients`
    then divides by their number. The forward's `loss` is the mean over its text and speech targets
    (osum.OSUMOutput), so the sum is loss x count; with no target the loss is a graph-connected
    zero and stays one, so DDP and FSDP still see every parameter take part."""
    n_targets = int(output.n_text_tokens or 0) + int(output.n_speech_tokens or 0)
    (output.loss * n_targets).backward()


def _scale_gradients(params, factor: float) -> None:
    """Multiply every gradient by `factor`: world_size / (the step's targets over all ranks). The
    factor is world_size / N, not 1 / N, because DDP and FSDP average gradients over the ranks."""
    if factor == 1.0:
        return
    for param in params:
        if param.grad is not None:
            param.grad.mul_(factor)


def _clip(params, max_norm: float | None) -> float:
    """Clip the global gradient norm (when configured) and return it as a float."""
    import torch

    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


if __name__ == "__main__":
    sys.exit(main())
