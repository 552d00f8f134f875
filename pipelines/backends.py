"""Which class implements each backend of each kind of stage.

Choosing a backend is one profile line (`- {slot: vad, backend: silero}`); adding one is one class
and one line here. A profile may also name any class directly as "package.module:Class" (a stage of
your own). Classes are named as "module:Class" strings so that choosing the offline defaults never
imports funasr, pyannote or transformers: stage modules import those inside `setup()`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

BACKENDS: dict[str, dict[str, str]] = {
    "decode": {
        "soundfile": "echat.labelers.decode:DecodeAudio",
    },
    "vad": {
        "silero": "echat.labelers.vad:SileroVAD",
        "fsmn-vad": "echat.labelers.funasr_vad:FsmnVAD",
        "pyannote": "echat.labelers.pyannote_vad:PyannoteVAD",
        "webrtc": "echat.labelers.webrtc_vad:WebrtcVAD",
    },
    "diarize": {
        "pyannote": "echat.labelers.diarize:PyannoteDiarization",
    },
    "asr": {
        "pocketsphinx": "echat.labelers.asr:PocketsphinxASR",
        "manifest": "echat.labelers.asr:ManifestTranscript",
        "sensevoice": "echat.labelers.sensevoice:SenseVoiceASR",
        "paraformer": "echat.labelers.paraformer:ParaformerASR",
        "whisper": "echat.labelers.whisper_asr:WhisperASR",
    },
    "gender": {
        "pitch": "echat.labelers.gender:PitchGender",
    },
    "age": {
        "pitch": "echat.labelers.age:PitchAge",
    },
    "age_gender": {
        "wav2vec2-age-gender": "echat.labelers.age_gender:Wav2Vec2AgeGender",
    },
    "emotion": {
        "heuristic": "echat.labelers.emotion:HeuristicEmotion",
        "emotion2vec": "echat.labelers.emotion2vec:Emotion2vecEmotion",
    },
    "events": {
        "heuristic": "echat.labelers.events:HeuristicEvents",
    },
    "style": {
        "keywords": "echat.labelers.style:KeywordStyle",
        "openai": "echat.labelers.style:OpenAIStyle",
    },
    "metrics": {
        "acoustic": "echat.labelers.metrics:AcousticMetrics",
    },
    "filter": {
        "quality": "echat.labelers.filters:QualityFilter",
    },
    "reply": {
        "template": "echat.synth.template_reply:TemplateReply",
        "openai": "echat.synth.llm_reply:OpenAIReply",
    },
    "tts": {
        "espeak": "echat.synth.espeak_tts:EspeakTTS",
        "openai": "echat.synth.openai_tts:OpenAISpeechTTS",
        "cosyvoice": "echat.synth.cosyvoice_tts:CosyVoiceTTS",
    },
    "reply_check": {
        "asr": "echat.synth.reply_check:ReplyBackCheck",
    },
    "speech_tokens": {
        "cosyvoice-onnx": "echat.synth.speech_tokens:CosyVoiceSpeechTokens",
    },
}

NONE = "none"  # a slot whose backend is "none" is left out of the build


class BackendError(ValueError):
    pass


def backend_path(kind: str, backend: str) -> str:
    """The "module:Class" of a backend: a name from the table for `kind`, or a class path."""
    if ":" in backend:
        return backend
    choices = BACKENDS.get(kind)
    if choices is None:
        raise BackendError(
            f"no backend table for stage kind {kind!r} (known kinds: {', '.join(BACKENDS)}); "
            "set `kind:` on the entry, or name a class as backend: package.module:Class")
    try:
        return choices[backend]
    except KeyError:
        raise BackendError(f"unknown backend {backend!r} for {kind!r}; known: {', '.join([*choices, NONE])}") from None


def load_class(path: str) -> type:
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"cannot load backend class {path!r}: {exc}") from None
    from echat.schemas.stage import Stage

    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise BackendError(f"backend class {path!r} is not an echat.schemas.stage.Stage")
    return cls


def stage_class(kind: str, backend: str) -> type:
    return load_class(backend_path(kind, backend))


def check_params(cls: type, params: dict[str, Any], *, where: str) -> None:
    """Fail with a message naming the key when `params` do not fit the backend's constructor."""
    signature = inspect.signature(cls)
    accepted = {
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    for key in params:
        if key not in accepted:
            raise BackendError(
                f"unknown key '{where}.params.{key}' for backend {cls.__name__}; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )


def check_resource_hints(hints: dict[str, Any], *, where: str) -> None:
    """Beam's own parser of resource hints, so an unknown hint or a bad value is named at load."""
    import apache_beam as beam

    try:
        beam.Map(lambda x: x).with_resource_hints(**hints)
    except (ValueError, TypeError, KeyError) as exc:
        raise BackendError(f"{where}.resources: {exc}") from None


def build_stage(kind: str, backend: str, params: dict[str, Any]):
    """A configured, not yet set-up, instance of the backend class."""
    return stage_class(kind, backend)(**params)
