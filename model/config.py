"""Model configs: YAML files validated into `ModelConfig`; an unknown key is an error naming it.

A config names the pretrained parts by hub id or local path (`name_or_path`, used when weights
load) and also spells out their architecture (`architecture`, the fields of the transformers
config class), so the model can be built with no weights and no network: on the `meta` device to
count parameters, or randomly initialised for the tiny config. When weights load, the checkpoint's
own config must agree with every field given here.

Bundled configs live in `model/configs/` (`osum`, `osum-echat`, `tiny`); `load_config` takes one of
those names or a path. Validation imports transformers (to know its config fields); building and loading live in osum.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from echat.settings import resolve_named_yaml, validation_problems
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Parameter groups, the unit of per-stage training rules and of `echat model-info`.
GROUPS: tuple[str, ...] = (
    "encoder",  # Whisper encoder
    "adapter",  # conv subsampling + transformer blocks + projection to the LLM width
    "speech_bounds",  # learned speech begin/end vectors around the speech frames
    "llm",  # the causal LM's own weights (embeddings, layers, head), LoRA excluded
    "lora",  # LoRA matrices (configs with llm.lora)
    "speech_embed",  # speech-token embedding: 4096 codes + the start/end marker
    "speech_head",  # speech-token head: 4096 codes + end
)
STAGES: tuple[str, ...] = ("understanding", "generation", "empathy")
DTYPES = ("float32", "bfloat16", "float16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderConfig(_Strict):
    """Whisper encoder. `architecture`: transformers WhisperConfig fields (encoder side)."""

    name_or_path: str | None = None  # hub id or local path of a Whisper checkpoint; None: random init
    architecture: dict[str, Any]

    @field_validator("architecture")
    @classmethod
    def _known_whisper_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_fields(value, "whisper", "encoder.architecture")
        for required in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"):
            if required not in value:
                raise ValueError(f"encoder.architecture needs {required!r}")
        return value


class AdapterConfig(_Strict):
    """OSUM's adapter: Conv1d stack (causal, left-padded) -> transformer blocks -> Linear to the LLM width."""

    conv_kernel: int = 3
    conv_strides: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 4
    attention_heads: int = 4
    ffn_dim: int = 2560
    dropout: float = 0.1
    attention_dropout: float = 0.0

    @field_validator("conv_strides")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(s < 1 for s in value):
            raise ValueError("adapter.conv_strides must be a non-empty list of positive ints")
        return value


class LoraSettings(_Strict):
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    # Train the embedding and LM-head rows of the tokenizer's special tokens (model/tokenizer.py
    # SPECIAL_TOKENS) next to LoRA (peft's trainable tokens, group `lora`): without them the frozen
    # LLM can neither read nor emit the tokens it never saw in pretraining (<think end>, task tags).
    trainable_tokens: bool = True


class LLMConfig(_Strict):
    """The causal LM. `architecture`: transformers config fields, with `model_type` (e.g. qwen2)."""

    name_or_path: str | None = None
    architecture: dict[str, Any]
    lora: LoraSettings | None = None  # None: full fine-tuning

    @field_validator("architecture")
    @classmethod
    def _known_llm_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        model_type = value.get("model_type")
        if not model_type:
            raise ValueError("llm.architecture needs 'model_type' (e.g. qwen2)")
        _check_fields(value, model_type, "llm.architecture")
        for required in ("hidden_size", "vocab_size"):
            if required not in value:
                raise ValueError(f"llm.architecture needs {required!r}")
        return value


class StreamingLayout(_Strict):
    """OSUM-EChat's streaming reply: blocks of `text_tokens` reply tokens, then `speech_tokens`
    speech ids, alternating (model/batch.py `interleave_reply` has the rule)."""

    text_tokens: int = 6
    speech_tokens: int = 18

    @field_validator("text_tokens", "speech_tokens")
    @classmethod
    def _positive_block(cls, value: int) -> int:
        if value < 1:
            raise ValueError("speech_output.streaming block sizes must be at least 1")
        return value


class SpeechOutputConfig(_Strict):
    """Speech-token output (OSUM-EChat): CosyVoice codes 0..codebook_size-1, marker id = codebook_size.

    joint_softmax: score the targets of a sample with speech targets by one softmax over
    [text vocabulary ; speech ids] (OSUM-EChat's training loss); False: the LLM head's softmax
    for text targets and the speech head's for speech targets. streaming: lay out a reply that
    has both text and speech as interleaved blocks (None: all the text, then all the speech).
    """

    codebook_size: int = 4096
    joint_softmax: bool = False
    streaming: StreamingLayout | None = None


class TokenizerConfig(_Strict):
    name_or_path: str | None = None  # "tiny": the bundled tokenizer; None: the LLM's name_or_path


class CheckpointConfig(_Strict):
    """A whole-model checkpoint laid over the built model when weights load."""

    # A local file, or a Hugging Face Hub file: "hf://owner/repo/file.pt" (or "owner/repo/file.pt"
    # when no local folder "owner" exists; osum.resolve_checkpoint_file).
    path: str
    format: Literal["wenet", "native"] = "wenet"  # wenet: OSUM's released names (model/wenet_keys.py)


class ModelConfig(_Strict):
    name: str
    description: str = ""
    encoder: EncoderConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    llm: LLMConfig
    speech_output: SpeechOutputConfig | None = None
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    checkpoint: CheckpointConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # How training samples and prompts are laid out and which tokens the tokenizer adds
    # (model/prompts.py PROFILES): "echat" ours, "osum" OSUM-EChat's own, for fine-tuning a
    # released checkpoint on what it was trained with.
    prompt_profile: str = "echat"
    # stage -> parameter groups that train in it (set_trainable); every other parameter is frozen
    stages: dict[str, tuple[str, ...]]

    @field_validator("prompt_profile")
    @classmethod
    def _known_prompt_profile(cls, value: str) -> str:
        from echat.model.prompts import check_profile  # torch-free; the names live with the layouts

        return check_profile(value)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for stage, groups in value.items():
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r} in stages; known: {', '.join(STAGES)}")
            for g in groups:
                if g not in GROUPS:
                    raise ValueError(f"unknown parameter group {g!r} in stages.{stage}; known: {', '.join(GROUPS)}")
        missing = [s for s in STAGES if s not in value]
        if missing:
            raise ValueError(f"stages lacks {', '.join(missing)}")
        return value

    @model_validator(mode="after")
    def _groups_exist(self) -> "ModelConfig":
        absent = set()
        if self.llm.lora is None:
            absent.add("lora")
        if self.speech_output is None:
            absent |= {"speech_embed", "speech_head"}
        for stage, groups in self.stages.items():
            bad = [g for g in groups if g in absent]
            if bad:
                raise ValueError(f"stages.{stage} names {', '.join(bad)}, which this config does not have")
        return self

    # ------------------------------------------------------------ derived values

    @property
    def encoder_width(self) -> int:
        return int(self.encoder.architecture["d_model"])

    @property
    def llm_width(self) -> int:
        return int(self.llm.architecture["hidden_size"])

    def llm_vocab_size(self) -> int | None:
        return int(self.llm.architecture["vocab_size"])

    def tokenizer_source(self) -> str:
        source = self.tokenizer.name_or_path or self.llm.name_or_path
        if source is None:
            raise ValueError(f"config {self.name!r} names no tokenizer (tokenizer.name_or_path or llm.name_or_path)")
        return source

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class ModelConfigError(ValueError):
    """A model config that cannot be used; the message names the file and the key."""


def _check_fields(value: dict[str, Any], model_type: str, where: str) -> None:
    """Reject keys the transformers config class does not know (it would silently keep them)."""
    known = _known_config_fields(model_type)
    unknown = sorted(k for k in value if k not in known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where} (not fields of the {model_type} config)")


_FIELDS_CACHE: dict[str, frozenset[str]] = {}


def _known_config_fields(model_type: str) -> frozenset[str]:
    if model_type not in _FIELDS_CACHE:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.for_model(model_type)
        except ValueError as exc:
            raise ValueError(f"unknown model_type {model_type!r}: {exc}") from None
        _FIELDS_CACHE[model_type] = frozenset(cfg.to_dict()) | {"model_type"}
    return _FIELDS_CACHE[model_type]


def resolve_config_path(name_or_path: str | Path) -> Path:
    try:
        return resolve_named_yaml(str(name_or_path), CONFIG_DIR, "model config")
    except LookupError as exc:
        raise ModelConfigError(str(exc)) from None


def load_config(name_or_path: str | Path | ModelConfig) -> ModelConfig:
    """A bundled config name (`osum`, `osum-echat`, `tiny`), a YAML path, or a ModelConfig as is."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(data, source=str(path))


def config_from_dict(data: Any, source: str = "<dict>") -> ModelConfig:
    if not isinstance(data, dict):
        raise ModelConfigError(f"{source}: a model config is a mapping, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelConfigError(f"{source}: " + "; ".join(validation_problems(exc))) from None

