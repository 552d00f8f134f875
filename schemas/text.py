"""What a Chinese character is, once for every folder (labelers, synth, model, validation).

CJK Unified Ideographs, Extension A, and the Compatibility Ideographs (U+F900-FAFF: variants of
common characters that some input methods and OCR produce).
"""

from __future__ import annotations

import re

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # for a character class: f"[{CJK_RANGES}]"
CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
# One Chinese character, or a run of anything else that is neither a space nor a Chinese character.
CJK_OR_WORD = re.compile(f"[{CJK_RANGES}]|[^\\s{CJK_RANGES}]+")


def has_cjk(text: str | None) -> bool:
    """True when `text` holds at least one Chinese character."""
    return bool(CJK_CHAR.search(text or ""))


def count_cjk(text: str | None) -> int:
    """How many Chinese characters `text` holds."""
    return len(CJK_CHAR.findall(text or ""))
