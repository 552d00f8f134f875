"""Scoring against a reference, torch-free: what `echat eval` (model predictions) and the build's
label-accuracy table (labelers against a manifest used as reference) both measure.

Each scorer adds one (reference, prediction) pair at a time, keeps only counts, and merges with
another of its kind, so a Beam combiner can build it shard by shard. Rates are corpus-level (total
edits / total reference tokens), transcripts normalised alike for both (`normalize_transcript`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from typing import Any

from .text import CJK_OR_WORD, has_cjk

NONE_CLASS = "<none>"  # the predicted class of an answer that names no label of the vocabulary
_TAG = re.compile(r"<([^<>]*)>")
_TIMESTAMP = re.compile(r"<\s*\d+(?:\.\d+)?\s*>")
_APOSTROPHES = "'\u2019\u02bc"  # ' ’ ʼ: inside words (it's, don't), dropped without a space


def strip_tags(text: str) -> str:
    """The text without `<...>` tags (labels, timestamps, think markers): the transcript part."""
    return " ".join(_TAG.sub(" ", text).split())


def language_of(reference: str, language: str | None = None) -> str:
    """"zh" or "en": the row's own language when given, else by the script of the reference."""
    if language:
        return "zh" if language.lower().startswith("zh") else "en"
    return "zh" if has_cjk(reference) else "en"


def remove_punctuation(text: str) -> str:
    """Punctuation (Unicode category P*) becomes a space, except apostrophes, which are dropped:
    `"stop—it's 3.5"` -> `stop its 3 5` (jiwer's RemovePunctuation would join `stopits 35`)."""
    spaced = "".join(" " if unicodedata.category(ch).startswith("P") and ch not in _APOSTROPHES else ch for ch in text)
    return "".join(ch for ch in spaced if ch not in _APOSTROPHES)


def normalize_transcript(text: str, language: str) -> list[str]:
    """Scoring tokens: English words, or Chinese characters (Latin words kept whole)."""
    text = _TIMESTAMP.sub(" ", text)
    text = strip_tags(text).lower()
    text = remove_punctuation(text)
    if language == "zh":
        return CJK_OR_WORD.findall(text)  # a Chinese character, or a run of other non-space text
    return text.split()


# ----------------------------------------------------------------------------- parsing answers


class LabelAccuracy:
    """Accuracy with per-class counts and a confusion table (reference -> predicted -> n)."""

    def __init__(self, classes: tuple[str, ...]):
        self.classes = classes
        self.confusion: dict[str, Counter] = defaultdict(Counter)
        self.unscored = 0

    def add(self, reference: str | None, predicted: str | None) -> None:
        if reference is None:
            self.unscored += 1
            return
        self.confusion[reference][predicted or NONE_CLASS] += 1

    def merge(self, other: "LabelAccuracy") -> "LabelAccuracy":
        for ref, row in other.confusion.items():
            self.confusion[ref].update(row)
        self.unscored += other.unscored
        return self

    def report(self) -> dict[str, Any]:
        total = sum(sum(c.values()) for c in self.confusion.values())
        correct = sum(c[ref] for ref, c in self.confusion.items())
        predicted = Counter()
        for c in self.confusion.values():
            predicted.update(c)
        per_class = {}
        seen = set(self.confusion) | set(predicted)
        # Vocabulary order first, then classes outside it (event sets such as "cough+laugh"), then <none>.
        order = [c for c in self.classes if c in seen] + sorted(seen - set(self.classes) - {NONE_CLASS})
        for cls in order + ([NONE_CLASS] if predicted[NONE_CLASS] else []):
            support = sum(self.confusion[cls].values()) if cls in self.confusion else 0
            hits = self.confusion[cls][cls] if cls in self.confusion else 0
            per_class[cls] = {
                "support": support,
                "predicted": predicted[cls],
                "correct": hits,
                "recall": hits / support if support else None,
                "precision": hits / predicted[cls] if predicted[cls] else None,
            }
        return {
            "metric": "accuracy",
            "accuracy": correct / total if total else None,
            "scored": total,
            "correct": correct,
            "unscored_no_reference": self.unscored,
            "per_class": per_class,
            # Rows in vocabulary order, like the columns (per_class).
            "confusion": {ref: dict(self.confusion[ref]) for ref in order if ref in self.confusion},
        }


class ErrorRate:
    """Corpus-level WER (en) or CER (zh) from jiwer's alignment counts, summed pair by pair."""

    def __init__(self, language: str):
        self.language = language
        self.counts: Counter = Counter()

    def add(self, reference: str, prediction: str) -> None:
        import jiwer

        ref = " ".join(normalize_transcript(reference, self.language))
        hyp = " ".join(normalize_transcript(prediction, self.language))
        self.counts["utterances"] += 1
        self.counts["sentence_errors"] += ref != hyp
        if not ref.strip():  # jiwer refuses an empty reference: every hypothesis word is inserted
            self.counts["insertions"] += len(hyp.split())
            return
        out = jiwer.process_words(ref, hyp if hyp.strip() else "")
        for name in ("hits", "substitutions", "deletions", "insertions"):
            self.counts[name] += getattr(out, name)

    def merge(self, other: "ErrorRate") -> "ErrorRate":
        self.counts.update(other.counts)
        return self

    def report(self) -> dict[str, Any]:
        c = self.counts
        n_ref = c["hits"] + c["substitutions"] + c["deletions"]
        name = "cer" if self.language == "zh" else "wer"
        errors = c["substitutions"] + c["deletions"] + c["insertions"]
        return {
            "metric": name,
            name: errors / n_ref if n_ref else (0.0 if errors == 0 else None),
            "utterances": c["utterances"],
            "reference_tokens": n_ref,
            "substitutions": c["substitutions"],
            "deletions": c["deletions"],
            "insertions": c["insertions"],
            "hits": c["hits"],
            "sentence_error_rate": c["sentence_errors"] / c["utterances"] if c["utterances"] else None,
        }


class EventSets:
    """Set-based precision/recall/F1 over event tags (micro-averaged) and exact-match accuracy."""

    def __init__(self):
        self.tp = self.fp = self.fn = self.exact = self.n = 0
        self.per_event: dict[str, Counter] = defaultdict(Counter)

    def add(self, reference: set[str], predicted: set[str]) -> None:
        self.n += 1
        self.exact += reference == predicted
        self.tp += len(reference & predicted)
        self.fp += len(predicted - reference)
        self.fn += len(reference - predicted)
        for e in reference | predicted:
            self.per_event[e]["tp" if e in reference and e in predicted else ("fp" if e in predicted else "fn")] += 1

    def merge(self, other: "EventSets") -> "EventSets":
        for name in ("tp", "fp", "fn", "exact", "n"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for event, counts in other.per_event.items():
            self.per_event[event].update(counts)
        return self

    def report(self) -> dict[str, Any]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
        return {
            "metric": "event_sets",
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "exact_match": self.exact / self.n if self.n else None,
            "scored": self.n,
            "per_event": {e: dict(c) for e, c in sorted(self.per_event.items())},
        }
