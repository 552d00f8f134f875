"""The training data loader: shards -> samples -> shuffled dynamic batches -> `Batch`, resumable.

    loader = build_dataloader(["out/data"], tokenizer, tasks={"<TRANSCRIBE>": 1.0, "<S2TCHAT> <THINK>": 0.5},
                              max_frames_per_batch=6000, shuffle_buffer=500, seed=1234, num_workers=2)
    for batch in loader:               # runs `epochs` epochs (None: until the caller stops)
        ...
        state = loader.state_dict()    # save with the checkpoint
    loader.load_state_dict(state)      # a fresh loader built with the same arguments goes on
                                       # with exactly the batches the interrupted one would have given

Per worker (rank r of R, DataLoader worker w of W; global worker g = r * W + w):
  1. the read units (row groups, raw-list chunks) in an order shuffled per epoch, every (R * W)-th
     from g: ranks and workers read disjoint rows, and together all of them;
  2. each record -> its samples (samples.py), still holding undecoded audio bytes;
  3. a shuffle buffer of `shuffle_buffer` samples;
  4. windows of `sort_window` samples sorted by length and cut into dynamic batches of at most
     `max_frames_per_batch` padded frames (batch size x longest); the batches of a window are shuffled;
  5. only then decode the audio, compute the log-mel features and collate into a `Batch`.
Every random choice is seeded by (seed, epoch, global worker) or (seed, epoch, record id), never by
process state, so the stream of each worker is a pure function of its position. The position is
therefore (epoch, batches taken from each worker, which worker is next): resuming replays steps
1-4 up to it (cheap: no audio decoding, no features) and yields the rest. The main process takes
the workers' batches in a fixed round-robin order (skipping finished workers) rather than in the
order they happen to arrive, which makes the sequence the same for any timing and across a resume.
Ranks whose units hold unequal numbers of batches are not evened out: the trainer stops an epoch-
bounded run (data.epochs) when the first rank runs out, so the other ranks' last batches go unused.
"""

from __future__ import annotations

import logging
import os
import random
from collections import deque
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from echat.model.batch import IGNORE_INDEX, Batch
from echat.model.data_sources import Unit, plan_units, read_unit, resolve_files
from echat.model.features import LogMelExtractor, decode_audio
from echat.model.samples import FRAMES_PER_POSITION, Sample, SampleBuilder

log = logging.getLogger(__name__)

STATE_VERSION = 1


def sample_frames(sample: Sample) -> int:
    """What one sample weighs against `max_frames_per_batch`: its mel frames, or for a sample
    without speech input FRAMES_PER_POSITION per position of its LLM sequence (the frames that
    would make as many positions)."""
    return sample.num_frames if sample.audio is not None else FRAMES_PER_POSITION * sample.seq_len


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keep `size` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def dynamic_batches(
    samples: Iterable[Sample],
    *,
    max_frames: int,
    max_tokens: int | None = None,
    sort_window: int = 500,
    rng: random.Random,
) -> Iterator[list[Sample]]:
    """Batches whose padded size (batch size x longest) stays within `max_frames` (and `max_tokens`).

    Samples are gathered in windows of `sort_window`, sorted by length so that a batch pads little,
    packed greedily, and the window's batches are emitted in shuffled order; the last, partly
    filled batch of a window moves on into the next window. A sample that alone exceeds a limit
    can never be batched: it is dropped with a warning naming it.
    """
    if max_frames <= 0:
        raise ValueError("max_frames_per_batch must be positive")
    window: list[Sample] = []
    for sample in samples:
        cost = sample_frames(sample)
        if cost > max_frames or (max_tokens is not None and sample.seq_len > max_tokens):
            log.warning(
                "sample %s %s dropped: %d frames / %d tokens exceed the batch limit (%d frames, %s tokens)",
                sample.key, sample.task, cost, sample.seq_len, max_frames, max_tokens,
            )
            continue
        window.append(sample)
        if len(window) >= max(sort_window, 1):
            batches = _pack(window, max_frames, max_tokens)
            window = batches.pop()  # the last batch may still fill up
            rng.shuffle(batches)
            yield from batches
    if window:
        batches = _pack(window, max_frames, max_tokens)
        rng.shuffle(batches)
        yield from batches


def _pack(window: list[Sample], max_frames: int, max_tokens: int | None) -> list[list[Sample]]:
    ordered = sorted(window, key=lambda s: (sample_frames(s), s.seq_len))
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    longest = longest_tokens = 0
    for sample in ordered:
        frames = max(longest, sample_frames(sample))
        tokens = max(longest_tokens, sample.seq_len)
        fits = (len(current) + 1) * frames <= max_frames and (max_tokens is None or (len(current) + 1) * tokens <= max_tokens)
        if current and not fits:
            batches.append(current)
            current, frames, tokens = [], sample_frames(sample), sample.seq_len
        current.append(sample)
        longest, longest_tokens = frames, tokens
    if current:
        batches.append(current)
    return batches


@contextmanager
def _one_thread():
    """Run the small STFTs of one utterance on one thread: several threads only contend for them
    (measured 5 ms instead of 49 ms per 6 s utterance on a loaded 2-core machine). Restored after,
    so a loader without workers leaves the training step its threads."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def collate(samples: list[Sample], extractor: LogMelExtractor, pad_id: int) -> Batch:
    """Decode the audio, compute the features and pad everything into a `Batch`."""
    with _one_thread():
        return _collate(samples, extractor, pad_id)


def _collate(samples: list[Sample], extractor: LogMelExtractor, pad_id: int) -> Batch:
    feats = []
    for s in samples:
        if s.audio is None:
            feats.append(None)
            continue
        try:
            feats.append(extractor(decode_audio(s.audio)))
        except Exception as err:  # the header read fine when the record was read; the data did not
            raise RuntimeError(f"record {s.key}: cannot decode its audio {s.audio.describe()}: {err}") from err
    features, feature_lengths = pad_features(feats, extractor.n_mels)
    input_ids, attention_mask = pad_sequences([s.input_ids for s in samples], pad_id)
    labels, _ = pad_sequences([s.labels for s in samples], IGNORE_INDEX)
    speech_tokens, _ = pad_sequences([s.speech_tokens for s in samples], IGNORE_INDEX)
    speech_token_lengths = torch.tensor([len(s.speech_tokens) for s in samples], dtype=torch.long)
    return Batch(
        features=features,
        feature_lengths=feature_lengths,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        speech_tokens=speech_tokens,
        speech_token_lengths=speech_token_lengths,
        tasks=[s.task for s in samples],
        keys=[s.key for s in samples],
    )


def pad_features(feats: list[torch.Tensor | None], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_mels, T) zero-padded log-mel and the valid frames per sample (0 for None)."""
    max_t = max((f.shape[1] for f in feats if f is not None), default=0)
    features = torch.zeros(len(feats), n_mels, max_t, dtype=torch.float32)
    lengths = torch.zeros(len(feats), dtype=torch.long)
    for i, f in enumerate(feats):
        if f is not None:
            features[i, :, : f.shape[1]] = f
            lengths[i] = f.shape[1]
    return features, lengths


def pad_sequences(sequences: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded int64 ids and their (B, L) mask of real positions."""
    max_l = max((len(s) for s in sequences), default=0)
    padded = torch.full((len(sequences), max_l), pad_value, dtype=torch.long)
    mask = torch.zeros(len(sequences), max_l, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            padded[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
    return padded, mask


class ShardDataset(IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker yields `(worker, Batch)` pairs and
    then `(worker, None)` when it is done. `ShardLoader` drives it; use that."""

    def __init__(
        self,
        units: list[Unit],
        builder: SampleBuilder,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        max_frames_per_batch: int,
        max_tokens_per_batch: int | None,
        shuffle_buffer: int,
        sort_window: int,
        seed: int,
        feature_extractor: Any = None,
        max_audio_frames: int | None = None,
    ):
        super().__init__()
        self.units = units
        self.builder = builder
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.max_frames_per_batch = max_frames_per_batch
        self.max_tokens_per_batch = max_tokens_per_batch
        self.shuffle_buffer = shuffle_buffer
        self.sort_window = sort_window
        self.seed = seed
        self.feature_extractor = feature_extractor
        self.max_audio_frames = max_audio_frames
        self.epoch = 0
        self.skip: list[int] = [0] * max(num_workers, 1)  # batches each worker leaves out (resume)

    def global_worker(self, worker: int) -> int:
        return self.rank * max(self.num_workers, 1) + worker

    def units_for(self, worker: int) -> list[Unit]:
        """The read units of one worker of this rank in the current epoch."""
        order = list(self.units)
        random.Random(f"{self.seed}|{self.epoch}|units").shuffle(order)
        total = self.world_size * max(self.num_workers, 1)
        return order[self.global_worker(worker) :: total]

    def samples_for(self, worker: int) -> Iterator[Sample]:
        """The worker's samples in shuffle-buffer order (before batching)."""
        def unshuffled() -> Iterator[Sample]:
            for unit in self.units_for(worker):
                for record in read_unit(unit, self.max_audio_frames):
                    yield from self.builder.build(record, epoch=self.epoch)

        rng = random.Random(f"{self.seed}|{self.epoch}|{self.global_worker(worker)}|shuffle")
        return shuffle_buffer(unshuffled(), self.shuffle_buffer, rng)

    def batches_for(self, worker: int) -> Iterator[list[Sample]]:
        rng = random.Random(f"{self.seed}|{self.epoch}|{self.global_worker(worker)}|batches")
        return dynamic_batches(
            self.samples_for(worker),
            max_frames=self.max_frames_per_batch,
            max_tokens=self.max_tokens_per_batch,
            sort_window=self.sort_window,
            rng=rng,
        )

    def __iter__(self) -> Iterator[tuple[int, Batch | None]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        extractor = LogMelExtractor(self.feature_extractor)
        pad_id = self.builder.encoder.pad_id
        for i, samples in enumerate(self.batches_for(worker)):
            if i < self.skip[worker]:
                continue
            yield worker, collate(samples, extractor, pad_id)
        yield worker, None


def _pinned(batch: Batch) -> Batch:
    """The batch with its tensors in page-locked memory, for `batch.to(cuda, non_blocking=True)`."""
    if not torch.cuda.is_available():
        return batch
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return Batch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def _keep(item: Any) -> Any:
    return item


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # several workers share the cores; one STFT thread each


class ShardLoader:
    """Iterates `Batch`es over epochs; `state_dict()` / `load_state_dict()` give exact resumption.

    The state is (epoch, next worker in the round robin, batches taken from each worker). A state
    only fits a loader with the same files, tasks, seed, rank, world size and number of workers,
    and the same settings that shape the samples and batches (the fingerprint: batch limits,
    shuffle sizes, label and instruction settings, instructions, tokenizer vocabulary).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        epochs: int | None,
        prefetch_factor: int | None = 2,
        pin_memory: bool = False,
        fingerprint: str = "",
    ):
        if epochs is not None and epochs < 1:
            raise ValueError("epochs must be at least 1 (or None for no end)")
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.epochs = epochs
        self.prefetch_factor = prefetch_factor
        self.fingerprint = fingerprint
        self.workers = max(dataset.num_workers, 1)
        self._epoch = 0
        self._cursor = 0
        self._consumed = [0] * self.workers

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self._epoch < self.epochs:
            fresh = not any(self._consumed)
            yielded = 0
            for batch in self._run_epoch():
                yielded += 1
                yield batch
            if fresh and not yielded:  # else an endless loader would spin without ever yielding
                raise ValueError(
                    f"rank {self.dataset.rank} got no sample in epoch {self._epoch}: no record of its shards "
                    f"supports any of the tasks {', '.join(self.dataset.builder.tasks)}"
                )
            self._epoch += 1
            self._cursor = 0
            self._consumed = [0] * self.workers

    def _run_epoch(self) -> Iterator[Batch]:
        self.dataset.epoch = self._epoch
        self.dataset.skip = list(self._consumed)
        nw = self.dataset.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=nw,
            collate_fn=_keep,
            worker_init_fn=_init_worker if nw > 0 else None,
            prefetch_factor=self.prefetch_factor if nw > 0 else None,
        )
        stream = iter(loader)
        queues: list[deque] = [deque() for _ in range(self.workers)]
        done = [False] * self.workers
        while True:
            if all(done) and not any(queues):
                return
            w = self._cursor
            while not queues[w] and not done[w]:
                worker, batch = next(stream)
                if batch is None:
                    done[worker] = True
                else:
                    queues[worker].append(batch)
            if queues[w]:
                batch = queues[w].popleft()
                self._consumed[w] += 1
                self._cursor = (w + 1) % self.workers
                yield _pinned(batch) if self.pin_memory else batch
            else:  # this worker is finished: the round robin goes on without it
                self._cursor = (w + 1) % self.workers

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "consumed": list(self._consumed),
            "rank": d.rank,
            "world_size": d.world_size,
            "num_workers": d.num_workers,
            "seed": d.seed,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.dataset
        expected = {"version": STATE_VERSION, "rank": d.rank, "world_size": d.world_size, "num_workers": d.num_workers, "seed": d.seed, "fingerprint": self.fingerprint}
        wrong = [f"{k} (state {state.get(k)!r}, loader {v!r})" for k, v in expected.items() if state.get(k) != v]
        if wrong:
            raise ValueError("the data-loader state belongs to a different loader: " + "; ".join(wrong))
        if len(state["consumed"]) != self.workers:
            raise ValueError(f"the state has {len(state['consumed'])} workers, the loader {self.workers}")
        self._epoch = int(state["epoch"])
        self._cursor = int(state["cursor"])
        self._consumed = [int(c) for c in state["consumed"]]


def build_dataloader(
    files: list[str] | str,
    tokenizer: Any,
    *,
    tasks: dict[str, float],
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    max_frames_per_batch: int,
    shuffle_buffer: int,
    seed: int,
    think_text_ratio: float = 0.5,
    epochs: int | None = None,
    max_tokens_per_batch: int | None = None,
    sort_window: int = 500,
    min_label_score: float = 0.0,
    chat_instruction_ratio: float = 0.0,
    instructions: str | None = None,
    feature_extractor: Any = None,
    max_audio_frames: int | None = None,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
) -> ShardLoader:
    """The training loader of one rank over parquet shards, shard folders, globs or OSUM raw lists.

    tasks: task tag -> expected samples per supporting record per epoch (samples.py).
    max_frames_per_batch: padded mel frames per batch (100 per second of audio); a sample without
    speech weighs FRAMES_PER_POSITION frames per token. max_tokens_per_batch: optional cap on the
    padded LLM length (batch size x longest `Sample.seq_len`: tokens, spliced speech positions and
    speech targets). sort_window: samples sorted together to form batches. epochs: None runs until
    the caller stops. pin_memory: hand out batches in page-locked memory (when CUDA is present).
    max_audio_frames: the most mel frames the model's speech encoder takes (Whisper: 3000, 30 s;
    `model.encoder.max_input_frames`); a record with longer audio keeps only its text-only tasks,
    with a warning naming it (None: no limit).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within a world of {world_size}")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("num_workers and shuffle_buffer must not be negative")
    if max_tokens_per_batch is not None and max_tokens_per_batch <= 0:
        raise ValueError("max_tokens_per_batch must be positive")
    sources = resolve_files(files)
    units = plan_units(sources, min_units=world_size * max(num_workers, 1))
    if not units:
        raise ValueError(f"the inputs hold no rows: {', '.join(p for p, _ in sources)}")
    builder = SampleBuilder(
        tokenizer,
        tasks,
        think_text_ratio=think_text_ratio,
        min_label_score=min_label_score,
        chat_instruction_ratio=chat_instruction_ratio,
        instructions=instructions,
        seed=seed,
    )
    dataset = ShardDataset(
        units,
        builder,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        max_frames_per_batch=max_frames_per_batch,
        max_tokens_per_batch=max_tokens_per_batch,
        shuffle_buffer=shuffle_buffer,
        sort_window=sort_window,
        seed=seed,
        feature_extractor=feature_extractor,
        max_audio_frames=max_audio_frames,
    )
    fingerprint = _fingerprint(
        # File names, not full paths: a resumed run may see the same shards under another mount point.
        [os.path.basename(p) for p, _ in sources], builder.tasks, max_frames_per_batch, max_tokens_per_batch,
        shuffle_buffer, sort_window, think_text_ratio, min_label_score, chat_instruction_ratio, max_audio_frames,
        # What the samples are made of: the instructions drawn from, and the token ids.
        {task: builder.instructions.get(task) for task in builder.tasks}, _vocab_hash(tokenizer),
    )
    return ShardLoader(dataset, epochs=epochs, prefetch_factor=prefetch_factor, pin_memory=pin_memory, fingerprint=fingerprint)


def _vocab_hash(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary (tokens and ids, added tokens included)."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _fingerprint(*parts: Any) -> str:
    """A short hash of what decides the batch sequence, so a state is not applied to another run."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
