"""Run profiles: YAML files in configs/, validated when loaded.

A profile is an ordered list of stage slots (each naming a backend, its parameters, and optionally
its batch size, requests in flight, retry policy and resource hints), the precedence rule for
fields several sources could fill, the output layout and the Beam options. An unknown or mistyped
key anywhere is an error that names it, and any value can be overridden with
`--set dotted.key=value` (read as YAML); `--set SLOT.params.key=value` addresses a stage by slot.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from echat.schemas.labels import normalise
from echat.schemas.record import LABEL_GROUPS
from echat.schemas.stage import MANIFEST, ORIGINS
from echat.schemas.stage_runner import DEFAULT_PRECEDENCE, stage_groups
from echat.settings import apply_override, resolve_named_yaml, validate_settings
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import backends


class ProfileError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryOptions(_Strict):
    """How transient failures (HTTP 429/5xx, timeouts) are retried (schemas/stage_runner.py)."""

    max_attempts: int = Field(4, ge=1)
    backoff_s: float = Field(0.5, ge=0.0)
    max_backoff_s: float = Field(30.0, ge=0.0)


class StageEntry(_Strict):
    """One slot of the build: which backend fills it, with what parameters and resources."""

    slot: str  # the name used everywhere: counters, rejects, the summary, `--set SLOT.params.x=`
    backend: str  # a name from pipelines/backends.py for this kind, or "package.module:Class"
    kind: str | None = None  # which backend table `backend` is looked up in; default: the slot
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int | None = Field(None, ge=1)  # default: the backend class's
    max_in_flight: int | None = Field(None, ge=1)  # default: the backend class's
    retry: RetryOptions | None = None  # default: the profile's
    # Beam resource hints (accelerator, min_ram...): the stage runs after a Reshuffle, so on
    # Dataflow it is not fused with the CPU stages before it.
    resources: dict[str, Any] = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.backend != backends.NONE

    @property
    def backend_kind(self) -> str:
        return self.kind or self.slot


class DedupOptions(_Strict):
    """Drop duplicates as rejects (pipelines/dedup.py): identical decoded audio anywhere in the
    corpus (right after decoding), a transcript repeated within one source (before the filter)."""

    audio: bool = False
    transcripts: bool = False


class OutputOptions(_Strict):
    rows_per_shard: int = 500
    max_shard_bytes: int = 256 * 1024 * 1024
    # Finished rows are saved in parts of this many (OUT/_work/parts/, pipelines/parts.py): what a
    # killed build keeps, so smaller parts lose less work and cost more files.
    part_rows: int = 64
    # Build in this many passes, each one pipeline over 1/chunks of the inputs (by a hash of their
    # source_uri), the last one making the shards from every pass's parts. The local runner holds
    # what passes between fused stages in memory, so its peak memory is that of one chunk; on
    # Dataflow, which shuffles on disk, leave it at 1. Duplicates (dedup) are found within a chunk.
    chunks: int = 1

    @field_validator("rows_per_shard", "max_shard_bytes", "part_rows", "chunks")
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
    # labelled with model "manifest": all of them (true), none (false) or the groups listed (e.g.
    # [transcript, language]). A field not trusted is the reference the labelers are scored
    # against: the summary's `label_accuracy` table.
    trust_manifest: bool | list[str] = True
    # The language of records that do not say (a folder of audio without a manifest), e.g. "en";
    # null leaves it to a language-ID stage, and unset languages are flagged `language_unknown`.
    language: str | None = None
    manifest_encoding: str = "utf-8"  # of a .jsonl/.csv manifest (e.g. latin-1 for an old spreadsheet's CSV)
    # A Hugging Face dataset's columns (pipelines/source_hf.py), as {our name: the dataset's name}, e.g.
    # {text: sentence, gender: sex, speaker: client_id}; a name left out is read under our own name
    # when the dataset has it, one mapped to null is never read. `--set columns.text=sentence`.
    columns: dict[str, str | None] = Field(default_factory=dict)
    # Which source wins a field that several could fill, best first (schemas/stage_runner.py): a
    # stage writes a label group only when it is empty or held by a source ranked below its own.
    precedence: list[str] = Field(default_factory=lambda: list(DEFAULT_PRECEDENCE))
    cache_dir: str = "~/.cache/echat-forge"
    retry: RetryOptions = Field(default_factory=RetryOptions)
    # The build's stages, in order. Adding a stage is one entry here.
    stages: list[StageEntry]
    dedup: DedupOptions = Field(default_factory=DedupOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)
    beam: BeamOptions = Field(default_factory=BeamOptions)

    @field_validator("trust_manifest")
    @classmethod
    def _known_groups(cls, value):
        if isinstance(value, list):
            unknown = [g for g in value if g not in LABEL_GROUPS]
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}; trust_manifest lists some of {', '.join(LABEL_GROUPS)}")
        return value

    @field_validator("manifest_encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        from .source_hf import check_column_mapping

        return check_column_mapping(value)

    @field_validator("language")
    @classmethod
    def _known_language(cls, value):
        return None if value is None else normalise("language", value)

    def trusted_fields(self) -> frozenset[str]:
        """The manifest's label groups taken as given (the others become the reference)."""
        if self.trust_manifest is True:
            return frozenset(LABEL_GROUPS)
        return frozenset(self.trust_manifest or ())

    @field_validator("precedence")
    @classmethod
    def _known_origins(cls, value: list[str]) -> list[str]:
        unknown = [o for o in value if o not in ORIGINS]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"lists each of {', '.join(ORIGINS)} at most once; got {value}")
        return value

    @field_validator("stages")
    @classmethod
    def _unique_slots(cls, entries: list[StageEntry]) -> list[StageEntry]:
        seen = set()
        for entry in entries:
            if entry.slot in seen:
                raise ValueError(f"slot {entry.slot!r} appears twice; give each stage its own slot name")
            if entry.slot in RESERVED_SLOTS:
                raise ValueError(f"slot name {entry.slot!r} is reserved for the build's own steps")
            seen.add(entry.slot)
        return entries

    def enabled_stages(self) -> list[StageEntry]:
        """The entries that run, in build order (a backend of `none` leaves its slot out)."""
        return [entry for entry in self.stages if entry.enabled]

    def stage(self, slot: str) -> StageEntry:
        for entry in self.stages:
            if entry.slot == slot:
                return entry
        raise KeyError(f"profile {self.name!r} has no stage {slot!r}; slots: {', '.join(e.slot for e in self.stages)}")


# Steps of the build that are not profile stages: the source and the row encoder before the sink.
RESERVED_SLOTS = ("source", "encode")


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
    """The profile, with `--set` overrides applied, validated; errors name the key or the slot.

    `--set SLOT.backend=...` and `--set SLOT.params.key=value` address a stage entry by its slot.
    """
    path = resolve(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        rest = _apply_slot_overrides(data, overrides)
        profile = validate_settings(Profile, data, rest, what="profile", where=str(path))
        check_stages(profile)
    except (ValueError, backends.BackendError) as exc:
        message = str(exc)
        raise ProfileError(message if message.startswith("invalid profile") else f"invalid profile {path}: {message}") from None
    return profile


def _apply_slot_overrides(data: dict[str, Any], overrides) -> list[str]:
    """Apply overrides whose first key is a stage slot to that entry; return the others."""
    if not isinstance(data, dict):
        return list(overrides)
    entries = {e.get("slot"): e for e in data.get("stages") or [] if isinstance(e, dict)}
    rest = []
    for assignment in overrides:
        head, _, tail = assignment.partition(".")
        if head in entries and tail:
            apply_override(entries[head], tail)
        else:
            rest.append(assignment)
    return rest


def check_stages(profile: Profile) -> None:
    """Load-time checks of the stage list: every backend known, its params accepted by its class
    (and its constructor's own checks passed), something that cuts files into segments, and no
    stage whose output the precedence rule would always throw away."""
    enabled = profile.enabled_stages()
    if not enabled:
        raise ValueError("the profile has no enabled stages")
    segmenter = None
    for entry in enabled:
        where = entry.slot
        cls = backends.stage_class(entry.backend_kind, entry.backend)
        backends.check_params(cls, entry.params, where=where)
        try:
            cls(**entry.params)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where} ({entry.backend}): {exc}") from None
        if entry.resources:
            backends.check_resource_hints(entry.resources, where=where)
        if cls.origin not in profile.precedence and stage_groups(cls):
            raise ValueError(
                f"{where} ({entry.backend}) could never write anything: its origin {cls.origin!r} is not in "
                f"precedence {profile.precedence}")
        if segmenter is None and "id" in cls.writes:
            segmenter = entry.slot
    if segmenter is None:
        raise ValueError("no stage cuts files into segments (writes `id` and the segment bounds): add a VAD stage")
    if profile.trusted_fields() and MANIFEST not in profile.precedence:
        raise ValueError("trust_manifest is true but 'manifest' is not in precedence: manifest labels would never be kept")
