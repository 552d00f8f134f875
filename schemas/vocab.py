"""Label vocabularies and task tags of the OSUM / OSUM-EChat conventions (DESIGN.md)."""

EMOTIONS = ("sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other")
AGES = ("child", "adult", "old")
GENDERS = ("male", "female")
EVENTS = ("laugh", "cough", "cry", "screaming", "sigh", "throat_clearing", "sneeze", "other")
STYLES = (
    "news/science",
    "horror story",
    "fairy tale",
    "customer service",
    "poetry/prose",
    "audiobook",
    "daily conversation",
    "other",
)
REPLY_EMOTIONS = (
    "ANGER", "FEAR", "HAPPY", "SURPRISE", "SAD", "DISGUST", "CONFUSED", "SARCASM",
    "EMBARRASSED", "CURIOUS", "WORRIED", "SHY", "SORRY", "NEUTRAL",
)
LANGUAGES = ("en", "zh")

# A label that is unknown is written as this placeholder in the tag-form reasoning; the
# model package masks it from the loss.
UNKNOWN_PLACEHOLDER = "<&&>"

# OSUM task tags. Each maps to paraphrased instructions kept as data (model/instructions/).
TASK_TAGS = (
    "<TRANSCRIBE>",
    "<TRANSCRIBE> <ALIGN>",
    "<CAPTION>",
    "<EMOTION>",
    "<STYLE>",
    "<GENDER>",
    "<AGE>",
    "<TRANSCRIBE> <AGE> <GENDER>",
    "<TRANSCRIBE> <EMOTION>",
    "<S2TCHAT>",
    "<S2TCHAT> <THINK>",
    "<S2TCHAT> <TEXT2TOKEN>",
    "<S2TCHAT> <TEXT2TOKEN> <THINK>",
    "<TEXT2TOKEN>",
    "<TEXT2TEXT>",
    "<HISTORY>",
)

# Tag a corpus record carries when it is an empathetic speech-to-speech dialogue with reasoning.
DEFAULT_RECORD_TASK = "<S2TCHAT> <TEXT2TOKEN> <THINK>"


def osum_label(value: str | None) -> str:
    """The OSUM raw-list form of a label: upper case in angle brackets (`<ADULT>`), or `<&&>`."""
    return f"<{value.upper()}>" if value else UNKNOWN_PLACEHOLDER
