"""Run profiles: YAML files in configs/, validated when loaded.

A profile names a backend and its parameters for every stage, the filters, the output layout and
the Beam options. An unknown or mistyped key anywhere is an error that names it, and any value
can be overridden with `--set dotted.key=value` (the value is read as YAML).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml
from echat.settings import resolve_named_yaml, validate_settings
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import backends


class ProfileError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageChoice(_Strict):
    backend: str
    params: dict[str, Any] = Field(default_factory=dict)


class DecodeOptions(_Strict):
    backend: str = "soundfile"
    params: dict[str, Any] = Field(default_factory=dict)


class FilterOptions(_Strict):
    """Segments outside these bounds go to rejects with a `filtered_...` reason (labelers/filters.py)."""

    min_duration_s: float = 0.5
    max_duration_s: float = 30.0
    min_snr_db: float | None = None
    min_speech_ratio: float | None = None
    max_clipping_ratio: float | None = 0.05
    require_transcript: bool = True

    @model_validator(mode="after")
    def _bounds_make_sense(self) -> "FilterOptions":
        for name in ("min_duration_s", "max_duration_s", "min_speech_ratio", "max_clipping_ratio"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.min_duration_s is not None and self.max_duration_s is not None and self.min_duration_s > self.max_duration_s:
            raise ValueError(f"min_duration_s ({self.min_duration_s}) exceeds max_duration_s ({self.max_duration_s}): every segment would be rejected")
        return self


class OutputOptions(_Strict):
    rows_per_shard: int = 500
    max_shard_bytes: int = 256 * 1024 * 1024

    @field_validator("rows_per_shard", "max_shard_bytes")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v


class BeamOptions(_Strict):
    runner: str = "DirectRunner"
    direct_num_workers: int = 1
    direct_running_mode: str = "in_memory"
    # Any further Beam pipeline options, passed as --key=value (Dataflow project, region, ...).
    extra: dict[str, Any] = Field(default_factory=dict)


class Profile(_Strict):
    name: str
    description: str = ""
    dataset_name: str = "echat"
    license: str | None = None
    # Manifest transcript, language and labels (gender, age, emotion...) are taken as given and
    # labelled with model "manifest"; labelers fill only what the manifest leaves empty.
    trust_manifest: bool = True
    cache_dir: str = "~/.cache/echat-forge"
    decode: DecodeOptions = Field(default_factory=DecodeOptions)
    vad: StageChoice
    asr: StageChoice
    gender: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    age: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    emotion: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    events: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    style: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    metrics: StageChoice = Field(default_factory=lambda: StageChoice(backend="acoustic"))
    filters: FilterOptions = Field(default_factory=FilterOptions)
    reply: StageChoice
    tts: StageChoice
    speech_tokens: StageChoice = Field(default_factory=lambda: StageChoice(backend=backends.NONE))
    output: OutputOptions = Field(default_factory=OutputOptions)
    beam: BeamOptions = Field(default_factory=BeamOptions)

    # Stages in build order after decoding; each is a StageChoice field of the profile.
    STAGE_ORDER: ClassVar[tuple[str, ...]] = ("vad", "asr", "gender", "age", "emotion", "events", "style", "metrics")
    SYNTH_ORDER: ClassVar[tuple[str, ...]] = ("reply", "tts", "speech_tokens")

    @field_validator("vad")
    @classmethod
    def _vad_is_required(cls, choice: StageChoice) -> StageChoice:
        if choice.backend == backends.NONE:
            raise ValueError("every build needs a VAD backend: segments get their bounds and id there")
        return choice

    def stage_choices(self) -> list[tuple[str, StageChoice]]:
        """(stage, choice) for every enabled stage in build order, decode first."""
        decode = StageChoice(backend=self.decode.backend, params=self.decode.params)
        chosen = [("decode", decode)]
        for stage in (*self.STAGE_ORDER, *self.SYNTH_ORDER):
            choice = getattr(self, stage)
            if choice.backend != backends.NONE:
                chosen.append((stage, choice))
        return chosen


def configs_dir() -> Path:
    return Path(str(resources.files("echat.configs")))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A profile name from configs/ (`local`) or a path to a YAML file."""
    try:
        return resolve_named_yaml(name_or_path, configs_dir(), "profile")
    except LookupError as exc:
        raise ProfileError(str(exc)) from None


def load_profile(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    path = resolve(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        profile = validate_settings(Profile, data, overrides, what="profile", where=str(path))
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    for stage, choice in profile.stage_choices():
        try:
            backends.check_params(stage, choice.backend, choice.params, where=stage)
        except backends.BackendError as exc:
            raise ProfileError(f"invalid profile {path}: {exc}") from None
    return profile
