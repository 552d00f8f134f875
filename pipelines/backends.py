"""Which class implements each backend of each stage.

Choosing a backend is one profile line (`vad: {backend: silero}`); adding one is one class and
one line here. Classes are named as "module:Class" strings so that choosing the offline defaults
never imports funasr, pyannote or transformers.
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
    },
    "asr": {
        "pocketsphinx": "echat.labelers.asr:PocketsphinxASR",
        "manifest": "echat.labelers.asr:ManifestTranscript",
    },
    "gender": {
        "pitch": "echat.labelers.gender:PitchGender",
    },
    "age": {},
    "emotion": {
        "heuristic": "echat.labelers.emotion:HeuristicEmotion",
    },
    "events": {},
    "style": {},
    "metrics": {
        "acoustic": "echat.labelers.metrics:AcousticMetrics",
    },
    "reply": {
        "template": "echat.synth.template_reply:TemplateReply",
    },
    "tts": {
        "espeak": "echat.synth.espeak_tts:EspeakTTS",
    },
    "speech_tokens": {},
}

NONE = "none"  # a stage whose backend is "none" is left out of the build


class BackendError(ValueError):
    pass


def backend_path(stage: str, backend: str) -> str:
    try:
        choices = BACKENDS[stage]
    except KeyError:
        raise BackendError(f"unknown stage {stage!r}; known: {', '.join(BACKENDS)}") from None
    try:
        return choices[backend]
    except KeyError:
        known = ", ".join([*choices, NONE]) if stage not in ("decode",) else ", ".join(choices)
        raise BackendError(f"unknown backend {backend!r} for stage {stage!r}; known: {known}") from None


def load_class(path: str) -> type:
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def check_params(stage: str, backend: str, params: dict[str, Any], *, where: str) -> None:
    """Fail with a message naming the key when `params` do not fit the backend's constructor.

    Checks the signature without importing the backend's heavy dependencies: stage modules
    import those inside `setup()`.
    """
    cls = load_class(backend_path(stage, backend))
    signature = inspect.signature(cls)
    accepted = {
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    for key in params:
        if key not in accepted:
            raise BackendError(
                f"unknown key {where}.params.{key!r} for backend {backend!r}; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )


def build_stage(stage: str, backend: str, params: dict[str, Any]):
    """A configured, not yet set-up, instance of the backend class."""
    return load_class(backend_path(stage, backend))(**params)
