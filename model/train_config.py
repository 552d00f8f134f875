"""The training config: one YAML file per run (model/configs/train/*.yaml), validated when loaded.

A config says which model to build and which of its modules train (the recipe stage), which
shards and tasks feed it with which mixing weights, the optimiser and schedule, how the run is
parallelised, and when it checkpoints and logs. An unknown or mistyped key anywhere is an error
naming it, and any value can be overridden with `--set dotted.key=value` (the value is read as
YAML), as with the pipeline's profiles.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from echat.settings import resolve_named_yaml, validate_settings
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# `set_trainable` stage names of the recipe (DESIGN.md "The model package"); None trains everything.
STAGES = ("understanding", "generation", "empathy")


class TrainConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    # A model config name from model/configs/ (tiny, osum, osum-echat) or a path to its YAML.
    config: str
    # Load the pretrained encoder / LLM weights the model config names (hub id or local path).
    load_weights: bool = False
    # A checkpoint (step folder, checkpoints folder or run folder) whose model weights start this
    # run: how one recipe stage continues from the previous one. Optimiser state is not taken.
    init_from: str | None = None
    # Which modules train: the `set_trainable` stage name; null leaves every parameter trainable.
    stage: Literal["understanding", "generation", "empathy"] | None = None
    # Recompute activations in the backward pass of the model's transformer stacks (saves memory).
    gradient_checkpointing: bool = False
    # Dtype of the parameters while training: float32 master weights (AdamW updates stay exact;
    # bf16 compute comes from autocast or FSDP's mixed precision). bfloat16 halves the memory.
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataSection(_Strict):
    # Parquet shards: files, globs, or folders (searched recursively for *.parquet), e.g. the
    # output folder of `echat build`.
    train: list[str]
    # Task tag -> mixing weight: the expected number of samples of that task per record that
    # supports it, per epoch (1.0: every such record once; 0.25: a quarter of them). Tags follow
    # schemas/vocab.py TASK_TAGS; model/samples.py says what each task needs from a record.
    tasks: dict[str, float]
    max_frames_per_batch: int = 3000  # dynamic batches: mel frames (100 per second) per batch
    # Optional cap on batch size x longest LLM sequence (tokens + speech positions + speech
    # targets): bounds the memory of batches of long text-only samples.
    max_tokens_per_batch: int | None = None
    sort_window: int = 500  # samples sorted by length together to form batches
    shuffle_buffer: int = 500
    num_workers: int = 2
    # Share of <THINK> samples that get the natural-language reasoning instead of the tag form.
    think_text_ratio: float = 0.5
    # A label scored below this does not make a label task (heuristic labels score low).
    min_label_score: float = 0.0
    # Share of dialogue/TTS samples whose user turn also carries a task instruction.
    chat_instruction_ratio: float = 0.0
    # Passes over the shards; null cycles forever and run.max_steps ends the run.
    epochs: int | None = None

    @field_validator("train")
    @classmethod
    def _some_shards(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one shard file, glob or folder")
        return v

    @field_validator("tasks")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("name at least one task with a positive weight")
        bad = [tag for tag, w in v.items() if not w > 0]
        if bad:
            raise ValueError(f"mixing weights must be positive: {', '.join(bad)}")
        return v

    @field_validator("max_frames_per_batch", "max_tokens_per_batch", "sort_window")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("think_text_ratio", "min_label_score", "chat_instruction_ratio")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be between 0 and 1")
        return v

    @field_validator("shuffle_buffer", "num_workers")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must not be negative")
        return v


class OptimSection(_Strict):
    """AdamW with linear warm-up then decay; the reference recipe's values are the defaults."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 8000
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    # The decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 5.0  # max global gradient norm; null: no clipping
    grad_accum: int = 1  # micro-batches per optimiser step

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must not be negative")
        return v

    @field_validator("grad_accum")
    @classmethod
    def _accum(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("min_lr_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be between 0 and 1")
        return v


class RunSection(_Strict):
    max_steps: int  # optimiser steps; the schedule decays over these
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU. bf16 asks for CUDA autocast (an error on CPU).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Stages freeze modules and text-only tasks leave the speech head unused; DDP must then look
    # for parameters without gradients. Set false only for a config where every step uses every
    # trainable parameter (it saves a graph traversal per step).
    find_unused_parameters: bool = True

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class CheckpointSection(_Strict):
    every: int = 1000  # optimiser steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # older step folders are deleted
    # full: the whole model state (full fine-tune, tiny). trainable: every parameter group this
    # run or the runs it continues (model.init_from, --resume) have trained, frozen now or not,
    # and the new modules the pretrained weights lack (LoRA runs: megabytes instead of the whole
    # LLM); reloading rebuilds the rest from the pretrained weights the model config names.
    weights: Literal["full", "trainable"] = "full"

    @field_validator("every", "keep_last")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class LogSection(_Strict):
    every: int = 10  # optimiser steps between metric records and console lines
    tensorboard: bool = True
    # Write the record ids each rank trained on, per step, to OUT/sample_keys/rank-XXXXX.jsonl.
    sample_keys: bool = False

    @field_validator("every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class TrainConfig(_Strict):
    name: str
    description: str = ""
    output_dir: str  # checkpoints/, metrics.jsonl, tensorboard/ and the resolved config go here
    model: ModelSection
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    run: RunSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.run.max_steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds run.max_steps ({self.run.max_steps})"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def configs_dir() -> Path:
    return Path(str(resources.files("echat.model"))) / "configs" / "train"


def resolve(name_or_path: str) -> Path:
    """A config name from model/configs/train/ (`tiny`) or a path to a YAML file."""
    try:
        return resolve_named_yaml(name_or_path, configs_dir(), "training config")
    except LookupError as exc:
        raise TrainConfigError(str(exc)) from None


def parse_config(data: Any, overrides: list[str] | tuple[str, ...] = (), where: str = "config") -> TrainConfig:
    """Validate a config mapping (after applying `--set` overrides); errors name every bad key."""
    try:
        return validate_settings(TrainConfig, data, overrides, what="training config", where=where)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None


def load_train_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    path = resolve(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_config(data, overrides, where=str(path))

