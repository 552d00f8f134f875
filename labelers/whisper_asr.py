"""ASR stage with Whisper through transformers: transcript, language ID and word timestamps.

`WhisperForConditionalGeneration` and `WhisperProcessor` (feature extractor + tokenizer) load from a
hub id (`openai/whisper-large-v3-turbo` by default; any Whisper checkpoint) or a local folder. Each
`process_batch` call sends its records through one `generate` call per decoding language (greedy,
short-form: Whisper reads at most 30 s, the VAD's default segment bound; a longer record is
rejected as `too_long`). It writes:
  transcript             the decoded text (special and timestamp tokens dropped), stripped
  transcript_origin      `whisper:<model>` (the runner stamps it from describe())
  transcript_confidence  the mean probability of the text tokens under the model
  words                  [{word, start, end, score}], seconds from the segment start: words are
                         grouped from tokens as Whisper does (a token starting with a space starts a
                         word; punctuation joins its word; Chinese splits per character), their times
                         from the cross-attention alignment (`return_token_timestamps`, which needs
                         the checkpoint's `alignment_heads`; without them `words` stays empty and the
                         record is flagged `no_word_timestamps`), the score the mean probability of
                         the word's tokens
  language               from the decoder's language token (Whisper's language ID), mapped to the
                         record's vocabulary (schemas/labels.py); a language outside it leaves
                         `language` empty and flags `unsupported_language:<code>`, or rejects the
                         record as `unsupported_language` with `reject_unsupported_language: true`
An empty hypothesis gets the flag `asr_empty`. `language: en` (or zh) forces the decoding language;
a record that already has a language is decoded in it. A record that already has a transcript (a
manifest's) is not decoded again: when it lacks a language, only Whisper's language detection runs
on it. English-only checkpoints (`*.en`) have no language token: their records are `en`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import MODEL, BatchedStage, Reject, Result, as_result

from . import model_hub
from .asr import ASR_EMPTY_FLAG
from .flags import add_flag

DEFAULT_MODEL = "openai/whisper-large-v3-turbo"
MAX_SECONDS = 30.0  # Whisper's window; longer audio needs long-form decoding, which this stage does not do
UNSUPPORTED_FLAG_PREFIX = "unsupported_language:"
NO_WORD_TIMESTAMPS_FLAG = "no_word_timestamps"
DTYPES = ("float32", "float16", "bfloat16")
# Languages written without spaces between words: words are split per character (as Whisper does).
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~。，！？：；、“”‘’（）《》…")


class WhisperASR(BatchedStage):
    name: ClassVar[str] = "asr"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "transcript", "language")
    writes: ClassVar[tuple[str, ...]] = (
        "transcript", "transcript_origin", "transcript_confidence", "words", "language", "language_origin", "quality_flags",
    )
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        language: str | None = None,
        word_timestamps: bool = True,
        max_new_tokens: int = 224,
        reject_unsupported_language: bool = False,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
        if language is not None:
            from echat.schemas.labels import normalise

            language = normalise("language", language)  # a LabelError (a ValueError) names the allowed set
        self.model = model_hub.check_model_param(model, "whisper")
        self.cache_dir = cache_dir
        self.device = model_hub.check_device(device)
        self.dtype = dtype
        self.language = language
        self.word_timestamps = bool(word_timestamps)
        self.max_new_tokens = max_new_tokens
        self.reject_unsupported_language = bool(reject_unsupported_language)
        self._model = None
        self._processor = None

    # ------------------------------------------------------------------ model

    def setup(self) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        source, cache = model_hub.local_or_id(self.model), model_hub.hub_cache_dir(self.cache_dir)
        self._processor = WhisperProcessor.from_pretrained(source, cache_dir=cache)
        model = WhisperForConditionalGeneration.from_pretrained(source, cache_dir=cache, dtype=getattr(torch, self.dtype))
        model.to(torch.device(self.device))
        model.eval()
        self._model = model
        config = model.generation_config
        self._lang_ids = {int(i): token.strip("<|>") for token, i in (getattr(config, "lang_to_id", None) or {}).items()}
        self._multilingual = bool(self._lang_ids) and getattr(config, "is_multilingual", True) is not False
        self._has_alignment = bool(getattr(config, "alignment_heads", None))
        tokenizer = self._processor.tokenizer
        first_timestamp = tokenizer.convert_tokens_to_ids("<|0.00|>")
        if not isinstance(first_timestamp, int) or first_timestamp == tokenizer.unk_token_id:
            first_timestamp = max(tokenizer.all_special_ids) + 1
        self._timestamp_begin = first_timestamp
        self._special = set(tokenizer.all_special_ids)
        limit = int(getattr(model.config, "max_target_positions", 448))
        self._max_new = max(1, min(self.max_new_tokens, limit - 8))

    def teardown(self) -> None:
        self._model = self._processor = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = state["_processor"] = None
        return state

    def describe(self) -> str:
        return f"whisper:{model_hub.model_label(self.model)}"

    # ------------------------------------------------------------------ records

    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        if self._model is None:
            self.setup()
        results: list[Result | BaseException | None] = [None] * len(records)
        decode: dict[str | None, list[int]] = defaultdict(list)  # decoding language -> records
        detect: list[int] = []
        waves: dict[int, np.ndarray] = {}
        for i, record in enumerate(records):
            try:
                wave = _model_input(record)
            except Exception as exc:  # noqa: BLE001 - this record alone fails
                results[i] = exc
                continue
            if len(wave) / SAMPLE_RATE > MAX_SECONDS:
                results[i] = self.reject(record, "too_long", f"{len(wave) / SAMPLE_RATE:.2f} s > Whisper's {MAX_SECONDS:.0f} s window")
                continue
            waves[i] = wave
            if (record.get("transcript") or "").strip():
                if record.get("language") is None:
                    detect.append(i)
                else:
                    results[i] = [record]  # nothing to add (the runner skips most such records)
                continue
            language = self.language or (record.get("language") if record.get("language") in _known(self) else None)
            decode[language if self._multilingual else None].append(i)

        for language, idx in decode.items():
            self._run(records, idx, waves, results, lambda chunk, lang=language: self._transcribe(chunk, lang))
        if detect:
            self._run(records, detect, waves, results, self._detect)
        return results  # type: ignore[return-value]

    def _run(self, records, idx, waves, results, call) -> None:
        """`call` over the waveforms of `idx` together; if that fails, each alone (one bad record fails alone)."""
        try:
            outputs = call([waves[i] for i in idx])
        except Exception:  # noqa: BLE001
            outputs = []
            for i in idx:
                try:
                    outputs.extend(call([waves[i]]))
                except Exception as exc:  # noqa: BLE001
                    outputs.append(exc)
        for i, found in zip(idx, outputs):
            if isinstance(found, BaseException):
                results[i] = found
                continue
            try:
                results[i] = as_result(list(self._fill(records[i], found, len(waves[i]) / SAMPLE_RATE)))
            except Exception as exc:  # noqa: BLE001
                results[i] = exc

    def _fill(self, record: dict[str, Any], found: dict[str, Any], duration: float) -> Iterator[dict[str, Any] | Reject]:
        out = dict(record)
        code = found["language"]
        language = _vocabulary_language(code)
        if code is not None and language is None:
            if self.reject_unsupported_language:
                yield self.reject(record, "unsupported_language", f"Whisper identified language {code!r}, outside the corpus languages")
                return
            add_flag(out, f"{UNSUPPORTED_FLAG_PREFIX}{code}")
        if "text" not in found:  # language detection only
            if language is not None:
                out["language"] = language
            yield out
            return
        text = found["text"]
        if not text:
            add_flag(out, ASR_EMPTY_FLAG)
            yield out
            return
        if language is not None and record.get("language") is None:
            out["language"] = language
        out["transcript"] = text
        out["transcript_confidence"] = found["confidence"]
        if found["words"] is None:
            add_flag(out, NO_WORD_TIMESTAMPS_FLAG)
        else:
            out["words"] = [{**w, "start": min(w["start"], duration), "end": min(w["end"], duration)} for w in found["words"]]
        yield out

    # ------------------------------------------------------------------ the model calls

    def _features(self, waves: list[np.ndarray]):
        import torch

        inputs = self._processor.feature_extractor(
            waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        device = torch.device(self.device)
        features = inputs["input_features"].to(device=device, dtype=self._model.dtype)
        return features, inputs["attention_mask"].to(device)

    def _detect(self, waves: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        if not self._multilingual:
            return [{"language": "en"} for _ in waves]
        features, _ = self._features(waves)
        with torch.inference_mode():
            ids = self._model.detect_language(input_features=features).tolist()
        return [{"language": self._lang_ids.get(int(i))} for i in ids]

    def _transcribe(self, waves: list[np.ndarray], language: str | None) -> list[dict[str, Any]]:
        import torch

        features, mask = self._features(waves)
        timestamps = self.word_timestamps and self._has_alignment
        options: dict[str, Any] = dict(
            attention_mask=mask, max_new_tokens=self._max_new, return_dict_in_generate=True, output_scores=True,
            force_unique_generate_call=True,  # short-form: one decoder pass per batch
        )
        if self._multilingual:
            options.update(task="transcribe", language=language)
        if timestamps:
            options["return_token_timestamps"] = True
        with torch.inference_mode():
            out = self._model.generate(features, **options)
            sequences = out["sequences"]
            probs = self._model.compute_transition_scores(sequences, out["scores"], normalize_logits=True).exp()
        sequences = sequences.cpu().tolist()
        probs = probs.float().cpu().numpy()
        times = out["token_timestamps"].float().cpu().numpy() if timestamps and "token_timestamps" in out else None
        results = []
        for b, tokens in enumerate(sequences):
            first_generated = len(tokens) - probs.shape[1]
            prob_at = {k: float(probs[b, k - first_generated]) for k in range(first_generated, len(tokens))}
            code = language if language else self._language_of(tokens[:first_generated])
            text_positions = [k for k in range(first_generated, len(tokens)) if self._is_text(tokens[k])]
            text = self._processor.tokenizer.decode([tokens[k] for k in text_positions], skip_special_tokens=True).strip()
            confidence = float(np.mean([prob_at[k] for k in text_positions])) if text_positions else 0.0
            words = None
            if times is not None:
                words = self._words(tokens, text_positions, times[b], prob_at, code)
            results.append({"language": code if self._multilingual else "en", "text": text,
                            "confidence": min(1.0, max(0.0, confidence)), "words": words})
        return results

    def _is_text(self, token: int) -> bool:
        return token not in self._special and token < self._timestamp_begin

    def _language_of(self, prompt: list[int]) -> str | None:
        for token in prompt:
            if token in self._lang_ids:
                return self._lang_ids[token]
        return None

    def _words(self, tokens, positions, times, prob_at, language) -> list[dict[str, Any]]:
        """Words of the text tokens at `positions`, timed as transformers' pipeline times them
        (token k spans times[k-1] .. times[k])."""
        tokenizer = self._processor.tokenizer
        pieces: list[tuple[str, list[int]]] = []
        pending: list[int] = []
        for k in positions:  # tokens that decode to whole characters (a CJK character may take several)
            pending.append(k)
            text = tokenizer.decode([tokens[j] for j in pending])
            if "\ufffd" not in text:
                pieces.append((text, pending))
                pending = []
        if pending:
            pieces.append((tokenizer.decode([tokens[j] for j in pending]), pending))
        no_space = language in _NO_SPACE_LANGUAGES
        groups: list[tuple[str, list[int]]] = []
        for text, ks in pieces:
            stripped = text.strip()
            joins = groups and (
                (stripped and all(c in _PUNCTUATION for c in stripped))
                or (not no_space and not text.startswith(" "))
            )
            if joins:
                groups[-1] = (groups[-1][0] + text, groups[-1][1] + ks)
            else:
                groups.append((text, list(ks)))
        words = []
        for text, ks in groups:
            word = text.strip()
            if not word:
                continue
            start = float(times[ks[0] - 1]) if ks[0] > 0 else 0.0
            end = max(start, float(times[ks[-1]]))
            words.append({"word": word, "start": round(start, 3), "end": round(end, 3),
                          "score": float(np.mean([prob_at[k] for k in ks]))})
        return words


def _known(stage: WhisperASR) -> tuple[str, ...]:
    from echat.schemas.vocab import LANGUAGES

    return LANGUAGES if stage._multilingual else ()


def _vocabulary_language(code: str | None) -> str | None:
    """Whisper's language code in the record's vocabulary (schemas/labels.py), or None."""
    if code is None:
        return None
    from echat.schemas.labels import LabelError, normalise

    try:
        return normalise("language", code)
    except LabelError:
        return None


def _model_input(record: dict[str, Any]) -> np.ndarray:
    if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"WhisperASR expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
    waveform = np.asarray(record["_waveform"], dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"WhisperASR expects a mono waveform, got shape {waveform.shape}")
    return waveform
