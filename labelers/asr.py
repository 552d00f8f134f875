"""ASR stages: transcripts from the manifest, or from pocketsphinx (English, offline).

`ManifestTranscript` uses no model: a segment keeps the transcript its manifest gave, and a segment
without one is rejected as `no_transcript`.

`PocketsphinxASR` transcribes segments that have no transcript yet with pocketsphinx 5 and the
US-English model shipped in its wheel (or the acoustic model, language model and dictionary given
as paths). It writes:
  transcript             the hypothesis, lower-case words, fillers (<s>, <sil>, [NOISE]...) removed
  transcript_origin      "pocketsphinx-5 en-us" (or the model paths' names when given)
  transcript_confidence  the mean posterior probability of the hypothesis words, from the decoder's
                         lattice (`bestpath`); the whole-utterance posterior is the product of the
                         word posteriors and tends to 0 for any sentence, so it says little
  words                  [{word, start, end, score}], seconds from the segment start, score being
                         the word's posterior
  language               "en", with language_origin "assumed" and the quality flag `language_assumed`,
                         when the record had none (set the profile's `language:` to say it)
Records in another language keep transcript None and get the quality flag
`no_asr_for_language:<lang>`; an empty hypothesis gets the flag `asr_empty`. The pipeline's filter
decides what to do with those.

The default language model is a general one and transcribes synthetic or noisy speech poorly
(56-80% WER measured on espeak speech: tests/test_labelers_asr.py, benchmarks/bench_labelers.py,
benchmarks/bench_label_accuracy.py): use it as a fallback, not a source of truth. Records in
languages it has no model for are not guessed at, but a record with no language at all is assumed
English (there is no offline LID).

Speed (`preset`). On raw speech with no manifest, pocketsphinx is most of the offline build's time.
Its search settings were measured on the VAD segments of English demo files (`echat demo-data`,
espeak voices with emotional prosody; transcripts known), CPU time of the decoder on one core, WER
over the files (jiwer, punctuation removed); first on 60 files (223 s), then the candidates on the
next 120 files (466 s):
  settings (pocketsphinx 5.1.1 names)                  60 files: x RT  WER   120 files: x RT  WER
  defaults (beam 1e-48, wbeam 7e-29, maxhmmpf 30000,
    pl_window 5, pl_weight 3, lw 6.5, topn 4, ds 1)                6.1  56%             6.0  58%
  fwdflat on (second pass)                                         4.2  57%
  bestpath off (no lattice rescoring)                              6.6  62%
  ds 2 (senones every other frame)                                 6.3  66%
  topn 2                                                           6.8  64%
  pl_window 0 (no phone-loop lookahead) / 10                       3.9 / 5.3  57% / 56%
  maxhmmpf 3000 / 2000 / 1000                                      9.4 / 10.8 / 14.0  58 / 63 / 70%
  beam 1e-30, pbeam 1e-30, wbeam 1e-20                            26.0  89%
  lw 10                                                           10.5  68%
  maxhmmpf 2000, maxwpf 10, pl_window 3, ds 2                     15.6  70%
  pl_weight 8                                                     12.4  59%             12.3  61%
  pl_weight 10                                                                         14.8  60%
  pl_weight 10, maxhmmpf 4000 ("fast")                                                 16.0  60%
  pl_weight 12                                                    18.1  61%            17.2  64%
  pl_weight 14                                                                         19.1  67%
The phone-loop lookahead's weight is the knob that pays: at the same speed, narrower beams or fewer
HMMs per frame cost far more WER (it prunes word candidates whose phones the next frames do not
support). So:
  "fast"      pl_weight 10 and maxhmmpf 4000 (the cap bounds the search on noise, where the active
              HMMs multiply): about 2.6x the speed of the defaults for 2-3.5 points of WER on the
              demo files;
  "accurate"  pocketsphinx's own search settings (what the stage ran before it had presets).
On all 360 English files of the 480-file corpus (428 VAD pieces, 1,379 s;
benchmarks/bench_label_accuracy.py): accurate 6.0x and 56.7%, fast 15.7x and 60.2%; the
raw-speech offline build of those files (no manifest, one core) ran at 7.2x real time with accurate
and 17.3x with fast. The cost in WER depends on the speech: on 48 plainer espeak sentences
(benchmarks/bench_labelers.py's 8 sentences read by en+f3, en+m3, en+f5, en+m7, en-us+f2, en-us+m1
at espeak's default prosody) accurate gave 5.5x and 69%, fast 15.4x and 75%, pl_weight 8 alone
11.7x and 70%. "fast" is the default because it is what brings the raw-speech offline build to 10x
real time on one core; choose "accurate" when ASR time does not matter.
`decoder_options` are applied over the preset, so any single setting can still be changed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import MODEL, Reject, Stage

from .flags import add_flag
from .vad import SPLIT_FLAG

ASR_EMPTY_FLAG = "asr_empty"
LANGUAGE_ASSUMED_FLAG = "language_assumed"
NO_ASR_FLAG_PREFIX = "no_asr_for_language:"
_ALTERNATE_PRONUNCIATION = re.compile(r"\(\d+\)$")  # "to(3)" -> "to"
# Search settings by preset (the module docstring has the measurements behind them).
PRESETS: dict[str, dict[str, Any]] = {
    "accurate": {},
    "fast": {"pl_weight": 10.0, "maxhmmpf": 4000},
}
DEFAULT_PRESET = "fast"


class ManifestTranscript(Stage):
    """Keeps the manifest's transcript; rejects segments that have none."""

    name: ClassVar[str] = "asr"
    reads: ClassVar[tuple[str, ...]] = ("transcript",)
    writes: ClassVar[tuple[str, ...]] = ()

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        transcript = record.get("transcript")
        if transcript is None or not str(transcript).strip():
            why = "transcript dropped because the file was split" if _was_split(record) else "no transcript given"
            yield self.reject(record, "no_transcript", why)
            return
        yield record

    def describe(self) -> str:
        return "manifest"


def _was_split(record: dict[str, Any]) -> bool:
    return SPLIT_FLAG in (record.get("quality_flags") or [])


class PocketsphinxASR(Stage):
    """English ASR with pocketsphinx 5; fills only records without a transcript."""

    name: ClassVar[str] = "asr"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "transcript", "language")
    # transcript_origin is stamped by the runner from describe(); language_origin is per record.
    writes: ClassVar[tuple[str, ...]] = (
        "transcript",
        "transcript_origin",
        "transcript_confidence",
        "words",
        "language",
        "language_origin",
        "quality_flags",
    )
    origin: ClassVar[str] = MODEL
    languages: ClassVar[tuple[str, ...]] = ("en",)

    def __init__(
        self,
        hmm: str | None = None,
        lm: str | None = None,
        dictionary: str | None = None,
        fwdflat: bool = False,
        decoder_options: dict[str, Any] | None = None,
        preset: str = DEFAULT_PRESET,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.preset = preset
        # hmm/lm/dictionary None: the US-English model inside the pocketsphinx wheel.
        self.hmm, self.lm, self.dictionary = hmm, lm, dictionary
        # pocketsphinx's second (flat-lexicon) search pass. Off by default: on 10 espeak sentences
        # it took the decoder from 2.3x to 4.3x real time (CPU time, one core) while WER went from
        # 82% to 75%; the lattice for the word posteriors still comes from the first pass.
        self.fwdflat = bool(fwdflat)
        # Any other pocketsphinx option by name (beam, wbeam, lw, ...), passed to its Decoder.
        self.decoder_options = dict(decoder_options or {})
        self._decoder = None
        self._frame_rate = 100

    def setup(self) -> None:
        import pocketsphinx

        options: dict[str, Any] = {
            "loglevel": "FATAL",  # its INFO log is hundreds of lines per utterance
            # Half-bit dither: on digital zeros (padding, gated silence) the undithered front end
            # yields degenerate features and the decoder hallucinates a word with posterior 1.0.
            # A fixed seed keeps transcripts reproducible. Measured: same WER on speech.
            "dither": True,
            "seed": 1,
            "fwdflat": self.fwdflat,
            **PRESETS[self.preset],
            **self.decoder_options,
        }
        for key, path in (("hmm", self.hmm), ("lm", self.lm), ("dict", self.dictionary)):
            if path is not None:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"pocketsphinx {key} not found: {path}")
                options[key] = path
        try:
            self._decoder = pocketsphinx.Decoder(**options)
        except KeyError as exc:  # pocketsphinx names an unknown option as a KeyError
            raise ValueError(f"unknown pocketsphinx option in decoder_options: {exc}") from None
        self._frame_rate = int(self._decoder.config["frate"])
        if int(self._decoder.config["samprate"]) != SAMPLE_RATE:
            raise ValueError(f"the pocketsphinx model expects {self._decoder.config['samprate']} Hz audio")

    def describe(self) -> str:
        if self.hmm is None and self.lm is None and self.dictionary is None:
            return "pocketsphinx-5 en-us"
        names = [os.path.basename(os.path.normpath(p)) for p in (self.hmm, self.lm, self.dictionary) if p]
        return "pocketsphinx-5 " + "+".join(names)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        if record.get("transcript") is not None:
            # Not a precedence rule (the runner applies that), but work avoided. The runner skips a
            # record only when every group this stage writes is held, and a manifest that gives
            # transcripts without a language leaves `language` open: decoding such a record at
            # 4x real time would only have the runner restore the manifest's transcript, while
            # guessing "en" for it (a Chinese line, say). No source the profile can rank below
            # pocketsphinx writes transcripts, so there is nothing here for it to replace.
            yield record
            return
        out = dict(record)
        language = record.get("language")
        if language is not None and language not in self.languages:
            add_flag(out, f"{NO_ASR_FLAG_PREFIX}{language}")
            yield out
            return
        if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"PocketsphinxASR expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")

        words = self.transcribe(record["_waveform"])
        if language is None:
            out["language"], out["language_origin"] = "en", "assumed"
            add_flag(out, LANGUAGE_ASSUMED_FLAG)  # no profile language and no LID: say it was a guess
        if not words:
            add_flag(out, ASR_EMPTY_FLAG)
            yield out
            return
        out["transcript"] = " ".join(w["word"] for w in words)
        out["transcript_confidence"] = float(np.mean([w["score"] for w in words]))
        out["words"] = words
        yield out

    def transcribe(self, waveform: np.ndarray) -> list[dict[str, Any]]:
        """Words of the best hypothesis for a 16 kHz mono float waveform, fillers removed."""
        if self._decoder is None:
            self.setup()
        pcm = (np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)  # whole segment at once: utterance-level CMN
        decoder.end_utt()
        if decoder.hyp() is None:
            return []
        words = []
        for seg in decoder.seg():
            if _is_filler(seg.word):
                continue
            words.append(
                {
                    "word": _ALTERNATE_PRONUNCIATION.sub("", seg.word).lower(),
                    "start": seg.start_frame / self._frame_rate,
                    "end": (seg.end_frame + 1) / self._frame_rate,  # end_frame is inclusive
                    # log-domain arithmetic lets posteriors exceed 1 by a hair
                    "score": float(min(1.0, max(0.0, seg.prob))),
                }
            )
        return words


def _is_filler(word: str) -> bool:
    # <s>, </s>, <sil> and the noise words of the noise dictionary ([NOISE], [SPEECH], ++NOISE++)
    return not word or word[0] in "<[+"
