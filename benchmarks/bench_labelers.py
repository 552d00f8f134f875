"""Speed of the offline labeler stages on one core, and old vs new paths measured in the same run.

Run:
    .venv/bin/python benchmarks/bench_labelers.py                       # 60 s chain, 240 demo files
    .venv/bin/python benchmarks/bench_labelers.py --seconds 300 --demo 48 --repeat 3

1. The chain: one 22,050 Hz WAV of espeak-ng sentences (several voices, pauses between them) through
   decode -> vad -> asr -> gender -> emotion -> metrics, each under StageRunner in batches of its
   `batch_size`, as the build runs them (model loading in `setup` is timed apart). x real time per
   stage = seconds of audio in / seconds taken, wall and CPU. `gender` includes the pitch tracker
   (it computes `_f0` first); `emotion` and `metrics` reuse the cached `_f0`, as in the build. Also
   the pocketsphinx WER against the text that was spoken (the whole text: segments do not align
   with sentences).
2. On the demo corpus (`echat demo-data`, --demo files, decoded once), old against new in the same
   run, interleaved, best of --repeat:
     vad    the stage with silero's get_speech_timestamps per file (the path before batching)
            against the batched path: runtime jit at batch 8, 16 and 32, and runtime onnx; and the
            largest difference between their speech bounds;
     pitch  librosa.yin plus the voicing test (the tracker before) against `pitch.voiced_f0`, on
            the VAD segments, with their agreement on mean F0, F0 spread and gender;
     tts    EspeakTTS with max_in_flight 1, 2 and 4, the manifest lines as replies, no cache (wall
            time: espeak-ng runs as subprocesses, so in-flight replies use the other core).
Peak RSS of this process after each part.

BLAS, numba and torch are held to one thread.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
import time

# One thread for BLAS and numba: set before numpy (imported in the functions below) loads them.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "We need to buy some milk and bread at the store.",
    "My brother lives in a small house near the river.",
    "I am so happy that the weather is finally warm again.",
    "The meeting was moved to Thursday afternoon at three.",
    "She told me that the train would be late this evening.",
    "I could not find my keys anywhere this morning.",
)
VOICES = ("en+f3", "en+m3", "en+f5", "en+m7")
RATE = 22_050


def espeak(text: str, voice: str):
    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == RATE, rate
    return data


def make_file(path: str, seconds: float) -> str:
    """Sentences in turn (voices rotating) with 0.4-1.6 s pauses, until `seconds` are reached."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    parts, spoken, total, i = [], [], 0.0, 0
    while total < seconds:
        text = SENTENCES[i % len(SENTENCES)]
        speech = espeak(text, VOICES[i % len(VOICES)])
        pause = np.zeros(int(rng.uniform(0.4, 1.6) * RATE), np.float32)
        parts += [speech, pause]
        spoken.append(text)
        total += (len(speech) + len(pause)) / RATE
        i += 1
    sf.write(path, np.concatenate(parts), RATE, subtype="PCM_16")
    return " ".join(spoken)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def best_of(repeat: int, runs: dict):
    """Run each callable `repeat` times, interleaved (so a busy machine slows all alike); per name the
    last result and the best wall and CPU seconds."""
    best = {name: [None, float("inf"), float("inf")] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            result, wall, cpu = timed(fn)
            entry = best[name]
            entry[0], entry[1], entry[2] = result, min(entry[1], wall), min(entry[2], cpu)
    return best


def run_stage(stage, records: list[dict]) -> tuple[list[dict], int]:
    """(output records, rejects) of `records` through `stage` under StageRunner, batch by batch."""
    from echat.schemas.stage import Reject
    from echat.schemas.stage_runner import StageRunner

    runner = StageRunner(stage)
    size = max(1, stage.batch_size, stage.max_in_flight)
    produced, rejected = [], 0
    for start in range(0, len(records), size):
        for result in runner.run(records[start : start + size]):
            for out in [result] if isinstance(result, Reject) else result:
                if isinstance(out, Reject):
                    rejected += 1
                else:
                    produced.append(out)
    return produced, rejected


def voiced_f0_librosa(waveform, sample_rate: int = 16_000):
    """The pitch tracker before: librosa.yin over every frame, then the same voicing test."""
    import librosa
    import numpy as np
    from echat.labelers import pitch

    y = np.asarray(waveform, dtype=np.float32)
    if len(y) < pitch.FRAME_LENGTH:
        return np.zeros(0, dtype=np.float32)
    f0 = librosa.yin(y, fmin=pitch.FMIN_HZ, fmax=pitch.FMAX_HZ, sr=sample_rate, frame_length=pitch.FRAME_LENGTH,
                     hop_length=pitch.HOP_LENGTH, center=False)
    frames = librosa.util.frame(y, frame_length=pitch.FRAME_LENGTH, hop_length=pitch.HOP_LENGTH, axis=0)
    n = min(len(f0), len(frames))
    f0, frames = f0[:n], frames[:n]
    rms_db = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = (rms_db >= np.percentile(rms_db, 95) - pitch.VOICING_RANGE_DB) & (rms_db >= pitch.ABSOLUTE_FLOOR_DBFS)
    periods = np.rint(sample_rate / f0).astype(np.int64)
    width = pitch.FRAME_LENGTH - int(np.ceil(sample_rate / pitch.FMIN_HZ))
    head = frames[:, :width]
    shifted = frames[np.arange(n)[:, None], periods[:, None] + np.arange(width)[None, :]]
    num = np.sum(head * shifted, axis=1)
    den = np.sqrt(np.sum(head * head, axis=1) * np.sum(shifted * shifted, axis=1)) + 1e-12
    return f0[loud & (num / den >= pitch.MIN_PERIODICITY)].astype(np.float32)


def chain(seconds: float) -> None:
    import jiwer
    import soundfile as sf
    from echat.labelers.asr import PocketsphinxASR
    from echat.labelers.decode import DecodeAudio
    from echat.labelers.emotion import HeuristicEmotion
    from echat.labelers.gender import PitchGender
    from echat.labelers.metrics import AcousticMetrics
    from echat.labelers.vad import SileroVAD

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.wav")
        text = make_file(path, seconds)
        audio_s = sf.info(path).duration
        stages = [DecodeAudio(), SileroVAD(), PocketsphinxASR(), PitchGender(), HeuristicEmotion(), AcousticMetrics()]
        records: list[dict] = [{"source_uri": path, "source_dataset": "bench"}]
        print(f"== 1. the chain: {audio_s:.1f} s of espeak speech in one file, {len(text.split())} words; one thread\n")
        print(f"{'stage':<10}{'setup s':>9}{'records in':>12}{'audio s':>9}{'wall s':>9}{'x RT wall':>11}{'x RT cpu':>10}")
        for stage in stages:
            _, setup_s, _ = timed(stage.setup)
            seconds_in = sum(len(r["_waveform"]) / 16_000 if "_waveform" in r else audio_s for r in records)
            (produced, rejected), wall, cpu = timed(lambda: run_stage(stage, records))
            print(f"{stage.name:<10}{setup_s:>9.2f}{len(records):>12}{seconds_in:>9.1f}{wall:>9.3f}"
                  f"{seconds_in / wall:>11.0f}{seconds_in / cpu:>10.0f}" + (f"   ({rejected} rejected)" if rejected else ""))
            records = produced

    hypothesis = " ".join(r.get("transcript") or "" for r in records)
    reference = jiwer.RemovePunctuation()(text.lower())
    print(f"\n{len(records)} segments; pocketsphinx WER on the whole text: {jiwer.wer(reference, hypothesis):.1%}")


def demo_comparisons(n: int, repeat: int) -> None:
    import itertools
    import json

    import numpy as np
    from echat.labelers import pitch
    from echat.labelers.decode import DecodeAudio
    from echat.labelers.vad import SileroVAD
    from echat.schemas import vocab
    from echat.synth.demo_corpus import make_demo_corpus
    from echat.synth.espeak_tts import EspeakTTS

    class PerFileVAD(SileroVAD):  # the stage as it was: silero's get_speech_timestamps, file by file
        batch_size = 1

        def speech_spans_batch(self, waveforms):
            return [self.speech_spans(w) for w in waveforms]

    with tempfile.TemporaryDirectory() as tmp:
        make_demo_corpus(tmp, n=n, overwrite=True)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "manifest.jsonl"), encoding="utf-8")]
        files = [{"source_uri": os.path.join(tmp, row["path"]), "source_dataset": "demo", "transcript": row["text"],
                  "transcript_origin": "manifest", "language": row["language"]} for row in rows]
        decode = DecodeAudio()
        decode.setup()
        (decoded, _), wall, _ = timed(lambda: run_stage(decode, files))
    audio_s = sum(len(r["_waveform"]) for r in decoded) / 16_000
    print(f"\n== 2. the demo corpus: {len(decoded)} files, {audio_s:.1f} s of audio (decode {audio_s / wall:.0f}x); "
          f"one thread, best of {repeat}\n")

    # -- vad
    old = PerFileVAD()
    old.setup()
    variants = {"old: per file (get_speech_timestamps)": old}
    for runtime, sizes in (("jit", (8, 16, 32)), ("onnx", (16,))):
        for size in sizes:
            stage = SileroVAD(runtime=runtime)
            try:
                stage.setup()
            except ImportError as exc:
                print(f"(vad runtime {runtime} skipped: {exc})")
                break
            stage.batch_size = size
            default = (runtime, size) == ("jit", SileroVAD.batch_size)
            variants[f"new: {runtime}, batch {size}" + (" (default)" if default else "")] = stage
    best = best_of(repeat, {name: (lambda s=stage: run_stage(s, decoded)) for name, stage in variants.items()})
    reference = best[next(iter(variants))]
    segments = reference[0][0]
    print(f"{'vad':<42}{'wall s':>8}{'x RT wall':>11}{'x RT cpu':>10}{'vs old':>8}   segments, worst bound difference")
    for name, (result, wall, cpu) in best.items():
        outputs = result[0]
        same_count = len(outputs) == len(segments)
        worst = max((max(abs(a["segment_start"] - b["segment_start"]), abs(a["segment_end"] - b["segment_end"]))
                     for a, b in zip(segments, outputs)), default=0.0) if same_count else float("nan")
        print(f"{name:<42}{wall:>8.2f}{audio_s / wall:>11.0f}{audio_s / cpu:>10.0f}{reference[2] / cpu:>7.1f}x"
              f"   {len(outputs)}, {worst * 1000:.1f} ms")

    # -- pitch, on the segments
    waveforms = [s["_waveform"] for s in segments]
    seg_s = sum(len(w) for w in waveforms) / 16_000
    pitch.warm_up()
    voiced_f0_librosa(waveforms[0])  # librosa's numba kernels compile (or load) here, not in the timing
    best = best_of(repeat, {
        "old: librosa.yin + voicing": lambda: [voiced_f0_librosa(w) for w in waveforms],
        "new: pitch.voiced_f0": lambda: [pitch.voiced_f0(w) for w in waveforms],
    })
    (ref_f0, _, ref_cpu), (new_f0, _, _) = best.values()
    print(f"\n{'pitch (' + str(len(waveforms)) + ' segments, ' + format(seg_s, '.0f') + ' s)':<42}"
          f"{'wall s':>8}{'x RT wall':>11}{'x RT cpu':>10}{'vs old':>8}")
    for name, (_, wall, cpu) in best.items():
        print(f"{name:<42}{wall:>8.2f}{seg_s / wall:>11.0f}{seg_s / cpu:>10.0f}{ref_cpu / cpu:>7.1f}x")
    both = [(a, b) for a, b in zip(ref_f0, new_f0) if len(a) and len(b)]
    d_mean = np.array([abs(float(np.mean(a)) - float(np.mean(b))) for a, b in both])
    d_std = np.array([abs(float(np.std(a)) - float(np.std(b))) for a, b in both])
    identical = sum(len(a) == len(b) and np.allclose(a, b, rtol=1e-4) for a, b in zip(ref_f0, new_f0))
    gender_same = sum((np.median(a) < 150) == (np.median(b) < 150) for a, b in both)
    print(f"agreement: voiced frames and F0 identical on {identical}/{len(waveforms)} segments; |mean F0 old - new| "
          f"mean {d_mean.mean():.3f} Hz, max {d_mean.max():.2f} Hz; |F0 std| max {d_std.max():.2f} Hz; "
          f"gender (median F0 < 150 Hz) the same on {gender_same}/{len(both)}")

    # -- tts
    emotions = itertools.cycle(vocab.REPLY_EMOTIONS)
    replies = [{"id": str(i), "reply_text": row["text"], "reply_emotion": next(emotions), "language": row["language"]}
               for i, row in enumerate(rows)]
    stages = {}
    for in_flight in (1, 2, 4):
        stage = EspeakTTS()
        stage.setup()
        stage.max_in_flight = in_flight
        stages[f"max_in_flight {in_flight}" + (" (default)" if in_flight == EspeakTTS.max_in_flight else "")] = stage
    best = best_of(repeat, {name: (lambda s=stage: run_stage(s, replies)) for name, stage in stages.items()})
    spoken = sum(r["reply_duration"] for r in next(iter(best.values()))[0][0])
    first_wall = next(iter(best.values()))[1]
    print(f"\n{'tts (' + str(len(replies)) + ' replies, ' + format(spoken, '.0f') + ' s spoken)':<42}"
          f"{'wall s':>8}{'x RT wall':>11}{'vs 1':>8}")
    for name, (_, wall, _) in best.items():
        print(f"{name:<42}{wall:>8.2f}{spoken / wall:>11.0f}{first_wall / wall:>7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the chain's test file (0: skip the chain)")
    parser.add_argument("--demo", type=int, default=240, help="files of the demo corpus for the comparisons (0: skip)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each comparison, interleaved; the best counts")
    args = parser.parse_args()

    import resource

    import torch

    torch.set_num_threads(1)
    def peak_rss(after: str) -> None:
        print(f"\npeak RSS after {after}: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    peak_rss("start-up")
    if args.seconds > 0:
        chain(args.seconds)
        peak_rss("the chain")
    if args.demo > 0:
        demo_comparisons(args.demo, args.repeat)
        peak_rss("the demo comparisons")


if __name__ == "__main__":
    main()
