"""Training checkpoints: save, find, resume exactly, and load for inference.

Layout of one checkpoint (a run's `OUT/checkpoints/step-0000120/`):

    trainer_state.json   step, world size, weights kind ("full" | "trainable"), the parameter
                         groups trained so far (this run and the runs it continues), counters, versions
    model.pt             model state dict (torch.save), unsharded even when trained with FSDP: all
                         of it ("full"), or for LoRA runs ("trainable") every group trained so far
                         and the new modules the pretrained weights lack (weights_to_keep)
    optimizer.pt         AdamW state keyed by parameter name (torch.distributed.checkpoint's
                         get_state_dict), so it reloads under DDP, FSDP or one process
    scheduler.pt         learning-rate scheduler state
    rank-00000.pt ...    per rank: RNG states (python, numpy, torch, cuda) and data-loader position
    train_config.yaml    the resolved training config of the run
    model_config.yaml    the model config, to rebuild the architecture for inference
    tokenizer/           the tokenizer, when it can save itself (save_pretrained)

`OUT/checkpoints/latest` holds the name of the newest complete step folder. A checkpoint is
written into `.tmp-step-...` and renamed when every rank has finished, so a crash mid-save never
leaves a half checkpoint that `--resume` would pick up. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from . import distributed
from .distributed import DistContext

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (when used) CUDA."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- finding checkpoints


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (a checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder that `path` means: a step folder itself, a checkpoints folder, or a run's
    output folder (then its newest checkpoint, following `latest`)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    root = path if (path / LATEST).is_file() or list_checkpoints(path) else path / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint found at {path}")
    return found[-1][1]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    try:
        return resolve_checkpoint(checkpoints_root(output_dir))
    except CheckpointError:
        return None


# ---------------------------------------------------------------- saving


@dataclass
class SaveInputs:
    """Everything beyond model/optimiser/scheduler that a checkpoint records."""

    train_config_yaml: str
    model_config: Any  # config.ModelConfig
    weights: str  # "full" | "trainable" (see weights_to_keep)
    counters: dict[str, Any]  # samples_seen, frames_seen ... (rank-global)
    rank_state: dict[str, Any]  # this rank's data-loader state (its RNG is captured here)
    tokenizer: Any = None
    # Parameter groups whose weights differ from their pretrained source: those trainable in this
    # run and those trained by the runs it continues (model.init_from, --resume); trained_groups().
    trained_groups: tuple[str, ...] = ()


def _state_dict_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def weights_to_keep(model: nn.Module, model_config: Any, trained_groups: Iterable[str] = ()) -> set[str]:
    """Parameter names a "trainable" checkpoint holds: every trainable parameter, every parameter
    of `trained_groups` (groups an earlier stage trained and this one freezes: the pretrained
    weights no longer hold them), and every parameter that the pretrained weights named by the
    model config do not provide (the adapter, speech embeddings and heads, LoRA: new modules,
    randomly initialised, frozen or not). With those, rebuilding with load_weights=True and laying
    the checkpoint over it restores the model."""
    from .osum import ALWAYS_FROZEN, group_of

    if model_config.checkpoint is not None:  # a whole-model checkpoint provides every group
        pretrained = {group_of(name) for name, _ in model.named_parameters()}
    else:
        pretrained = {group for group, source in (("encoder", model_config.encoder.name_or_path),
                                                  ("llm", model_config.llm.name_or_path)) if source}
    changed = set(trained_groups)
    # Every name of a tensor, not only the first: a tied tensor (peft's trainable special-token rows
    # of a tied LM head, a tied head itself) must be saved under each name the state dict gives it,
    # or a loader reading the checkpoint by name finds its second name missing.
    return {
        name for name, p in model.named_parameters(remove_duplicate=False)
        if p.requires_grad or group_of(name) not in pretrained or (group_of(name) in changed and name not in ALWAYS_FROZEN)
    }


def trained_groups(model: nn.Module, continued_from: str | Path | None = None) -> tuple[str, ...]:
    """The parameter groups whose weights differ from their pretrained source: the groups with a
    trainable parameter in `model` now, and those trained by the run that wrote `continued_from`
    (the checkpoint this run resumes or was initialised from)."""
    from .osum import group_of

    groups = {group_of(name) for name, p in model.named_parameters() if p.requires_grad}
    if continued_from is not None:
        groups |= groups_trained_in(continued_from)
    return tuple(sorted(groups))


def groups_trained_in(checkpoint: str | Path) -> set[str]:
    """The groups a checkpoint's run (and the runs before it) trained, from trainer_state.json;
    for a checkpoint written before that was recorded, every group its model.pt holds."""
    checkpoint = Path(checkpoint)
    recorded = read_trainer_state(checkpoint).get("trained_groups")
    if recorded is not None:
        return set(recorded)
    from .osum import group_of

    state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    return {group_of(name) for name in state}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext,
    inputs: SaveInputs,
    keep_last: int,
) -> Path:
    """Write the checkpoint of `step` (every rank calls this; collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoints_root(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    # Gathering the full state is collective under FSDP, so every rank takes part.
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    if inputs.weights == "trainable":
        keep = weights_to_keep(distributed.unwrap(model), inputs.model_config, inputs.trained_groups)
        model_state = {name: value for name, value in model_state.items() if name in keep}
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier(ctx)

    torch.save({"rng": capture_rng(), "data": inputs.rank_state, "step": step}, tmp / f"rank-{ctx.rank:05d}.pt")
    if ctx.is_main:
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "train_config.yaml").write_text(inputs.train_config_yaml, encoding="utf-8")
        (tmp / "model_config.yaml").write_text(inputs.model_config.to_yaml(), encoding="utf-8")
        if inputs.tokenizer is not None and hasattr(inputs.tokenizer, "save_pretrained"):
            inputs.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": ctx.world_size,
            "weights": inputs.weights,
            "trained_groups": list(inputs.trained_groups),
            "counters": inputs.counters,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
        }
        # trainer_state.json last: its presence is what marks a folder as a checkpoint.
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    distributed.barrier(ctx)  # every rank's file is in place

    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n", encoding="utf-8")
        pointer_tmp.replace(root / LATEST)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(ctx)
    return final


# ---------------------------------------------------------------- resuming


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def load_training_state(
    checkpoint: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext,
) -> dict[str, Any]:
    """Restore model, optimiser and scheduler from `checkpoint` and return this rank's saved state
    ({"rng", "data", "step"}) plus "trainer" (trainer_state.json). RNG is not restored here: the
    caller does it last, once nothing else will draw from it before the next step."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    checkpoint = Path(checkpoint)
    trainer = read_trainer_state(checkpoint)
    if trainer["world_size"] != ctx.world_size:
        raise CheckpointError(
            f"{checkpoint} was written by {trainer['world_size']} rank(s) and this run has {ctx.world_size}: "
            "exact resume needs the same number of processes (each rank's data position and RNG are its own). "
            "Start a new run with model.init_from to continue from these weights instead."
        )
    model_state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    optim_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    set_model_state_dict(model, model_state, options=_state_dict_options(strict=trainer["weights"] == "full"))
    # Not strict: AdamW has no state for a trainable parameter that has not had a gradient yet
    # (the speech head before the first batch with speech targets).
    set_optimizer_state_dict(model, optimizer, optim_state, options=_state_dict_options(strict=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rank_file = checkpoint / f"rank-{ctx.rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{checkpoint} lacks {rank_file.name}")
    rank_state = torch.load(rank_file, weights_only=True)
    rank_state["trainer"] = trainer
    return rank_state


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> Path:
    """Load a checkpoint's model weights into an unwrapped `model` (a new stage's starting point).
    Returns the step folder used."""
    checkpoint = resolve_checkpoint(checkpoint)
    weights = read_trainer_state(checkpoint)["weights"]
    state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    result = model.load_state_dict(state, strict=weights == "full")
    if result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}/model.pt has weights this model lacks: {', '.join(result.unexpected_keys[:5])}"
        )
    return checkpoint


# ---------------------------------------------------------------- inference


def load_for_inference(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
):
    """(model, tokenizer, model_config) from a checkpoint, the model in eval mode on `device`.

    `checkpoint_dir` is a step folder, a checkpoints folder or a run's output folder (then the
    newest checkpoint). A "trainable" checkpoint (LoRA) rebuilds the frozen part from the
    pretrained weights its model config names, then lays the trained parameters over them.
    dtype: None means the model config's dtype on CUDA and float32 on CPU (where bf16 is slow).
    """
    from .config import load_config
    from .osum import build_model
    from .tokenizer import load_tokenizer

    checkpoint = resolve_checkpoint(checkpoint_dir)
    trainer = read_trainer_state(checkpoint)
    model_config = load_config(checkpoint / "model_config.yaml")
    saved_tokenizer = checkpoint / "tokenizer"
    tokenizer = load_tokenizer(model_config, path=saved_tokenizer if saved_tokenizer.is_dir() else None)
    if dtype is None:
        dtype = model_config.dtype if torch.device(device).type == "cuda" else "float32"
    model = build_model(model_config, device="cpu", load_weights=trainer["weights"] == "trainable",
                        tokenizer=tokenizer, dtype=dtype)
    load_model_weights(model, checkpoint)
    model.to(device)
    model.eval()
    return model, tokenizer, model_config
