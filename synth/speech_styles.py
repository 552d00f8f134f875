"""Style instructions in words for TTS engines that take them (OpenAI-compatible speech, CosyVoice).

The table is data (synth/templates/speech_styles.yaml): one instruction per reply emotion for the
assistant's replies, and for a synthetic user turn one phrase per intended emotion joined to one
per age group ("Speak like a young child of about seven, with a high, small voice, in a sad, low
and slow voice, sounding close to tears."). Its `version` goes into every cache key, so editing a
line re-synthesises what it changes and nothing else is stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from echat.schemas import vocab


@dataclass(frozen=True)
class SpeechStyles:
    version: str
    reply_emotions: dict[str, str]
    user_emotions: dict[str, str]
    ages: dict[str, str]

    def for_reply(self, reply_emotion: str | None) -> str:
        """The instruction for a reply spoken in `reply_emotion` (NEUTRAL's when unknown)."""
        return self.reply_emotions.get((reply_emotion or "").upper(), self.reply_emotions["NEUTRAL"])

    def for_user(self, emotion: str | None, age: str | None) -> str:
        """The instruction for a user turn of this intended emotion and age group."""
        who = self.ages.get(age or "adult", self.ages["adult"])
        how = self.user_emotions.get(emotion or "neutral", self.user_emotions["neutral"])
        return f"{who}, {how}."


def load_speech_styles(path: str | Path | None = None) -> SpeechStyles:
    """The table at `path`, or the packaged synth/templates/speech_styles.yaml; ValueError naming
    what is missing or unknown."""
    if path:
        return _parse(Path(path).read_text("utf-8"), str(path))
    return _packaged()


@lru_cache(maxsize=1)
def _packaged() -> SpeechStyles:
    text = resources.files("echat.synth").joinpath("templates/speech_styles.yaml").read_text("utf-8")
    return _parse(text, "synth/templates/speech_styles.yaml")


def _parse(text: str, where: str) -> SpeechStyles:
    data = yaml.safe_load(text) or {}
    version = str(data.get("version") or "").strip()
    if not version:
        raise ValueError(f"{where}: no `version`")
    sections = {}
    for name, vocabulary in (("reply_emotions", vocab.REPLY_EMOTIONS), ("user_emotions", vocab.EMOTIONS), ("ages", vocab.AGES)):
        table = {str(k): str(v).strip() for k, v in (data.get(name) or {}).items()}
        unknown = sorted(set(table) - set(vocabulary))
        missing = [k for k in vocabulary if not table.get(k)]
        if unknown or missing:
            raise ValueError(f"{where}: {name} must give one line for each of {', '.join(vocabulary)}"
                             f"{f'; unknown: {unknown}' if unknown else ''}{f'; missing: {missing}' if missing else ''}")
        sections[name] = table
    return SpeechStyles(version=version, **sections)
