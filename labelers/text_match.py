"""Finding keywords and phrases in transcripts, and telling Chinese text from other text.

One place for what the emotion labeler (labelers/emotion.py), the acoustic metrics (speaking rate
counts CJK characters) and the reply templates (synth/template_reply.py) each need, so that they
agree on how a phrase is matched. What a Chinese character is (`CJK_CHAR`, `has_cjk`,
`count_cjk`) is defined in schemas/text.py, for the model's use too. The synth stages import from
here; nothing in labelers/ imports synth/.

Matching rules:
  - the text is lower-cased; a match's `start`/`end` index `text.lower()`;
  - Chinese ("zh"): a phrase matches as a substring (Chinese is written without spaces);
  - any other language: a phrase matches as whole words, optionally with a common inflection
    (exam -> exams, fail -> failed, cry -> crying) when `inflections` is on;
  - longest phrase first, and a stretch of text is matched once: "不开心" listed as a phrase is not
    also "开心", "讨厌死了" is not also "讨厌", "not happy" is not also "happy".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache


MASK_CHAR = "|"  # what a matched stretch is replaced with: not a word character, not CJK
_INFLECTIONS = r"(?:s|es|ed|d|ing)?"


@dataclass(frozen=True)
class PhraseMatch:
    phrase: str
    start: int  # index into text.lower()
    end: int


@lru_cache(maxsize=4096)
def phrase_pattern(phrase: str, language: str, inflections: bool = True) -> re.Pattern[str]:
    """The regex that finds `phrase` (already lower case) in lower-cased text of `language`."""
    if language == "zh":
        return re.compile(re.escape(phrase))
    suffix = _INFLECTIONS if inflections else ""
    return re.compile(r"(?<![\w'])" + re.escape(phrase) + suffix + r"(?![\w'])")


def find_phrases(text: str, phrases: Iterable[str], language: str, *, inflections: bool = True) -> list[PhraseMatch]:
    """Every occurrence of `phrases` in `text`, longest phrase first, no two overlapping; in text order."""
    remaining = (text or "").lower()
    found: list[PhraseMatch] = []
    for phrase in sorted({p.lower() for p in phrases if p}, key=len, reverse=True):
        pattern = phrase_pattern(phrase, language, inflections)
        spans = [m.span() for m in pattern.finditer(remaining)]
        for start, end in spans:
            found.append(PhraseMatch(phrase, start, end))
        if spans:
            remaining = mask(remaining, spans)
    return sorted(found, key=lambda m: m.start)


def mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """`text` with each (start, end) stretch replaced by as many MASK_CHARs (positions are kept)."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = MASK_CHAR * (end - start)
    return "".join(chars)


def count_phrases(text: str, phrases: Iterable[str], language: str, *, inflections: bool = True) -> dict[str, int]:
    """Occurrences of each phrase (lower case), longest first, each stretch of text counted once."""
    return dict(Counter(m.phrase for m in find_phrases(text, phrases, language, inflections=inflections)))
