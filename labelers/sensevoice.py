"""ASR stage: FunASR SenseVoiceSmall, transcript + language + emotion + audio events in one pass.

SenseVoice writes its labels inline, before the text: `<|zh|><|NEUTRAL|><|Speech|><|woitn|>text`
(language, emotion, audio event, whether inverse text normalisation was applied). `parse` reads
every such tag, wherever it is and however many there are, and maps it to the record's
vocabularies (schemas/vocab.py) through the one alias table (schemas/labels.py):
  language  zh, en -> `language`; yue, ja, ko are languages the record's vocabulary does not hold:
            `language` stays empty and the record is flagged `language_unsupported:<code>`
            (nothing is invented: Cantonese is not written as "zh"); nospeech -> flagged
            `asr_no_speech`. The first language tag counts.
  emotion   HAPPY SAD ANGRY NEUTRAL FEARFUL DISGUSTED SURPRISED -> happy sad anger neutral fear
            disgust surprise (the most frequent when several; the first on a tie); EMO_UNKNOWN, or
            no emotion tag, leaves `emotion` empty with the flag `emotion_unknown`.
  events    the vocal events of the OSUM set: Laughter -> laugh, Cry -> cry, Cough -> cough,
            Sneeze -> sneeze. Speech (the speech itself), GBG and Event_UNK say nothing. The sounds
            outside the set (BGM, Applause, Breath, Sing, Speech_Noise) are not vocal events of the
            user's turn and are not turned into "other": each is kept as the flag
            `sound_event:<tag>` (`sound_event:bgm`). With event tags present `events` is the list
            found ([] when only Speech); with none at all it stays empty (unknown).
  itn       withitn / woitn: recorded in the parse, not in the record.
  other     a tag of none of these kinds: the flag `sensevoice_tag:<tag>`.
The text is what remains with the tags removed and spaces tidied; an empty text leaves
`transcript` as it was, with the flag `asr_empty` when the record had none.

Scores. funasr's `generate()` returns SenseVoice's decoded text only, not the probabilities of its
tags or tokens, so the scores are fixed values, chosen rather than measured: TRANSCRIPT_CONFIDENCE
(0.8), EMOTION_SCORE (0.7) and EVENTS_SCORE (0.7). They are below 1, so a manifest's label (1.0)
stays apart from a model's, and the same for every record, so a threshold on them (a filter's
minimum label score) keeps or drops every SenseVoice label alike.

The model comes from `model` (a local directory or a hub id; default iic/SenseVoiceSmall on
ModelScope, FunAudioLLM/SenseVoiceSmall on Hugging Face), with `hub`, `cache_dir`, `revision`,
`local_files_only`, `device` and `ncpu` as labelers/funasr_models.py describes. `language` is
SenseVoice's language hint for every record ("auto": its own language ID), `use_itn` asks for
punctuation and inverse text normalisation, `ban_emo_unk` forbids EMO_UNKNOWN. Records go to the
model `batch_size` at a time (one padded batch per call). The label groups a better source holds
(a manifest transcript, say) are kept by the stage runner's precedence rule.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from echat.schemas.labels import LabelError, normalise
from echat.schemas.stage import MODEL

from .asr import ASR_EMPTY_FLAG
from .flags import add_flag
from .funasr_models import FunASRStage, ModelSource, check_hub

BACKEND = "sensevoice"
DEFAULT_MODELS = {"ms": "iic/SenseVoiceSmall", "hf": "FunAudioLLM/SenseVoiceSmall"}
TRANSCRIPT_CONFIDENCE = 0.8
EMOTION_SCORE = 0.7
EVENTS_SCORE = 0.7

# SenseVoice's tags by kind, with the record value each stands for where the mapping is not the
# alias table's (None: says nothing about the record's label).
LANGUAGE_TAGS = ("zh", "en", "yue", "ja", "ko", "nospeech")
EMOTION_TAGS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN")
VOCAL_EVENT_TAGS = ("Laughter", "Cry", "Cough", "Sneeze")  # mapped to `events` by the alias table
SOUND_EVENT_TAGS = ("BGM", "Applause", "Breath", "Sing", "Speech_Noise")  # flagged, not events
SILENT_EVENT_TAGS = ("Speech", "GBG", "Event_UNK")  # speech itself, garbage, unknown: nothing
ITN_TAGS = {"withitn": True, "woitn": False}
KNOWN_TAGS = frozenset((*LANGUAGE_TAGS, *EMOTION_TAGS, *VOCAL_EVENT_TAGS, *SOUND_EVENT_TAGS, *SILENT_EVENT_TAGS, *ITN_TAGS))
HINT_LANGUAGES = ("auto", *LANGUAGE_TAGS)  # what `language=` may ask of the model

NO_SPEECH_FLAG = "asr_no_speech"
EMOTION_UNKNOWN_FLAG = "emotion_unknown"
UNSUPPORTED_LANGUAGE_PREFIX = "language_unsupported:"
SOUND_EVENT_PREFIX = "sound_event:"
UNKNOWN_TAG_PREFIX = "sensevoice_tag:"

_TAG = re.compile(r"<\|([^|<>]*)\|>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class SenseVoiceOutput:
    """One SenseVoice result read: the text without tags, and each tag kind mapped."""

    text: str
    language: str | None  # in schemas.vocab.LANGUAGES, or None
    language_tag: str | None  # SenseVoice's own code (zh, yue, nospeech...)
    emotion: str | None  # in schemas.vocab.EMOTIONS, or None
    emotion_tags: tuple[str, ...]
    events: tuple[str, ...] | None  # in schemas.vocab.EVENTS; None when no event tag at all
    event_tags: tuple[str, ...]
    itn: bool | None
    flags: tuple[str, ...]


def parse(output: str) -> SenseVoiceOutput:
    """Read SenseVoice's inline tags and text (see the module docstring for the mapping)."""
    output = output or ""
    tags = _TAG.findall(output)
    text = _SPACES.sub(" ", _TAG.sub(" ", output)).strip()
    flags: list[str] = []

    def flag(name: str) -> None:
        if name not in flags:
            flags.append(name)

    language_tags = [t for t in tags if t in LANGUAGE_TAGS]
    language_tag = language_tags[0] if language_tags else None
    language = None
    if language_tag == "nospeech":
        flag(NO_SPEECH_FLAG)
    elif language_tag is not None:
        try:
            language = normalise("language", language_tag)
        except LabelError:
            flag(f"{UNSUPPORTED_LANGUAGE_PREFIX}{language_tag}")

    emotion_tags = tuple(t for t in tags if t in EMOTION_TAGS)
    known = [_label("emotion", t) for t in emotion_tags if t != "EMO_UNKNOWN"]
    known = [e for e in known if e is not None]
    emotion = None
    if known:
        counts = Counter(known)
        emotion = max(dict.fromkeys(known), key=lambda e: counts[e])  # first seen wins a tie
    else:
        flag(EMOTION_UNKNOWN_FLAG)

    event_tags = tuple(t for t in tags if t in VOCAL_EVENT_TAGS + SOUND_EVENT_TAGS + SILENT_EVENT_TAGS)
    events: list[str] = []
    for tag in event_tags:
        if tag in VOCAL_EVENT_TAGS:
            event = _label("events", tag)
            if event is not None and event not in events:
                events.append(event)
        elif tag in SOUND_EVENT_TAGS:
            flag(f"{SOUND_EVENT_PREFIX}{tag.lower()}")

    itn = None
    for tag in tags:
        if tag in ITN_TAGS:
            itn = ITN_TAGS[tag]
            break

    for tag in tags:
        if tag not in KNOWN_TAGS:
            flag(f"{UNKNOWN_TAG_PREFIX}{tag}")

    return SenseVoiceOutput(
        text=text,
        language=language,
        language_tag=language_tag,
        emotion=emotion,
        emotion_tags=emotion_tags,
        events=tuple(events) if event_tags else None,
        event_tags=event_tags,
        itn=itn,
        flags=tuple(flags),
    )


def _label(field: str, tag: str) -> str | None:
    try:
        return normalise(field, tag)
    except LabelError:
        return None


class SenseVoiceASR(FunASRStage):
    name: ClassVar[str] = "asr"
    backend: ClassVar[str] = BACKEND
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate")
    # The *_origin / *_model fields are stamped by the runner from describe().
    writes: ClassVar[tuple[str, ...]] = (
        "transcript",
        "transcript_origin",
        "transcript_confidence",
        "language",
        "language_origin",
        "emotion",
        "emotion_score",
        "emotion_model",
        "events",
        "events_score",
        "events_model",
        "quality_flags",
    )
    origin: ClassVar[str] = MODEL
    # Records per generate() call: one padded batch through the encoder.
    batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: str | None = None,
        hub: str = "ms",
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
        ncpu: int = 1,
        language: str = "auto",
        use_itn: bool = True,
        ban_emo_unk: bool = False,
    ):
        hub = check_hub(hub)
        super().__init__(ModelSource(model or DEFAULT_MODELS[hub], hub, cache_dir, revision,
                                     bool(local_files_only), device, int(ncpu)))
        if language not in HINT_LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(HINT_LANGUAGES)}, got {language!r}")
        self.language = language
        self.use_itn = bool(use_itn)
        self.ban_emo_unk = bool(ban_emo_unk)

    def generate_options(self) -> dict[str, Any]:
        return {"language": self.language, "use_itn": self.use_itn, "ban_emo_unk": self.ban_emo_unk}

    def label(self, record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        parsed = parse(str(result.get("text") or ""))
        out = dict(record)
        if parsed.text:
            out["transcript"] = parsed.text
            out["transcript_confidence"] = TRANSCRIPT_CONFIDENCE
        elif not record.get("transcript"):
            add_flag(out, ASR_EMPTY_FLAG)
        if parsed.language is not None:
            out["language"] = parsed.language
        if parsed.emotion is not None:
            out["emotion"] = parsed.emotion
            out["emotion_score"] = EMOTION_SCORE
        if parsed.events is not None:
            out["events"] = list(parsed.events)
            out["events_score"] = EVENTS_SCORE
        for name in parsed.flags:
            add_flag(out, name)
        return out
