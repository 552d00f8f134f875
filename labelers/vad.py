"""VAD stage: cut a decoded file into speech segments with silero-vad.

One input record (a whole file) becomes one record per speech segment:
  1. silero-vad finds speech spans (`threshold`; pauses shorter than `min_silence_s` do not end
     speech; blips shorter than `min_speech_s` are ignored; spans longer than the segment budget are
     cut by silero itself at its longest pause near the limit).
  2. Neighbouring spans closer than `merge_gap_s` are merged, as long as the result still fits in
     `max_segment_s` with its padding.
  3. A turn longer than `max_turn_s` (default 15 s, from its first to its last speech, before
     padding) is cut at its longest internal pause, and each side again until every piece fits or
     has no pause left: a conversation read with short pauses between its turns does not become one
     long "user turn". Speech with no pause that silero reports (pauses shorter than
     `min_silence_s` do not end a span) is left to step 4. `max_turn_s: null` turns this off.
  4. A span still too long for `max_segment_s` (continuous speech) is split at its quietest 10 ms
     frame.
  5. Each segment is padded by `pad_s` on both sides, never past the file or half-way into the gap
     to its neighbour, so segments never overlap.
  6. Segments shorter than `min_segment_s` leave as rejects `segment_too_short` (nothing vanishes).
A file with no speech at all is rejected as `no_speech`.

Each segment record carries `segment_start`/`segment_end` (seconds in the source), `duration`,
`id` (from source_uri and the bounds), its slice of the waveform as `_waveform` (a view: no copy),
and `_speech_spans`: the speech intervals inside the segment, in seconds from its start.

A transcript on the input (from a manifest) belongs to the whole file. With
`keep_transcribed_whole` (the default) such a file is not cut at its pauses when all its speech
fits in one segment, so the transcript stays aligned with the audio; the turn bound of step 3 does
not apply to it either (the manifest says the file is one utterance, and cutting it would trade a
given transcript for an ASR guess), so a transcribed file of up to `max_segment_s` stays whole
(every demo corpus file is far shorter than 15 s, so none is cut either way). It is kept when the file
yields exactly one segment (counting the too-short ones); when the file is split it is cleared on
every piece, with `words`, `transcript_origin` and `transcript_confidence`, and the piece gets the
quality flag `manifest_transcript_dropped_split` so that ASR fills it.

How silero runs (`process_batch`). The model reads 512-sample frames (32 ms), each with the 64
samples before it, through a convolutional encoder and then one LSTM step per frame. Called frame
by frame, as silero's `get_speech_timestamps` calls it, it spends most of its time in per-call
overhead. Here the encoder runs over the frames of all the records of a batch at once (in windows
of `JIT_WINDOW_FRAMES` frames per record, which bounds its memory), and the LSTM steps over the
records together, sorted longest first so that a record that has ended simply leaves the batch
(nothing is padded). The probabilities then go through silero's own post-processing
(`get_speech_timestamps_from_probs`: threshold / neg_threshold hysteresis, min_speech, min_silence,
max_speech cuts; no padding), record by record. A record that cannot be read fails alone. `runtime`:
  "jit"   the TorchScript model of the silero-vad wheel, driven as just described (the default);
          setup() checks it against silero's own frame-by-frame call on a test signal;
  "onnx"  the wheel's "sequence" ONNX export (encoder and LSTM over up to 512 frames per call),
          record by record; needs onnxruntime.
Measured with benchmarks/bench_labelers.py on the 240-file demo corpus (1,271 s, files of 2.8-11.8
s), one thread, whole stage: silero's get_speech_timestamps per file (the path before, still
`speech_spans`) 192x real time; jit batch 8 1,130x, 16 1,240x, 32 1,330x; onnx 780x (the per-frame
ONNX model batched over records, tried too, reached 570x at batch 8 and 720x at 32). Every segment
bound equal to the sample with both runtimes; probabilities within 1e-5 of silero's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE, record_id
from echat.schemas.stage import BatchedStage, Reject, Result, as_result

from .flags import add_flag

TRANSCRIPT_FIELDS = ("transcript", "transcript_origin", "transcript_confidence", "words")
SPLIT_FLAG = "manifest_transcript_dropped_split"
ENERGY_FRAME_S = 0.01  # frame of the energy curve used to find the quietest split point
MAX_TURN_S = 15.0  # a turn longer than this is cut at its longest pause (step 3 of the docstring)
Span = tuple[float, float]

RUNTIMES = ("jit", "onnx")
FRAME = 512  # samples per silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples before each frame that the model reads with it
# Frames per record in one encoder call of the jit runtime (4.1 s): windows of 64-128 frames ran
# 15-30% faster than 256-512 on the demo corpus (their features stay in cache); and per call of the
# onnx runtime (16.4 s), where the per-call cost matters more.
JIT_WINDOW_FRAMES = 128
ONNX_WINDOW_FRAMES = 512
ONNX_SEQUENCE_FILE = "silero_vad_16k_sequence.onnx"


class SileroVAD(BatchedStage):
    name: ClassVar[str] = "vad"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "source_uri", "segment_start", "transcript")
    writes: ClassVar[tuple[str, ...]] = (
        "id",
        "segment_start",
        "segment_end",
        "duration",
        "_waveform",
        "_speech_spans",
        "_f0",  # the input's F0 (of the whole file) does not hold for a segment: dropped
        "quality_flags",
    )
    # A split file's manifest transcript belongs to no single piece: VAD empties it (never fills it).
    clears: ClassVar[tuple[str, ...]] = ("transcript",)
    splits: ClassVar[bool] = True
    # Records per model call (runtime jit; onnx goes record by record). Measured on the demo corpus,
    # one thread: 8 -> 1,130x real time, 16 -> 1,240x, 32 -> 1,330x. 16 takes most of the gain with
    # half the records held per call (and fewer, larger batches to share between workers); its
    # model memory was about 80 MB above the loaded model, 120 MB at 32.
    batch_size: ClassVar[int] = 16

    def __init__(
        self,
        threshold: float = 0.5,
        min_silence_s: float = 0.3,
        merge_gap_s: float = 0.8,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.15,
        min_speech_s: float = 0.25,
        keep_transcribed_whole: bool = True,
        runtime: str = "jit",
        max_turn_s: float | None = MAX_TURN_S,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if min(min_silence_s, merge_gap_s, min_segment_s, pad_s, min_speech_s) < 0:
            raise ValueError("durations must not be negative")
        if max_segment_s <= 2 * pad_s + 0.5:
            raise ValueError(f"max_segment_s ({max_segment_s}) leaves too little room after padding (pad_s={pad_s})")
        if min_segment_s > max_segment_s:
            raise ValueError(f"min_segment_s ({min_segment_s}) exceeds max_segment_s ({max_segment_s})")
        if max_turn_s is not None and max_turn_s <= 0:
            raise ValueError(f"max_turn_s must be positive (or null to turn the turn bound off), got {max_turn_s}")
        self.max_turn_s = None if max_turn_s is None else float(max_turn_s)
        self.threshold = float(threshold)
        self.min_silence_s = float(min_silence_s)
        self.merge_gap_s = float(merge_gap_s)
        self.min_segment_s = float(min_segment_s)
        self.max_segment_s = float(max_segment_s)
        self.pad_s = float(pad_s)
        self.min_speech_s = float(min_speech_s)
        self.keep_transcribed_whole = bool(keep_transcribed_whole)
        self.runtime = runtime
        self._model = None  # silero's TorchScript model (runtime jit, and the per-file path)
        self._session = None  # onnxruntime session of the sequence export (runtime onnx)

    def setup(self) -> None:
        import torch

        # Workers run in parallel processes; one thread each keeps them from fighting over cores.
        torch.set_num_threads(1)
        self._model = _load_jit()
        if self.runtime == "jit":
            _check_jit_parts(self._model)
        else:
            self._session = _load_onnx_sequence()

    def describe(self) -> str:
        return "silero-vad"

    def _timestamp_options(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "sampling_rate": SAMPLE_RATE,
            "min_speech_duration_ms": int(self.min_speech_s * 1000),
            "max_speech_duration_s": self.max_segment_s - 2 * self.pad_s,
            "min_silence_duration_ms": int(self.min_silence_s * 1000),
            "speech_pad_ms": 0,  # padding is ours (step 4), so that it respects neighbours and bounds
        }

    def speech_spans(self, waveform: np.ndarray) -> list[Span]:
        """Silero's speech spans in seconds, before merging and padding, from silero's own
        `get_speech_timestamps` on this one file (frame by frame): the reference that
        `speech_spans_batch` reproduces, kept for tests and benchmarks."""
        import torch
        from silero_vad import get_speech_timestamps

        if self._model is None:
            self.setup()
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), self._model, **self._timestamp_options()
        )
        return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]

    def speech_probs_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Silero's speech probability of every 512-sample frame of each waveform (16 kHz mono)."""
        if self._model is None or (self.runtime == "onnx" and self._session is None):
            self.setup()
        if self.runtime == "onnx":
            return [_onnx_probs(self._session, w) for w in waveforms]
        return _jit_probs(self._model, waveforms)

    def speech_spans_batch(self, waveforms: list[np.ndarray]) -> list[list[Span]]:
        """`speech_spans` of several waveforms, computed together (see the module docstring)."""
        from silero_vad import get_speech_timestamps_from_probs

        options = self._timestamp_options()
        spans = []
        for waveform, probs in zip(waveforms, self.speech_probs_batch(waveforms)):
            stamps = get_speech_timestamps_from_probs(probs.tolist(), audio_length_samples=len(waveform), **options)
            spans.append([(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps])
        return spans

    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        results: list[Result | BaseException | None] = [None] * len(records)
        todo, waveforms = [], []
        for i, record in enumerate(records):
            try:
                waveforms.append(_model_input(record))
                todo.append(i)
            except Exception as exc:  # noqa: BLE001 - this record alone fails
                results[i] = exc
        try:
            spans: list[list[Span] | BaseException] = list(self.speech_spans_batch(waveforms))
        except Exception:  # noqa: BLE001 - find the record that broke the batch: each alone
            spans = []
            for waveform in waveforms:
                try:
                    spans.extend(self.speech_spans_batch([waveform]))
                except Exception as exc:  # noqa: BLE001
                    spans.append(exc)
        for i, found in zip(todo, spans):
            if isinstance(found, BaseException):
                results[i] = found
                continue
            try:
                results[i] = as_result(list(self._segments(records[i], found)))
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        return results  # type: ignore[return-value]

    def _segments(self, record: dict[str, Any], spans: list[Span]) -> Iterator[dict[str, Any] | Reject]:
        """The outputs of one input record, given silero's speech spans in it."""
        waveform = record["_waveform"]
        total = len(waveform) / SAMPLE_RATE
        if not spans:
            yield self.reject(record, "no_speech", f"no speech above threshold {self.threshold} in {total:.2f} s")
            return

        merge_gap_s, max_turn_s = self.merge_gap_s, getattr(self, "max_turn_s", MAX_TURN_S)
        if self.keep_transcribed_whole and (record.get("transcript") or "").strip():
            merge_gap_s = float("inf")  # merge every pause, as long as the result fits a segment
            max_turn_s = None  # and keep the manifest's one utterance whole (module docstring)
        segments = plan_segments(
            spans,
            total,
            waveform=waveform,
            merge_gap_s=merge_gap_s,
            max_segment_s=self.max_segment_s,
            pad_s=self.pad_s,
            max_turn_s=max_turn_s,
        )
        split = len(segments) > 1
        uri = str(record.get("source_uri", ""))
        offset = float(record.get("segment_start") or 0.0)  # the input may itself be a segment
        base = {k: v for k, v in record.items() if k not in ("_waveform", "_f0", "_speech_spans")}

        for start, end in segments:
            i0, i1 = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
            seg_start, seg_end = offset + i0 / SAMPLE_RATE, offset + i1 / SAMPLE_RATE
            bounds = {
                "segment_start": seg_start,
                "segment_end": seg_end,
                "duration": (i1 - i0) / SAMPLE_RATE,
                "id": record_id(uri, seg_start, seg_end),
            }
            if bounds["duration"] < self.min_segment_s:
                detail = f"{bounds['duration']:.2f} s < min_segment_s {self.min_segment_s:.2f} s"
                yield self.reject({**base, **bounds}, "segment_too_short", detail)
                continue
            out = dict(base)
            out.update(bounds)
            out["_waveform"] = waveform[i0:i1]
            out["_speech_spans"] = spans_within(spans, i0 / SAMPLE_RATE, i1 / SAMPLE_RATE)
            if split and out.get("transcript") is not None:
                for name in TRANSCRIPT_FIELDS:
                    if name in out:
                        out[name] = None
                add_flag(out, SPLIT_FLAG)
            yield out


def plan_segments(
    spans: list[Span],
    total_s: float,
    *,
    waveform: np.ndarray | None = None,
    merge_gap_s: float,
    max_segment_s: float,
    pad_s: float,
    max_turn_s: float | None = None,
) -> list[Span]:
    """Segments (seconds, padded) from raw speech spans: merge, cut turns longer than `max_turn_s`
    at their longest pauses, split what is still too long, pad (the module docstring's steps 2-5)."""
    budget = max_segment_s - 2 * pad_s  # room for speech once the padding is added
    groups: list[list[Span]] = []  # the raw spans of each merged span
    for start, end in spans:
        if groups and start - groups[-1][-1][1] < merge_gap_s and end - groups[-1][0][0] <= budget:
            groups[-1].append((start, end))
        else:
            groups.append([(start, end)])

    turns: list[Span] = []
    for group in groups:
        turns.extend(cut_long_turn(group, max_turn_s) if max_turn_s is not None else [(group[0][0], group[-1][1])])

    fitted: list[Span] = []
    for span in turns:
        fitted.extend(_split_long(span, budget, waveform))

    padded: list[Span] = []
    for i, (start, end) in enumerate(fitted):
        lo = 0.0 if i == 0 else (fitted[i - 1][1] + start) / 2
        hi = total_s if i == len(fitted) - 1 else (end + fitted[i + 1][0]) / 2
        padded.append((max(lo, start - pad_s), min(hi, end + pad_s)))
    return padded


def cut_long_turn(spans: list[Span], max_turn_s: float) -> list[Span]:
    """The turn made of `spans` (sorted speech spans, merged as one) as one span, or, when it lasts
    longer than `max_turn_s`, cut at its longest pause between spans, each side again in turn."""
    start, end = spans[0][0], spans[-1][1]
    if end - start <= max_turn_s or len(spans) == 1:
        return [(start, end)]
    gaps = [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]
    k = int(np.argmax(gaps))  # the first of equally long pauses
    return cut_long_turn(spans[: k + 1], max_turn_s) + cut_long_turn(spans[k + 1 :], max_turn_s)


def _split_long(span: Span, budget: float, waveform: np.ndarray | None) -> list[Span]:
    """Cut a span longer than `budget` at its quietest frame in the second half of each budget."""
    pieces = []
    start, end = span
    while end - start > budget:
        cut = start + budget  # without a waveform: a hard cut at the limit
        if waveform is not None:
            cut = _quietest_point(waveform, start + budget / 2, start + budget)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _quietest_point(waveform: np.ndarray, lo: float, hi: float) -> float:
    frame = int(ENERGY_FRAME_S * SAMPLE_RATE)
    i0, i1 = int(lo * SAMPLE_RATE), int(hi * SAMPLE_RATE)
    n = (i1 - i0) // frame
    if n < 1:
        return hi
    chunk = np.asarray(waveform[i0 : i0 + n * frame], dtype=np.float64).reshape(n, frame)
    quietest = int(np.argmin(np.mean(chunk**2, axis=1)))
    return (i0 + quietest * frame + frame // 2) / SAMPLE_RATE


def spans_within(spans: list[Span], start: float, end: float) -> list[Span]:
    """The parts of `spans` inside [start, end], in seconds from `start`."""
    inside = []
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if b > a:
            inside.append((round(a - start, 3), round(b - start, 3)))
    return inside


# ---------------------------------------------------------------------------------------------
# running silero over a batch of waveforms


def _model_input(record: dict[str, Any]) -> np.ndarray:
    """The record's waveform as the model takes it (16 kHz mono float32), or why it cannot be."""
    if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"SileroVAD expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
    waveform = np.asarray(record["_waveform"], dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"SileroVAD expects a mono waveform, got shape {waveform.shape}")
    return waveform


def _frames(waveform: np.ndarray, first: int, count: int) -> np.ndarray:
    """Frames `first` .. `first + count - 1` as the model reads them: (count, CONTEXT + FRAME), each
    frame after the CONTEXT samples before it (zeros before the start; the last frame zero-padded),
    as silero's streaming wrapper builds them."""
    lo, hi = first * FRAME - CONTEXT, (first + count) * FRAME
    padded = np.zeros(hi - lo, dtype=np.float32)
    a, b = max(lo, 0), min(hi, len(waveform))
    if b > a:
        padded[a - lo : b - lo] = waveform[a:b]
    return np.lib.stride_tricks.sliding_window_view(padded, CONTEXT + FRAME)[::FRAME][:count]


def _n_frames(waveform: np.ndarray) -> int:
    return -(-len(waveform) // FRAME)


def _load_jit():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # silero's loader uses deprecated importlib/jit calls
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


def _jit_parts(model):
    """The 16 kHz network inside silero's TorchScript wrapper: (features + encoder, LSTM cell, head)."""
    net = model._model
    return (lambda x: net.encoder(net.run_extractors(x))), net.decoder.rnn, net.decoder.decoder


def _jit_probs(model, waveforms: list[np.ndarray]) -> list[np.ndarray]:
    """Frame probabilities of each waveform: the encoder over many frames per call, the LSTM stepped
    over all the records at once, longest first (a record that has ended leaves the batch)."""
    import torch

    encode, lstm, head = _jit_parts(model)
    order = sorted(range(len(waveforms)), key=lambda i: -len(waveforms[i]))
    lengths = [_n_frames(waveforms[i]) for i in order]
    probs = [np.zeros(n, dtype=np.float32) for n in lengths]
    if not lengths or lengths[0] == 0:
        return [probs[order.index(i)] for i in range(len(waveforms))]
    rows = len(order)
    h, c = torch.zeros(rows, 128), torch.zeros(rows, 128)
    with torch.inference_mode():
        for t0 in range(0, lengths[0], JIT_WINDOW_FRAMES):
            active = sum(1 for n in lengths if n > t0)  # a prefix: lengths are sorted
            width = min(JIT_WINDOW_FRAMES, lengths[0] - t0)
            frames = np.stack([_frames(waveforms[order[r]], t0, width) for r in range(active)])
            features = encode(torch.from_numpy(frames.reshape(active * width, CONTEXT + FRAME)))
            features = features.reshape(active, width, -1).transpose(0, 1).contiguous()  # (time, row, 128)
            hidden = torch.zeros(width, active, h.shape[1])
            k = active
            for t in range(width):
                while k and lengths[k - 1] <= t0 + t:
                    k -= 1
                h_k, c_k = lstm(features[t, :k], (h[:k], c[:k]))
                h[:k], c[:k] = h_k, c_k
                hidden[t, :k] = h_k
            window = head(hidden.reshape(width * active, -1, 1)).reshape(width, active).numpy()
            for r in range(active):
                n = min(width, lengths[r] - t0)
                probs[r][t0 : t0 + n] = window[:n, r]
    by_input = [None] * len(waveforms)
    for r, i in enumerate(order):
        by_input[i] = probs[r]
    return by_input  # type: ignore[return-value]


def _check_jit_parts(model) -> None:
    """Refuse a silero release whose TorchScript model is built differently: the batched path must
    give the probabilities of silero's own frame-by-frame call on a test signal."""
    import torch

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    signal = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.01 * rng.standard_normal(t.size))
    signal = signal.astype(np.float32)
    try:
        batched = _jit_probs(model, [signal])[0]
    except (AttributeError, RuntimeError) as exc:
        raise RuntimeError(f"silero-vad's TorchScript model is not laid out as SileroVAD expects ({exc}); "
                           "use runtime: onnx or the silero-vad release in requirements.lock") from exc
    model.reset_states()
    with torch.inference_mode():
        frames = _frames(signal, 0, _n_frames(signal))
        streamed = np.array([float(model(torch.from_numpy(f[CONTEXT:].copy()), SAMPLE_RATE)) for f in frames])
    model.reset_states()
    worst = float(np.max(np.abs(batched - streamed)))
    if worst > 1e-4:
        raise RuntimeError(f"silero-vad's batched path differs from its frame-by-frame call by {worst:.2g} "
                           "on a test signal; use runtime: onnx or the silero-vad release in requirements.lock")


def _load_onnx_sequence():
    from importlib import resources

    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("SileroVAD runtime 'onnx' needs onnxruntime (pip install onnxruntime); "
                          "runtime 'jit' needs only torch") from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the export carries unused initialisers, which it warns about
    path = resources.files("silero_vad.data").joinpath(ONNX_SEQUENCE_FILE)
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _onnx_probs(session, waveform: np.ndarray) -> np.ndarray:
    """Frame probabilities of one waveform from the sequence export, ONNX_WINDOW_FRAMES frames per call."""
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    n = _n_frames(waveform)
    probs = np.zeros(n, dtype=np.float32)
    for t0 in range(0, n, ONNX_WINDOW_FRAMES):
        width = min(ONNX_WINDOW_FRAMES, n - t0)
        block = np.ascontiguousarray(_frames(waveform, t0, width))
        values, h, c = session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
        probs[t0 : t0 + width] = np.asarray(values).reshape(-1)
    return probs
