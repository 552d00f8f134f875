"""The model's data loader on this machine: samples/s and audio hours per hour, 0 and 2 workers.

    .venv/bin/python benchmarks/bench_model_data.py [SHARDS ...] [--records 240] [--workers 0 2]
        [--max-frames 6000] [--tokenizer PATH] [--tasks all|chat|asr]

SHARDS are parquet shards, shard folders (e.g. the output of `echat build`) or OSUM raw lists. With
none, a shard folder of `--records` espeak-ng utterances (1 to 12 s, every field the tasks read,
speech tokens included) is made in a temporary folder first.

For each worker count it runs one epoch of `build_dataloader` and prints samples/s, batches/s and
audio hours per hour (mel features produced per wall-clock hour: the same utterance counts once per
speech-input task). It also times the fast-forward of a resume to the middle of the epoch (the
position is replayed without decoding audio). The loader keeps up with training while its
samples/s exceed what the model consumes per second, which the training benchmark prints.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_SETS = {
    # every task tag of schemas/vocab.py once per supporting record: the heaviest mixture
    "all": None,
    "chat": {"<S2TCHAT> <TEXT2TOKEN> <THINK>": 1.0, "<S2TCHAT> <THINK>": 0.5, "<TEXT2TOKEN>": 0.5, "<TEXT2TEXT>": 0.3},
    "asr": {"<TRANSCRIBE>": 1.0, "<TRANSCRIBE> <EMOTION>": 0.3, "<TRANSCRIBE> <AGE> <GENDER>": 0.3, "<CAPTION>": 0.2},
}

SENTENCES = [
    "I have been feeling really tired lately and I do not know why.",
    "My best friend is moving to another city next month.",
    "Could you tell me how to make a simple vegetable soup?",
    "The exam results came out today and I did better than I expected.",
    "It has been raining all week and I miss the sunshine.",
    "I lost my keys again this morning, what a mess.",
    "We finally adopted a puppy and the whole family is so happy.",
    "My manager criticised my report in front of everyone.",
]


def make_shards(folder: Path, n: int, seed: int = 0) -> Path:
    """A shard folder of `n` synthetic records with real (espeak-ng) speech, written via the schema."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import soxr

    from echat.schemas import record as record_schema
    from echat.schemas import vocab

    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is needed to make the synthetic shards (or pass a shard folder)")
    rng = random.Random(seed)
    rows = []
    wav_path = folder / "tmp.wav"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = " ".join(rng.sample(SENTENCES, rng.randint(1, 3)))
        subprocess.run(["espeak-ng", "-v", "en+f3", "-s", str(rng.randint(140, 200)), "-w", str(wav_path), text], check=True)
        data, rate = sf.read(wav_path, dtype="float32")
        wav = soxr.resample(data, rate, 16000).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, wav, 16000, format="FLAC")
        duration = len(wav) / 16000
        words = text.split()
        step = duration / len(words)
        emotion = rng.choice(vocab.EMOTIONS)
        record = {
            "id": f"bench{i:05d}", "source_uri": f"synthetic/{i}.wav", "audio": {"bytes": buf.getvalue(), "path": f"{i}.flac"},
            "sampling_rate": 16000, "duration": duration, "segment_start": 0.0, "segment_end": duration, "language": "en",
            "transcript": text,
            "words": [{"word": w, "start": k * step, "end": (k + 1) * step, "score": 1.0} for k, w in enumerate(words)],
            "gender": "female", "gender_score": 0.9, "age": rng.choice(vocab.AGES), "age_score": 0.8,
            "emotion": emotion, "emotion_score": 0.6, "events": [rng.choice(vocab.EVENTS)], "events_score": 0.5,
            "style": "daily conversation", "style_score": 0.5,
            "think_tags": f"<think>User's words: {text}; Age: <adult>; Gender: <female>; Sound event: <&&>; Emotion: <{emotion}>; Reply emotion: <CURIOUS><think end>",
            "think_text": "<think>The speaker shares something personal in a calm voice; a warm and curious reply fits.<think end>",
            "reply_text": "Thank you for telling me. How are you feeling about it now?",
            "reply_speech_tokens": [rng.randrange(4096) for _ in range(int(25 * 3.5))],
            "history": [{"role": "user", "text": "Hello."}, {"role": "assistant", "text": "Hi! What is on your mind?"}],
            "schema_version": record_schema.SCHEMA_VERSION, "pipeline_version": "bench",
        }
        rows.append(record_schema.to_row(record))
    wav_path.unlink()
    data_dir = folder / "data"
    data_dir.mkdir(exist_ok=True)
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist(part, schema=record_schema.arrow_schema())
        pq.write_table(table, data_dir / f"train-{k:05d}-of-00002.parquet", row_group_size=64, compression="zstd")
    return folder


def load_tokenizer(path: str | None):
    if path:
        from echat.model.tokenizer import load_tokenizer as load

        return load(path=path)
    try:
        from echat.model.tokenizer import tiny_tokenizer

        return tiny_tokenizer()
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(f"no tokenizer: pass --tokenizer PATH ({err})") from err


def run(files: list[str], tokenizer, tasks: dict[str, float], workers: int, max_frames: int) -> dict:
    from echat.model.data import build_dataloader

    loader = build_dataloader(files, tokenizer, tasks=tasks, num_workers=workers, max_frames_per_batch=max_frames,
                              shuffle_buffer=500, seed=1, epochs=1)
    start = time.perf_counter()
    first = None
    samples = batches = frames = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        batches += 1
        samples += len(batch)
        frames += int(batch.feature_lengths.sum())
    wall = time.perf_counter() - start
    half_state = None
    if batches > 1:  # a resume to the middle: how long until its first batch
        loader = build_dataloader(files, tokenizer, tasks=tasks, num_workers=workers, max_frames_per_batch=max_frames,
                                  shuffle_buffer=500, seed=1, epochs=1)
        for k, _ in enumerate(loader, 1):
            if k == batches // 2:
                half_state = loader.state_dict()
                break
        resumed = build_dataloader(files, tokenizer, tasks=tasks, num_workers=workers, max_frames_per_batch=max_frames,
                                   shuffle_buffer=500, seed=1, epochs=1)
        resumed.load_state_dict(half_state)
        t0 = time.perf_counter()
        next(iter(resumed))
        half_state = time.perf_counter() - t0
    return {"wall": wall, "first": first or 0.0, "samples": samples, "batches": batches, "audio_s": frames / 100, "resume_s": half_state}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="*", help="parquet shards, shard folders or OSUM raw lists")
    parser.add_argument("--records", type=int, default=240, help="synthetic records when no shards are given")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--max-frames", type=int, default=6000, help="max_frames_per_batch")
    parser.add_argument("--tasks", choices=sorted(TASK_SETS), default="all")
    parser.add_argument("--tokenizer", help="a tokenizer folder or hub id (default: the bundled tiny tokenizer)")
    args = parser.parse_args()

    from echat.schemas import vocab

    tokenizer = load_tokenizer(args.tokenizer)
    tasks = TASK_SETS[args.tasks] or {t: 1.0 for t in vocab.TASK_TAGS}
    tmp = None
    files = args.shards
    if not files:
        tmp = Path(tempfile.mkdtemp(prefix="echat-bench-data-"))
        t0 = time.perf_counter()
        files = [str(make_shards(tmp, args.records))]
        print(f"made {args.records} synthetic records in {time.perf_counter() - t0:.1f} s under {tmp}")
    print(f"cores: {os.cpu_count()}, tasks: {args.tasks} ({len(tasks)}), max_frames_per_batch: {args.max_frames}")
    print(f"{'workers':>7} {'samples':>8} {'batches':>8} {'wall s':>7} {'1st s':>6} {'samples/s':>10} {'batches/s':>10} "
          f"{'audio h/h':>10} {'resume s':>9}")
    try:
        for workers in args.workers:
            r = run(files, tokenizer, tasks, workers, args.max_frames)
            resume = "" if r["resume_s"] is None else f"{r['resume_s']:.2f}"
            print(f"{workers:>7} {r['samples']:>8} {r['batches']:>8} {r['wall']:>7.1f} {r['first']:>6.2f} "
                  f"{r['samples'] / r['wall']:>10.1f} {r['batches'] / r['wall']:>10.2f} {r['audio_s'] / r['wall']:>10.0f} {resume:>9}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
