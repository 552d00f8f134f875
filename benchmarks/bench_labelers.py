"""Speed of the offline labeler stages on about 60 s of espeak speech, on one core.

Run:
    .venv/bin/python benchmarks/bench_labelers.py            # ~60 s of speech
    .venv/bin/python benchmarks/bench_labelers.py --seconds 300

Builds one 22,050 Hz WAV file of espeak-ng sentences (several voices, pauses between them),
then runs decode -> vad -> asr -> gender -> emotion -> metrics with `run_stages`-style calls,
timing each stage's `process` over all its records (model loading in `setup` is timed apart).
Prints x real time per stage: seconds of audio in / seconds of wall time. BLAS, numba and torch
are held to one thread. `gender` includes the pitch tracker (it computes `_f0` first); `emotion`
and `metrics` reuse the cached `_f0`, as they do in the build. Also prints the pocketsphinx WER
against the text that was spoken (segments do not align with sentences, so the whole text is
compared).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test file")
    args = parser.parse_args()

    import soundfile as sf
    import torch

    torch.set_num_threads(1)
    from echat.labelers.asr import PocketsphinxASR
    from echat.labelers.decode import DecodeAudio
    from echat.labelers.emotion import HeuristicEmotion
    from echat.labelers.gender import PitchGender
    from echat.labelers.metrics import AcousticMetrics
    from echat.labelers.vad import SileroVAD
    from echat.schemas.stage import Reject

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.wav")
        text = make_file(path, args.seconds)
        audio_s = sf.info(path).duration
        stages = [DecodeAudio(), SileroVAD(), PocketsphinxASR(), PitchGender(), HeuristicEmotion(), AcousticMetrics()]
        records: list[dict] = [{"source_uri": path, "source_dataset": "bench"}]
        print(f"{audio_s:.1f} s of espeak speech, {len(text.split())} words; one thread\n")
        print(f"{'stage':<10}{'setup s':>9}{'records in':>12}{'audio s':>9}{'wall s':>9}{'x real time':>13}")
        for stage in stages:
            t0 = time.perf_counter()
            stage.setup()
            setup_s = time.perf_counter() - t0
            seconds_in = sum(len(r["_waveform"]) / 16_000 if "_waveform" in r else audio_s for r in records)
            produced, rejected = [], 0
            t0 = time.perf_counter()
            for record in records:
                for out in stage.process(record):
                    if isinstance(out, Reject):
                        rejected += 1
                    else:
                        produced.append(out)
            wall = time.perf_counter() - t0
            print(f"{stage.name:<10}{setup_s:>9.2f}{len(records):>12}{seconds_in:>9.1f}{wall:>9.3f}{seconds_in / wall:>13.0f}"
                  + (f"   ({rejected} rejected)" if rejected else ""))
            records = produced

    import jiwer

    hypothesis = " ".join(r.get("transcript") or "" for r in records)
    reference = jiwer.RemovePunctuation()(text.lower())
    print(f"\n{len(records)} segments; pocketsphinx WER on the whole text: {jiwer.wer(reference, hypothesis):.1%}")


if __name__ == "__main__":
    main()
