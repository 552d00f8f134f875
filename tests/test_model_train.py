"""`echat train`: config validation, schedule, checkpoints, and real training of the tiny model on
shards built by `echat build` from the demo corpus (the `demo_shards` session fixture).

The slow tests train for real on CPU: single process in-process (falling loss, exact resume with
dropout and a data-loader worker, reload for inference), and under `torchrun --nproc_per_node 2`
(gloo) in subprocesses (DDP: ranks see different data, loss falls, resume is exact; FSDP runs and
its checkpoint reloads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from echat.model import checkpoint as ckpt
from echat.model.train_config import (
    STAGES,
    TrainConfigError,
    load_train_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]


def _tiny(shards: Path, out: Path, *overrides: str):
    return load_train_config("tiny", [f"data.train=[{shards}]", f"output_dir={out}", *overrides])


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- config


def test_unknown_key_is_an_error_naming_it():
    data = yaml.safe_load((REPO / "model/configs/train/tiny.yaml").read_text())
    data["optim"]["learning_rate"] = 1e-3
    data["shuffle"] = True
    with pytest.raises(TrainConfigError) as err:
        parse_config(data)
    assert "unknown key 'optim.learning_rate'" in str(err.value)
    assert "unknown key 'shuffle'" in str(err.value)


def test_set_overrides_are_validated_too():
    cfg = load_train_config("tiny", ["optim.lr=1e-4", 'data.tasks={"<TRANSCRIBE>": 0.5}', "run.max_steps=7"])
    assert cfg.optim.lr == 1e-4 and cfg.data.tasks == {"<TRANSCRIBE>": 0.5} and cfg.run.max_steps == 7
    with pytest.raises(TrainConfigError, match="unknown key 'run.max_step'"):
        load_train_config("tiny", ["run.max_step=7"])
    with pytest.raises(TrainConfigError, match="optim.warmup_steps"):
        load_train_config("tiny", ["run.max_steps=2"])  # warm-up (3) longer than the run
    with pytest.raises(TrainConfigError, match="mixing weights must be positive"):
        load_train_config("tiny", ['data.tasks={"<TRANSCRIBE>": 0}'])


def test_cli_reports_a_bad_key_and_exits_2(capsys):
    from echat.model import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.run(parser.parse_args(["--config", "tiny", "--set", "model.stag=understanding"])) == 2
    assert "unknown key 'model.stag'" in capsys.readouterr().err


def test_recipe_stages_carry_the_reference_optimiser():
    from echat.schemas.vocab import TASK_TAGS

    for stage in STAGES:
        cfg = load_train_config(stage)
        assert cfg.model.config == "osum-echat" and cfg.model.stage == stage
        o = cfg.optim
        assert (o.lr, tuple(o.betas), o.weight_decay, o.warmup_steps, o.grad_clip) == (5e-5, (0.9, 0.99), 0.01, 8000, 5.0)
        assert cfg.run.precision == "auto"  # bf16 autocast on GPU
        assert set(cfg.data.tasks) <= set(TASK_TAGS), set(cfg.data.tasks) - set(TASK_TAGS)
    assert "<TRANSCRIBE>" in load_train_config("understanding").data.tasks
    assert "<TEXT2TOKEN>" in load_train_config("generation").data.tasks
    assert "<S2TCHAT> <TEXT2TOKEN> <THINK>" in load_train_config("empathy").data.tasks
    # Each later stage starts from the previous stage's output.
    assert load_train_config("generation").model.init_from == load_train_config("understanding").output_dir
    assert load_train_config("empathy").model.init_from == load_train_config("generation").output_dir


def test_stage_names_match_the_model_configs():
    from echat.model.config import STAGES as MODEL_STAGES
    from echat.model.config import load_config

    assert set(STAGES) == set(MODEL_STAGES)
    assert set(load_config("osum-echat").stages) == set(STAGES)


# ---------------------------------------------------------------- schedule, RNG, checkpoint paths


def test_warmup_then_decay():
    from echat.model.train import WarmupDecay

    cos = WarmupDecay(warmup=4, total=14, decay="cosine", min_ratio=0.1)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == pytest.approx(1.0) and cos(9) == pytest.approx(0.55) and cos(14) == pytest.approx(0.1)
    assert cos(100) == pytest.approx(0.1)
    lin = WarmupDecay(warmup=0, total=10, decay="linear", min_ratio=0.0)
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert WarmupDecay(2, 10, "constant", 0.0)(7) == 1.0


def test_scheduler_state_round_trips():
    import torch

    from echat.model.train import build_scheduler
    from echat.model.train_config import OptimSection

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        return opt, build_scheduler(opt, OptimSection(lr=1.0, warmup_steps=3), max_steps=10)

    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 5


def test_rng_capture_and_restore():
    import random

    import numpy as np
    import torch

    state = ckpt.capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_resolve_checkpoint_accepts_run_checkpoints_and_step_folders(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    (root / ".tmp-step-0000015").mkdir()  # an interrupted save is never picked
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step-0000010"
    assert ckpt.resolve_checkpoint(root).name == "step-0000010"
    assert ckpt.resolve_checkpoint(root / "step-0000005").name == "step-0000005"
    (root / "latest").write_text("step-0000005\n")
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step-0000005"
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere")


# ---------------------------------------------------------------- training (slow)


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tmp_path_factory):
    """30 steps of the tiny model on the demo shards, one process, checkpoints every 10."""
    from echat.model.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = _tiny(demo_shards, out, "log.every=1", "checkpoint.keep_last=2")
    return cfg, train(cfg)


@pytest.mark.slow
def test_tiny_model_loss_falls(tiny_run):
    cfg, summary = tiny_run
    assert summary.completed and summary.last_step == 30
    losses = _losses(summary.output_dir)
    assert losses == summary.losses and len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    records = [json.loads(line) for line in (summary.output_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "text_loss", "speech_loss", "lr", "grad_norm", "samples_per_s", "frames_per_s"):
        assert key in records[-1]
    assert all(r["samples_per_s"] > 0 for r in records)
    assert any(r["frames_per_s"] > 0 for r in records)  # a text-only step has no mel frames
    assert records[2]["lr"] == pytest.approx(cfg.optim.lr)  # warm-up done after 3 steps
    assert list((summary.output_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_checkpoint_layout_and_rotation(tiny_run):
    _, summary = tiny_run
    root = summary.output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000020", "step-0000030"]  # keep_last 2
    assert (root / "latest").read_text().strip() == "step-0000030"
    step = root / "step-0000030"
    for name in ("model.pt", "optimizer.pt", "scheduler.pt", "rank-00000.pt", "train_config.yaml",
                 "model_config.yaml", "trainer_state.json", "tokenizer"):
        assert (step / name).exists(), name
    state = ckpt.read_trainer_state(step)
    assert state["step"] == 30 and state["world_size"] == 1 and state["weights"] == "full"
    assert state["counters"]["samples_seen"] > 0


@pytest.mark.slow
def test_load_for_inference_gives_the_trained_model(tiny_run, demo_shards):
    import torch

    from echat.model.data import build_dataloader
    from echat.model.osum import build_model

    cfg, summary = tiny_run
    model, tokenizer, model_config = ckpt.load_for_inference(summary.output_dir, "cpu")
    assert not model.training and model_config.name == "tiny"
    loader = build_dataloader([str(demo_shards)], tokenizer, tasks=cfg.data.tasks, max_frames_per_batch=2000,
                              shuffle_buffer=0, seed=7, epochs=1)
    batches = [b for _, b in zip(range(4), loader)]
    fresh = build_model(model_config, tokenizer=tokenizer).eval()
    with torch.no_grad():
        trained_loss = sum(float(model(b).loss) for b in batches)
        fresh_loss = sum(float(fresh(b).loss) for b in batches)
    assert trained_loss < fresh_loss - 1.0, (trained_loss, fresh_loss)


@pytest.mark.slow
def test_a_fresh_run_refuses_an_output_folder_with_checkpoints(tiny_run, demo_shards):
    from echat.model.train import train

    cfg, summary = tiny_run
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        train(cfg)


@pytest.mark.slow
def test_resume_needs_the_same_world_size(tiny_run):
    import torch

    from echat.model.distributed import DistContext

    _, summary = tiny_run
    with pytest.raises(ckpt.CheckpointError, match="written by 1 rank"):
        ckpt.load_training_state(summary.checkpoint, None, None, None, DistContext(0, 2, 0, torch.device("cpu"), "gloo"))


def _dropout_model_config(tmp_path: Path) -> Path:
    """The tiny model with dropout in the encoder, adapter and LLM, so resume must restore RNG."""
    data = yaml.safe_load((REPO / "model/configs/tiny.yaml").read_text())
    data["encoder"]["architecture"]["dropout"] = 0.1
    data["adapter"]["dropout"] = 0.1
    data["llm"]["architecture"]["attention_dropout"] = 0.1
    path = tmp_path / "tiny-dropout.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_losses(demo_shards, tmp_path):
    import torch

    from echat.model.config import load_config
    from echat.model.data import build_dataloader
    from echat.model.osum import build_model
    from echat.model.train import train

    model_cfg = _dropout_model_config(tmp_path)
    # The dropout is real: two training-mode passes over one batch differ.
    model = build_model(load_config(model_cfg)).train()
    batch = next(iter(build_dataloader([str(demo_shards)], model.tokenizer, tasks={"<TRANSCRIBE>": 1.0},
                                       max_frames_per_batch=2000, shuffle_buffer=0, seed=1)))
    with torch.no_grad():
        assert float(model(batch).loss) != float(model(batch).loss)

    common = [f"model.config={model_cfg}", "run.max_steps=12", "checkpoint.every=4", "data.num_workers=1",
              "optim.grad_accum=2", "log.every=1"]
    whole = train(_tiny(demo_shards, tmp_path / "whole", *common))
    part = train(_tiny(demo_shards, tmp_path / "parts", *common), stop_after=6)
    assert part.stopped_early and part.last_step == 6 and part.checkpoint.name == "step-0000006"
    rest = train(_tiny(demo_shards, tmp_path / "parts", *common), resume="latest")
    assert rest.start_step == 6 and rest.completed
    assert part.losses + rest.losses == whole.losses  # exact float equality
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "whole")


# ---------------------------------------------------------------- torchrun (slow)


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "echat.model.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _ddp_args(shards: Path) -> list[str]:
    return ["--config", "tiny", "--set", f"data.train=[{shards}]", "--set", "run.max_steps=12",
            "--set", "checkpoint.every=4", "--set", "log.every=1", "--set", "log.sample_keys=true"]


@pytest.fixture(scope="module")
def ddp_run(demo_shards, tmp_path_factory):
    """(output folder, console output) of 12 uninterrupted steps under torchrun, 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "whole"
    return out, _torchrun([*_ddp_args(demo_shards), "--out", str(out)]).stdout


@pytest.mark.slow
def test_torchrun_ddp_two_processes(ddp_run):
    out, stdout = ddp_run
    assert "2 process(es) on cpu (ddp)" in stdout
    losses = _losses(out)
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    # The ranks read different records (within the first epoch, disjoint ones).
    seen = []
    for rank in (0, 1):
        rows = [json.loads(line) for line in (out / "sample_keys" / f"rank-0000{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 13))
        seen.append({k for r in rows if r["epoch"] == 0 for k in r["keys"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.slow
def test_torchrun_ddp_stop_and_resume_is_exact(ddp_run, demo_shards, tmp_path):
    whole, _ = ddp_run
    parts = tmp_path / "parts"
    _torchrun([*_ddp_args(demo_shards), "--out", str(parts), "--stop-after-steps", "5"])
    step = ckpt.resolve_checkpoint(parts)
    state = ckpt.read_trainer_state(step)
    assert state["step"] == 5 and state["world_size"] == 2
    assert (step / "rank-00000.pt").is_file() and (step / "rank-00001.pt").is_file()
    _torchrun([*_ddp_args(demo_shards), "--out", str(parts), "--resume"])
    assert _losses(parts) == _losses(whole)  # exact float equality, both ranks' data and RNG restored
    for rank in (0, 1):  # and each rank trained on the same records at every step
        name = f"sample_keys/rank-0000{rank}.jsonl"
        assert (parts / name).read_text() == (whole / name).read_text()


@pytest.mark.slow
def test_torchrun_fsdp_two_processes(demo_shards, tmp_path):
    out = tmp_path / "fsdp"
    proc = _torchrun(["--config", "tiny", "--set", f"data.train=[{demo_shards}]", "--set", "run.max_steps=6",
                      "--set", "checkpoint.every=3", "--set", "run.parallel=fsdp", "--set", "log.every=1",
                      "--set", "optim.grad_accum=2", "--out", str(out)])
    assert "2 process(es) on cpu (fsdp)" in proc.stdout
    assert len(_losses(out)) == 6
    import torch

    from echat.model.osum import build_model
    from echat.model.train import seed_everything

    # The checkpoint holds the gathered (unsharded) trained weights: every parameter at its full
    # shape, the sharded LLM layers changed by training from the run's initial weights (the same
    # seed rebuilds those exactly), and it loads into one process.
    def initial():
        seed_everything(1234)  # run.seed of the tiny config
        return build_model("tiny").state_dict()

    start = initial()
    assert all(torch.equal(v, initial()[k]) for k, v in start.items())  # the rebuild is deterministic
    saved = torch.load(ckpt.resolve_checkpoint(out) / "model.pt", weights_only=True)
    assert set(saved) == set(start)
    assert all(saved[k].shape == v.shape for k, v in start.items())
    layers = [k for k in start if k.startswith("llm.model.layers.")]
    assert layers and all(not torch.equal(saved[k], start[k]) for k in layers)
    model, _, _ = ckpt.load_for_inference(out, "cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(demo_shards, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "echat.cli", "train", "--config", "tiny", "--set", f"data.train=[{demo_shards}]",
           "--set", "run.max_steps=200", "--set", "checkpoint.every=1000", "--set", "log.every=1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= last < 200 and f"stopped at step {last}" in stdout
    assert ckpt.read_trainer_state(ckpt.resolve_checkpoint(out))["step"] == last


def _lora_model_config(tmp_path: Path) -> Path:
    """The tiny architecture as a LoRA config (like `osum`) over 'pretrained' parts: a tiny Whisper
    encoder and Qwen2 LM built through transformers' own classes and saved locally, so that
    `load_weights` takes the same path as a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from echat.model.encoder import build_encoder

    data = yaml.safe_load((REPO / "model/configs/tiny.yaml").read_text())
    enc_dir, llm_dir = tmp_path / "whisper-tiny-random", tmp_path / "qwen2-tiny-random"
    build_encoder(data["encoder"]["architecture"]).save_pretrained(enc_dir)
    arch = dict(data["llm"]["architecture"])
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).save_pretrained(llm_dir)
    data["name"] = "tiny-lora"
    data["encoder"]["name_or_path"] = str(enc_dir)
    data["llm"]["name_or_path"] = str(llm_dir)
    data["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    data["stages"] = {"understanding": ["encoder", "adapter", "speech_bounds", "lora"],
                      "generation": ["lora", "speech_embed", "speech_head"], "empathy": ["lora"]}
    path = tmp_path / "tiny-lora.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_lora_run_saves_trainable_weights_and_reloads_over_the_pretrained_base(demo_shards, tmp_path):
    import torch

    from echat.model.osum import build_model, group_of
    from echat.model.train import train

    model_cfg = _lora_model_config(tmp_path)
    common = [f"model.config={model_cfg}", "model.load_weights=true", "model.stage=understanding",
              "checkpoint.weights=trainable", "run.max_steps=6", "checkpoint.every=3", "log.every=1"]
    whole = train(_tiny(demo_shards, tmp_path / "whole", *common))
    part = train(_tiny(demo_shards, tmp_path / "parts", *common), stop_after=3)
    rest = train(_tiny(demo_shards, tmp_path / "parts", *common), resume="latest")
    assert part.losses + rest.losses == whole.losses

    step = ckpt.resolve_checkpoint(tmp_path / "whole")
    saved = torch.load(step / "model.pt", weights_only=True)
    assert saved and any(".lora_A." in k for k in saved) and not any(".base_layer." in k for k in saved)
    # the frozen LLM is not saved: only LoRA's matrices and its trainable special-token rows
    assert not any(k.startswith("llm.") and group_of(k) != "lora" for k in saved)
    # The stage's trainable groups, plus the new modules the pretrained weights lack (frozen or not).
    assert {k.split(".")[0] for k in saved} == {"encoder", "adapter", "speech_bounds", "llm", "speech_embed", "speech_head"}
    assert "encoder.embed_positions.weight" not in saved  # frozen and pretrained

    model, _, model_config = ckpt.load_for_inference(tmp_path / "whole", "cpu")
    assert model_config.name == "tiny-lora"
    base = build_model(model_config, load_weights=True).state_dict()  # the pretrained parts
    for name, tensor in model.state_dict().items():
        expected = saved[name] if name in saved else base[name]
        assert torch.equal(tensor, expected), name


@pytest.mark.slow
def test_a_later_lora_stage_keeps_what_the_earlier_stage_trained(demo_shards, tmp_path):
    """Stage 1 trains the encoder, stage 2 (init_from stage 1) freezes it: stage 2's "trainable"
    checkpoint must still hold stage 1's encoder, or reloading it would bring back the pretrained one."""
    import torch

    from echat.model.osum import build_model
    from echat.model.train import train

    model_cfg = _lora_model_config(tmp_path)
    common = [f"model.config={model_cfg}", "model.load_weights=true", "checkpoint.weights=trainable",
              "run.max_steps=2", "optim.warmup_steps=1", "checkpoint.every=2", "log.tensorboard=false"]
    train(_tiny(demo_shards, tmp_path / "stage1", *common, "model.stage=understanding"))
    train(_tiny(demo_shards, tmp_path / "stage2", *common, "model.stage=generation",
                f"model.init_from={tmp_path / 'stage1'}"))

    stage1 = torch.load(ckpt.resolve_checkpoint(tmp_path / "stage1") / "model.pt", weights_only=True)
    step2 = ckpt.resolve_checkpoint(tmp_path / "stage2")
    assert ckpt.read_trainer_state(step2)["trained_groups"] == ["adapter", "encoder", "lora", "speech_bounds",
                                                                 "speech_embed", "speech_head"]
    model, _, model_config = ckpt.load_for_inference(tmp_path / "stage2", "cpu")
    reloaded = model.state_dict()
    pretrained = build_model(model_config, load_weights=True).state_dict()
    trained_encoder = [k for k in stage1 if k.startswith("encoder.")]
    assert trained_encoder and "encoder.embed_positions.weight" not in trained_encoder
    assert any(not torch.equal(stage1[k], pretrained[k]) for k in trained_encoder)  # stage 1 changed it
    for name in trained_encoder:  # and stage 2's checkpoint brings stage 1's values back
        assert torch.equal(reloaded[name], stage1[name]), name


@pytest.mark.slow
def test_resume_with_more_steps_rebuilds_the_schedule_and_refuses_optimiser_changes(demo_shards, tmp_path):
    from echat.model.train import WarmupDecay, train

    common = ["optim.warmup_steps=1", "checkpoint.every=2", "log.every=1", "log.tensorboard=false"]
    out = tmp_path / "run"
    first = train(_tiny(demo_shards, out, *common, "run.max_steps=4"))
    assert first.completed and first.last_step == 4

    # A changed learning rate (or warm-up, decay, betas...) would be silently replaced by the saved
    # optimiser/scheduler state: refused, naming the key, before anything is trained.
    with pytest.raises(TrainConfigError, match=r"optim\.lr \(0\.002 -> 0\.001\).*optim\.warmup_steps \(1 -> 2\)"):
        train(_tiny(demo_shards, out, *common, "run.max_steps=8", "optim.lr=1e-3", "optim.warmup_steps=2"), resume="latest")
    assert ckpt.read_trainer_state(ckpt.resolve_checkpoint(out))["step"] == 4

    longer = train(_tiny(demo_shards, out, *common, "run.max_steps=8"), resume="latest")
    assert longer.start_step == 4 and longer.last_step == 8 and longer.completed
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    cfg = _tiny(demo_shards, out, *common, "run.max_steps=8")
    new_shape = WarmupDecay(1, 8, cfg.optim.decay, cfg.optim.min_lr_ratio)
    for step in range(5, 9):  # the learning rate follows the 8-step schedule, not the saved 4-step one
        assert records[step]["lr"] == pytest.approx(cfg.optim.lr * new_shape(step - 1)), step
    assert records[5]["lr"] > 2 * cfg.optim.lr * cfg.optim.min_lr_ratio  # the 4-step schedule had ended at the minimum


@pytest.mark.slow
def test_audio_longer_than_the_encoder_takes_is_set_aside_not_a_crash(demo_shards, tmp_path, caplog):
    """train() gives the loader the encoder's input limit from the model config: with an encoder
    that takes 1 s (max_source_positions 50), the demo's longer utterances keep only their text
    tasks instead of stopping the run in the encoder."""
    data = yaml.safe_load((REPO / "model/configs/tiny.yaml").read_text())
    data["encoder"]["architecture"]["max_source_positions"] = 50
    model_cfg = tmp_path / "tiny-1s.yaml"
    model_cfg.write_text(yaml.safe_dump(data))
    from echat.model.train import train

    summary = train(_tiny(demo_shards, tmp_path / "run", f"model.config={model_cfg}", "run.max_steps=2",
                          "optim.warmup_steps=1", "log.tensorboard=false"))
    assert summary.completed
    assert "is longer than the speech encoder takes (100 frames, 1 s); only its text tasks are used" in caplog.text
