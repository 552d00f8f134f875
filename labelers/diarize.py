"""Diarization stage with pyannote.audio: one record per single-speaker turn, with a speaker id.

pyannote's `SpeakerDiarization` pipeline (`pyannote/speaker-diarization-community-1` by default, or
`pyannote/speaker-diarization-3.1`, or a local folder / config.yaml laid out as those repositories
are: `config.yaml` naming `$model/segmentation`, `$model/embedding`, `$model/plda`) answers "who spoke
when" for each input record, a VAD segment or a whole file. From its answer:
  1. Turns come from the exclusive diarization (at most one speaker at a time). Consecutive turns of
     one speaker closer than `merge_gap_s` are merged while the result fits `max_segment_s`.
  2. The turns then go through the VAD's cutting rules (labelers/vad.py `plan_segments`): a turn
     longer than `max_segment_s` is split at its quietest frame, each is padded by `pad_s` without
     reaching half-way into its neighbour, and a piece shorter than `min_segment_s` leaves as a
     piece Reject `segment_too_short`.
  3. Overlapped speech (where the full diarization has two or more speakers at once) inside a piece
     for at least `min_overlap_s` gives the piece the quality flag `overlapped_speech`; with
     `drop_overlap: true` such a piece leaves as a piece Reject with reason `overlapped_speech`.
  4. A record in which the pipeline finds no speaker at all is rejected as `no_speech`.
Each output carries new bounds and `id`, its `_waveform` slice, `_speech_spans` (its speaker's turns,
seconds from the piece start) and `speaker`.

Speaker ids. pyannote numbers the speakers of each call SPEAKER_00, SPEAKER_01, ... in order of
first appearance; those numbers mean the same person only within the audio of that one call. So the
id names the audio that was diarized: `<source-stem>:SPEAKER_00` when the stage sees a whole file
(a record without `segment_start`: the stage placed before VAD), and
`<source-stem>@<segment_start>:SPEAKER_00` when it sees a segment (after VAD, the usual place: a VAD
segment holds up to `max_segment_s` of one conversation). Two ids are the same person only when
they are equal; no id claims an identity across audio the model never compared. A speaker given by
the manifest is replaced: the manifest's id belongs to the file, the diarization's to the turn.

Transcripts: as with VAD, a transcript on the input (a manifest's, of the whole record) is kept
when the record yields exactly one piece (counting the rejected ones) and cleared with its origin,
confidence and words on every piece of a record that is split, with the quality flag
`manifest_transcript_dropped_split`, so that ASR fills them.

Batching: pyannote diarizes one recording per call; within it the segmentation windows and the
speaker embeddings go through the models in batches (`segmentation_batch_size`,
`embedding_batch_size`; None keeps the pipeline config's). `num_speakers` / `min_speakers` /
`max_speakers` are passed to every call when set. The audio is handed over in memory
({"waveform": (1, n) tensor, "sample_rate": 16000}), never as a path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE, record_id
from echat.schemas.stage import Reject, Stage

from . import model_hub
from .flags import add_flag
from .vad import SPLIT_FLAG, TRANSCRIPT_FIELDS, plan_segments, spans_within

DEFAULT_PIPELINE = "pyannote/speaker-diarization-community-1"
OVERLAP_FLAG = "overlapped_speech"
Turn = tuple[float, float, str]  # start, end (seconds in the record), pyannote's speaker label


class PyannoteDiarization(Stage):
    name: ClassVar[str] = "diarize"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "source_uri", "segment_start", "transcript", "speaker")
    writes: ClassVar[tuple[str, ...]] = (
        "id",
        "segment_start",
        "segment_end",
        "duration",
        "speaker",
        "_waveform",
        "_speech_spans",
        "_f0",  # the input's F0 does not hold for a piece: dropped
        "quality_flags",
    )
    clears: ClassVar[tuple[str, ...]] = ("transcript",)
    splits: ClassVar[bool] = True
    batch_size: ClassVar[int] = 1

    def __init__(
        self,
        model: str = DEFAULT_PIPELINE,
        cache_dir: str | None = None,
        device: str = "cpu",
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        merge_gap_s: float = 0.5,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.1,
        min_overlap_s: float = 0.1,
        drop_overlap: bool = False,
        segmentation_batch_size: int | None = None,
        embedding_batch_size: int | None = None,
    ):
        for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers), ("max_speakers", max_speakers),
                            ("segmentation_batch_size", segmentation_batch_size), ("embedding_batch_size", embedding_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 (or null), got {value!r}")
        if min_speakers is not None and max_speakers is not None and min_speakers > max_speakers:
            raise ValueError(f"min_speakers ({min_speakers}) exceeds max_speakers ({max_speakers})")
        if min(merge_gap_s, min_segment_s, pad_s, min_overlap_s) < 0:
            raise ValueError("durations must not be negative")
        if max_segment_s <= 2 * pad_s + 0.5:
            raise ValueError(f"max_segment_s ({max_segment_s}) leaves too little room after padding (pad_s={pad_s})")
        if min_segment_s > max_segment_s:
            raise ValueError(f"min_segment_s ({min_segment_s}) exceeds max_segment_s ({max_segment_s})")
        self.model = model_hub.check_model_param(model, "pyannote diarization")
        self.cache_dir = cache_dir
        self.device = model_hub.check_device(device)
        self.num_speakers, self.min_speakers, self.max_speakers = num_speakers, min_speakers, max_speakers
        self.merge_gap_s = float(merge_gap_s)
        self.min_segment_s = float(min_segment_s)
        self.max_segment_s = float(max_segment_s)
        self.pad_s = float(pad_s)
        self.min_overlap_s = float(min_overlap_s)
        self.drop_overlap = bool(drop_overlap)
        self.segmentation_batch_size = segmentation_batch_size
        self.embedding_batch_size = embedding_batch_size
        self._pipeline = None

    # ------------------------------------------------------------------ model

    def setup(self) -> None:
        import torch
        from pyannote.audio import Pipeline

        pipeline = Pipeline.from_pretrained(model_hub.local_or_id(self.model), cache_dir=model_hub.hub_cache_dir(self.cache_dir))
        if pipeline is None:
            raise RuntimeError(f"could not load the pyannote pipeline {self.model!r} "
                               "(a gated model needs HF_TOKEN and its user conditions accepted)")
        if self.segmentation_batch_size is not None:
            pipeline.segmentation_batch_size = self.segmentation_batch_size
        if self.embedding_batch_size is not None:
            pipeline.embedding_batch_size = self.embedding_batch_size
        pipeline.to(torch.device(self.device))
        self._pipeline = pipeline

    def teardown(self) -> None:
        self._pipeline = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pipeline"] = None
        return state

    def describe(self) -> str:
        return f"pyannote-diarization:{model_hub.model_label(self.model)}"

    def diarize(self, waveform: np.ndarray) -> tuple[list[Turn], list[tuple[float, float]]]:
        """(exclusive turns, overlapped regions) of a 16 kHz mono waveform, seconds from its start."""
        import torch

        if self._pipeline is None:
            self.setup()
        audio = {"waveform": torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0),
                 "sample_rate": SAMPLE_RATE}
        options = {k: v for k, v in (("num_speakers", self.num_speakers), ("min_speakers", self.min_speakers),
                                     ("max_speakers", self.max_speakers)) if v is not None}
        output = self._pipeline(audio, **options)
        full = getattr(output, "speaker_diarization", output)  # pyannote 3.x pipelines return the Annotation
        exclusive = getattr(output, "exclusive_speaker_diarization", None)
        total = len(waveform) / SAMPLE_RATE
        turns = _turns(exclusive if exclusive is not None else full, total)
        if exclusive is None:
            turns = _exclusive(turns)
        overlaps = [(float(s.start), float(s.end)) for s in full.get_overlap()]
        return turns, overlaps

    # ------------------------------------------------------------------ records

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"diarization expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
        waveform = np.asarray(record["_waveform"], dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(f"diarization expects a mono waveform, got shape {waveform.shape}")
        total = len(waveform) / SAMPLE_RATE
        turns, overlaps = self.diarize(waveform)
        if not turns:
            yield self.reject(record, "no_speech", f"the diarization found no speaker in {total:.2f} s")
            return
        yield from self._pieces(record, waveform, turns, overlaps)

    def _pieces(self, record, waveform, turns: list[Turn], overlaps) -> Iterator[dict[str, Any] | Reject]:
        turns = merge_turns(turns, self.merge_gap_s, self.max_segment_s - 2 * self.pad_s)
        total = len(waveform) / SAMPLE_RATE
        # Split what is too long (no padding yet), then pad against the neighbours: the VAD's rules.
        pieces = plan_segments([(s, e) for s, e, _ in turns], total, waveform=waveform, merge_gap_s=0.0,
                               max_segment_s=self.max_segment_s - 2 * self.pad_s, pad_s=0.0)
        speakers = [_speaker_at(turns, (s + e) / 2) for s, e in pieces]
        padded = plan_segments(pieces, total, waveform=None, merge_gap_s=0.0,
                               max_segment_s=self.max_segment_s, pad_s=self.pad_s)
        assert len(padded) == len(pieces), "padding must neither merge nor split"

        uri = str(record.get("source_uri", ""))
        has_offset = record.get("segment_start") is not None
        offset = float(record.get("segment_start") or 0.0)
        scope = _stem(uri) + (f"@{offset:.2f}" if has_offset else "")
        split = len(padded) > 1
        base = {k: v for k, v in record.items() if k not in ("_waveform", "_f0", "_speech_spans")}
        for (start, end), (core_start, core_end), label in zip(padded, pieces, speakers):
            i0, i1 = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
            seg_start, seg_end = offset + i0 / SAMPLE_RATE, offset + i1 / SAMPLE_RATE
            out = dict(base)
            out.update(
                segment_start=seg_start,
                segment_end=seg_end,
                duration=(i1 - i0) / SAMPLE_RATE,
                id=record_id(uri, seg_start, seg_end),
                speaker=f"{scope}:{label}",
            )
            if out["duration"] < self.min_segment_s:
                detail = f"{out['duration']:.2f} s < min_segment_s {self.min_segment_s:.2f} s ({out['speaker']})"
                yield self.reject(out, "segment_too_short", detail)
                continue
            overlapped = _overlap_within(overlaps, i0 / SAMPLE_RATE, i1 / SAMPLE_RATE)
            if overlapped >= max(self.min_overlap_s, 1e-9):
                if self.drop_overlap:
                    yield self.reject(out, OVERLAP_FLAG, f"{overlapped:.2f} s of overlapped speech in {out['duration']:.2f} s "
                                                         f"({out['speaker']})")
                    continue
                add_flag(out, OVERLAP_FLAG)
            out["_waveform"] = waveform[i0:i1]
            own = [(s, e) for s, e, who in turns if who == label]
            out["_speech_spans"] = spans_within(own, i0 / SAMPLE_RATE, i1 / SAMPLE_RATE)
            if split and out.get("transcript") is not None:
                for name in TRANSCRIPT_FIELDS:
                    if name in out:
                        out[name] = None
                add_flag(out, SPLIT_FLAG)
            yield out


def _turns(annotation, total: float) -> list[Turn]:
    """(start, end, label) of every track, clipped to [0, total], in time order."""
    turns = []
    for segment, _, label in annotation.itertracks(yield_label=True):
        start, end = max(0.0, float(segment.start)), min(total, float(segment.end))
        if end > start:
            turns.append((start, end, str(label)))
    return sorted(turns)


def _exclusive(turns: list[Turn]) -> list[Turn]:
    """Turns without overlap (for pipelines that give none): a later turn starts where the earlier ends."""
    out: list[Turn] = []
    for start, end, label in turns:
        if out and start < out[-1][1]:
            start = out[-1][1]
        if end > start:
            out.append((start, end, label))
    return out


def merge_turns(turns: list[Turn], merge_gap_s: float, budget_s: float) -> list[Turn]:
    """Consecutive turns of one speaker closer than `merge_gap_s` as one, while it fits `budget_s`."""
    merged: list[Turn] = []
    for start, end, label in turns:
        if merged:
            last_start, last_end, last_label = merged[-1]
            if label == last_label and start - last_end < merge_gap_s and end - last_start <= budget_s:
                merged[-1] = (last_start, max(last_end, end), label)
                continue
        merged.append((start, end, label))
    return merged


def _speaker_at(turns: list[Turn], t: float) -> str:
    """The label of the turn holding time `t` (or the nearest turn)."""
    best, distance = turns[0][2], float("inf")
    for start, end, label in turns:
        d = 0.0 if start <= t <= end else min(abs(t - start), abs(t - end))
        if d < distance:
            best, distance = label, d
    return best


def _overlap_within(overlaps: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in overlaps)


def _stem(uri: str) -> str:
    """The file name of a path or URI without its extension (`gs://b/x/talk.flac` -> `talk`)."""
    name = PurePosixPath(uri.replace("\\", "/").split("?", 1)[0]).name
    return name.rsplit(".", 1)[0] if "." in name[1:] else (name or "source")
