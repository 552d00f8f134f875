"""Speed of the offline TTS engine and of the reply back-check, on one core.

Run:
    .venv/bin/python benchmarks/bench_tts.py                 # 48 replies, 24 synthetic queries
    .venv/bin/python benchmarks/bench_tts.py --replies 96 --queries 48

The process (and the espeak-ng subprocesses it starts) is pinned to one CPU, BLAS to one thread.
x real time = seconds of audio made or checked / wall seconds taken.
1. espeak-ng replies: EspeakTTS (the `tts` stage's offline backend) speaking the demo corpus's lines
   as replies (English, and Mandarin through pinyin), each in a reply emotion's prosody, one at a
   time, no cache, resampled to 16 kHz as the stage does.
2. espeak-ng synthetic queries: `echat synth-queries`' rendering (voice by age and gender, emotion
   prosody, formant shift, tremolo, synthesised events mixed in), one query at a time, line bank text.
3. the back-check: ReplyBackCheck with pocketsphinx on the English replies of part 1, and the WER
   it measures against the reply text (the matching text) and against another reply's text (a reply
   that says something else): the gap between the two is what `max_error` can separate.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPLY_EMOTIONS = ("NEUTRAL", "WORRIED", "HAPPY", "SORRY", "SURPRISE", "CURIOUS")


def pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def replies(n: int) -> list[tuple[str, str, str]]:
    """(text, language, reply emotion): demo lines, three English to one Mandarin."""
    from echat.synth.demo_corpus import load_spec

    spec = load_spec()
    en, zh = [l.text for l in spec.lines["en"]], [l.text for l in spec.lines["zh"]]
    out = []
    for i in range(n):
        language = "zh" if i % 4 == 3 else "en"
        pool = zh if language == "zh" else en
        out.append((pool[i % len(pool)], language, REPLY_EMOTIONS[i % len(REPLY_EMOTIONS)]))
    return out


def bench_espeak(items):
    from echat.synth.espeak_tts import EspeakTTS

    stage = EspeakTTS()
    stage.setup()
    stage.speak("warm up", "en", "NEUTRAL")
    stage.speak("你好", "zh", "NEUTRAL")
    rows, waves = {}, []
    for language in ("en", "zh"):
        chosen = [it for it in items if it[1] == language]
        wall, cpu, audio = time.perf_counter(), cpu_seconds(), 0.0
        for text, lang, emotion in chosen:
            wave = stage.speak(text, lang, emotion)
            audio += wave.size / 16_000
            if lang == "en":
                waves.append((text, wave))
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        rows[language] = (len(chosen), audio, wall, cpu)
    return rows, waves


def bench_queries(n: int):
    from echat.pipelines.profile import load_profile
    from echat.synth.queries import make_queries

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile("local", [f"cache_dir={tmp}/cache"])
        make_queries(f"{tmp}/warm", 2, profile=profile, jobs=1)
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = make_queries(f"{tmp}/q", n, profile=profile, jobs=1)
        return summary["count"], summary["seconds"], time.perf_counter() - wall, cpu_seconds() - cpu


def bench_check(waves):
    """Decode each reply once (timed), then score the hypothesis against its own and another text."""
    from echat.synth.reply_check import ReplyBackCheck, error_rate

    stage = ReplyBackCheck(asr_backend="pocketsphinx")
    stage.setup()
    stage.transcribe(waves[0][1], "en")
    hypotheses = []
    wall, cpu, audio = time.perf_counter(), cpu_seconds(), 0.0
    for text, wave in waves:
        hypotheses.append(stage.transcribe(wave, "en"))
        audio += wave.size / 16_000
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    matching = [error_rate(text, hyp, "en") for (text, _), hyp in zip(waves, hypotheses)]
    other = [error_rate(waves[(i + len(waves) // 2) % len(waves)][0], hyp, "en") for i, hyp in enumerate(hypotheses)]
    return len(waves), audio, wall, cpu, matching, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=48)
    parser.add_argument("--queries", type=int, default=24)
    args = parser.parse_args()
    cpu = pin_one_core()
    print(f"one core (cpu {cpu}); {args.replies} replies, {args.queries} synthetic queries")
    print(f"{'engine':40s} {'items':>6s} {'audio s':>8s} {'wall s':>7s} {'cpu s':>6s} {'x real time':>12s}")

    def line(name, n, audio, wall, cpu_s):
        print(f"{name:40s} {n:6d} {audio:8.1f} {wall:7.2f} {cpu_s:6.2f} {audio / wall:12.1f}")

    rows, waves = bench_espeak(replies(args.replies))
    for language, (n, audio, wall, cpu_s) in rows.items():
        line(f"espeak-ng replies ({language})", n, audio, wall, cpu_s)
    line("espeak-ng synthetic queries (en+zh)", *bench_queries(args.queries))
    n, audio, wall, cpu_s, matching, other = bench_check(waves)
    line("back-check: pocketsphinx (en)", n, audio, wall, cpu_s)
    print(f"back-check WER against the reply's own text:  median {statistics.median(matching):.2f}, "
          f"mean {statistics.mean(matching):.2f}, max {max(matching):.2f}")
    print(f"back-check WER against another reply's text:  median {statistics.median(other):.2f}, "
          f"mean {statistics.mean(other):.2f}, min {min(other):.2f}")
    kept = sum(e <= 0.9 for e in matching) / len(matching)
    caught = sum(e > 0.9 for e in other) / len(other)
    print(f"max_error 0.9 would keep {kept:.0%} of matching replies and reject {caught:.0%} of mismatched ones")


if __name__ == "__main__":
    main()
