"""Accuracy of the offline labelers against the demo corpus' ground truth, and their speed on one core.

Run:
    .venv/bin/python benchmarks/bench_label_accuracy.py                    # 240 files, both builds
    .venv/bin/python benchmarks/bench_label_accuracy.py --n 480 --corpus /tmp/demo480 --builds fast

The demo corpus (`echat demo-data`, made in --corpus unless a manifest is already there) knows every
file's text, language, voice, gender, intended emotion and coughs. Its files are decoded once, with
the manifest's text and language given (as a build that trusts those fields does) and no labels, and
cut by silero-vad (a transcribed file stays whole); then, one thread, CPU time of this process:
  pitch     the F0 tracker, once per segment (`_f0`, shared by gender, age, emotion, metrics)
  gender    PitchGender: accuracy on the segments it labels, how many it leaves unknown, accuracy by
            score bin, by voice; voices whose audio does not match their manifest gender (espeak-ng
            ignoring a variant) are scored apart
  age       PitchAge: every demo voice is an adult espeak voice (espeak-ng has no child voice and the
            manifest no age), so: adult (right), child (wrong), unknown
  emotion   HeuristicEmotion against the intended emotion, beside the majority-class baseline
  events    HeuristicEvents, cough precision and recall per file, on silero segments, webrtc VAD
            segments and whole files (silero leaves the demo's coughs out of its segments)
  vad       WebrtcVAD against silero: x real time, segments per file, bound differences
  asr       PocketsphinxASR on the English files with no transcript (the raw-speech path: VAD cuts at
            the pauses, ASR fills each piece), WER per preset (accurate, fast) against the manifest
Then the raw-speech offline build: `echat build --profile local` on a folder of the English audio (no
manifest), one worker in memory, TTS one request in flight (so the build uses one core), per ASR
preset in --builds: x real time (wall, as the summary gives it), the stage table, and the WER of the
rows against the manifest (pieces of a file joined in order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

MIN_FILES = 240


def cpu(fn):
    started = time.process_time()
    result = fn()
    return result, time.process_time() - started


def run_stage(stage, records):
    """Outputs (records only) of `records` through `stage` under StageRunner, batch by batch."""
    from echat.schemas.stage import Reject
    from echat.schemas.stage_runner import StageRunner

    runner = StageRunner(stage)
    size = max(1, stage.batch_size)
    produced = []
    for start in range(0, len(records), size):
        for result in runner.run(records[start : start + size]):
            produced.extend(o for o in ([result] if isinstance(result, Reject) else result) if not isinstance(o, Reject))
    return produced


def seconds_of(records) -> float:
    return sum(len(r["_waveform"]) for r in records) / 16_000


def pct(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "n/a"


def espeak_bytes(voice: str, text: str = "Hello, how are you today?") -> bytes:
    return subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout


def base_voice_gender(language: str) -> str | None:
    listing = subprocess.run(["espeak-ng", f"--voices={language}"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == language:
            return {"M": "male", "F": "female"}.get(fields[2].split("/")[-1])
    return None


def voices_not_as_labelled(rows) -> dict[str, str]:
    """{voice: why} for manifest voices whose audio is their language's own voice (the variant was
    ignored) and that voice has the other gender."""
    wrong = {}
    for voice, gender in {row["speaker"]: row["gender"] for row in rows}.items():
        base, _, variant = voice.partition("+")
        if variant and espeak_bytes(voice) == espeak_bytes(base):
            heard = base_voice_gender(base)
            if heard not in (None, gender):
                wrong[voice] = f"byte-identical to {base} ({heard}); the manifest says {gender}"
    return wrong


def prepare(folder: Path, n: int):
    from echat.labelers.decode import DecodeAudio
    from echat.labelers.vad import SileroVAD
    from echat.synth.demo_corpus import make_demo_corpus

    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        print(f"making the demo corpus: {n} files in {folder}")
        make_demo_corpus(folder, n=n)
    rows = [json.loads(line) for line in manifest.read_text("utf-8").splitlines()][:n]
    if len(rows) < n:
        raise SystemExit(f"{manifest} has {len(rows)} files, fewer than --n {n}")
    truth = {str(folder / row["path"]): row for row in rows}
    records = [{"source_uri": uri, "source_dataset": "demo", "transcript": row["text"], "transcript_origin": "manifest",
                "language": row["language"], "language_origin": "manifest"} for uri, row in truth.items()]
    decode = DecodeAudio()
    decode.setup()
    decoded, decode_s = cpu(lambda: run_stage(decode, records))
    vad = SileroVAD()
    vad.setup()
    segments, vad_s = cpu(lambda: run_stage(vad, decoded))
    audio_s = seconds_of(decoded)
    print(f"{len(decoded)} files, {audio_s:.0f} s of audio (decode {audio_s / decode_s:.0f}x real time, silero "
          f"{audio_s / vad_s:.0f}x); {len(segments)} segments, {seconds_of(segments):.0f} s\n")
    return rows, truth, decoded, segments


def bench_pitch(segments):
    from echat.labelers import pitch

    pitch.warm_up()
    seconds = seconds_of(segments)
    _, spent = cpu(lambda: [pitch.f0_of(r) for r in segments])  # cached on the records from here on
    print(f"== pitch (F0 once per segment, shared by gender, age, emotion, metrics): {seconds / spent:.0f}x real time\n")


def bench_gender(segments, truth, not_as_labelled):
    from echat.labelers.gender import PitchGender

    stage = PitchGender()
    stage.setup()
    outputs, spent = cpu(lambda: run_stage(stage, segments))
    seconds = seconds_of(segments)
    print(f"== gender: PitchGender (min_score {stage.min_score}, center {stage.threshold_hz:g} Hz, "
          f"slope {stage.slope_per_octave:g}/octave): {seconds / spent:.0f}x real time (F0 cached)")
    for voice, why in not_as_labelled.items():
        print(f"  ground truth check: {voice} is {why}: scored apart")
    heard = [o for o in outputs if truth[o["source_uri"]]["speaker"] not in not_as_labelled]
    apart = [o for o in outputs if truth[o["source_uri"]]["speaker"] in not_as_labelled]
    for name, group in (("voices as labelled", heard), ("all voices, manifest as given", outputs), ("voices not as labelled", apart)):
        if not group:
            continue
        labelled = [o for o in group if o.get("gender")]
        right = sum(o["gender"] == truth[o["source_uri"]]["gender"] for o in labelled)
        unknown = len(group) - len(labelled)
        print(f"  {name:<32} {len(group):>4} segments: labelled {len(labelled)}, accuracy {pct(right, len(labelled))}; "
              f"unknown {unknown} ({pct(unknown, len(group))})")
    print("  by score (voices as labelled):   bin        n   mean score  accuracy")
    bins = [(0.75, 0.8), (0.8, 0.9), (0.9, 1.01)]
    for lo, hi in bins:
        inside = [o for o in heard if o.get("gender") and lo <= o["gender_score"] < hi]
        if inside:
            mean = sum(o["gender_score"] for o in inside) / len(inside)
            right = sum(o["gender"] == truth[o["source_uri"]]["gender"] for o in inside)
            print(f"{'':>35}{lo:.2f}-{min(hi, 0.95):.2f} {len(inside):>5} {mean:>10.3f}  {pct(right, len(inside)):>8}")
    print("  by voice:")
    by_voice = defaultdict(list)
    for o in outputs:
        by_voice[truth[o["source_uri"]]["speaker"]].append(o)
    for voice, group in sorted(by_voice.items()):
        labelled = [o for o in group if o.get("gender")]
        right = sum(o["gender"] == truth[o["source_uri"]]["gender"] for o in labelled)
        print(f"    {voice:<22} {truth[group[0]['source_uri']]['gender']:<7} {len(group):>4} segments, labelled "
              f"{len(labelled):>4}, right {right:>4}, unknown {len(group) - len(labelled):>3}")
    print()


def bench_age(segments, truth):
    from echat.labelers.age import PitchAge

    stage = PitchAge()
    stage.setup()
    outputs, spent = cpu(lambda: run_stage(stage, segments))
    ages = Counter(o.get("age") or "unknown" for o in outputs)
    labelled = ages["adult"] + ages["child"] + ages["old"]
    print(f"== age: PitchAge: {seconds_of(segments) / spent:.0f}x real time (F0 cached); every demo voice is an adult")
    print(f"  {len(outputs)} segments: adult {ages['adult']}, child {ages['child']}, old {ages['old']}, unknown "
          f"{ages['unknown']} ({pct(ages['unknown'], len(outputs))}); accuracy of those labelled {pct(ages['adult'], labelled)}")
    by_gender = Counter((truth[o["source_uri"]]["gender"], o.get("age") or "unknown") for o in outputs)
    print(f"  by manifest gender: {dict(sorted(by_gender.items()))}\n")


def bench_emotion(segments, truth):
    from echat.labelers.emotion import HeuristicEmotion

    stage = HeuristicEmotion()
    stage.setup()
    outputs, spent = cpu(lambda: run_stage(stage, segments))
    reference = [truth[o["source_uri"]]["emotion"] for o in outputs]
    right = sum(o["emotion"] == ref for o, ref in zip(outputs, reference))
    majority, majority_n = Counter(reference).most_common(1)[0]
    print(f"== emotion: HeuristicEmotion (transcript keywords + prosody): {seconds_of(segments) / spent:.0f}x real time (F0 cached)")
    print(f"  accuracy {pct(right, len(outputs))} of {len(outputs)} (always '{majority}': {pct(majority_n, len(outputs))}); "
          f"mean score {sum(o['emotion_score'] for o in outputs) / len(outputs):.2f}; unknown 0 (it always labels)")
    for language in ("en", "zh"):
        pairs = [(o, ref) for o, ref in zip(outputs, reference) if truth[o["source_uri"]]["language"] == language]
        print(f"  {language}: accuracy {pct(sum(o['emotion'] == ref for o, ref in pairs), len(pairs))} of {len(pairs)}")
    print("  recall by emotion: " + ", ".join(
        f"{e} {pct(sum(o['emotion'] == e for o, ref in zip(outputs, reference) if ref == e), reference.count(e))}"
        for e in sorted(set(reference))))
    print()


def bench_events(decoded, segments, truth):
    from echat.labelers.events import HeuristicEvents
    from echat.labelers.webrtc_vad import WebrtcVAD

    stage = HeuristicEvents()
    stage.setup()
    webrtc = WebrtcVAD()
    webrtc.setup()
    cut = run_stage(webrtc, decoded)
    print("== events: HeuristicEvents (transcript tags + isolated cough bursts); truth: the file has a cough")
    for name, records in (("silero segments", segments), ("webrtc segments", cut), ("whole files", decoded)):
        outputs, spent = cpu(lambda records=records: run_stage(stage, records))
        found = defaultdict(bool)
        for o in outputs:
            found[o["source_uri"]] |= "cough" in (o.get("events") or [])
        tp = sum(found[u] and bool(truth[u]["events"]) for u in found)
        fp = sum(found[u] and not truth[u]["events"] for u in found)
        fn = sum(not found[u] and bool(truth[u]["events"]) for u in found)
        other = Counter(e for o in outputs for e in (o.get("events") or []) if e != "cough")
        print(f"  {name:<16} {len(outputs):>4} records: coughs found {tp}, missed {fn}, false alarms {fp}; precision "
              f"{pct(tp, tp + fp)}, recall {pct(tp, tp + fn)}; other events {dict(other) or 'none'}; "
              f"{seconds_of(records) / spent:.0f}x real time")
    print()


def bench_vad(decoded, truth):
    import numpy as np
    from echat.labelers.vad import SileroVAD
    from echat.labelers.webrtc_vad import WebrtcVAD

    raw = [{**r, "transcript": None, "transcript_origin": None} for r in decoded]
    results = {}
    for name, stage in (("silero", SileroVAD()), ("webrtc", WebrtcVAD())):
        stage.setup()
        results[name] = cpu(lambda stage=stage: run_stage(stage, raw))
    seconds = seconds_of(decoded)
    print("== vad on the files without their transcripts (cut at pauses):")
    for name, (outputs, spent) in results.items():
        print(f"  {name:<7} {len(outputs)} segments, {seconds / spent:.0f}x real time")
    by = {name: defaultdict(list) for name in results}
    for name, (outputs, _) in results.items():
        for o in outputs:
            by[name][o["source_uri"]].append((o["segment_start"], o["segment_end"]))
    same = [u for u in by["silero"] if len(by["silero"][u]) == len(by["webrtc"].get(u, []))]
    clean = [max(abs(a[0] - b[0]), abs(a[1] - b[1])) for u in same if not truth[u]["events"]
             for a, b in zip(by["silero"][u], by["webrtc"][u])]
    print(f"  same number of segments on {len(same)}/{len(by['silero'])} files; bound difference on files without a "
          f"cough: median {np.median(clean) * 1000:.0f} ms, 95th percentile {np.percentile(clean, 95) * 1000:.0f} ms, "
          f"worst {max(clean) * 1000:.0f} ms (webrtc keeps the coughs in its segments)\n")


def wer_of(hypotheses: dict[str, str], truth) -> float:
    from echat.schemas.scoring import ErrorRate

    score = ErrorRate("en")
    for uri, text in hypotheses.items():
        score.add(truth[uri]["text"], text)
    return score.report()["wer"]


def bench_asr(decoded, truth):
    from echat.labelers.asr import PRESETS, PocketsphinxASR
    from echat.labelers.vad import SileroVAD

    english = [{**r, "transcript": None, "transcript_origin": None} for r in decoded if r["language"] == "en"]
    vad = SileroVAD()
    vad.setup()
    pieces = run_stage(vad, english)
    seconds = seconds_of(pieces)
    print(f"== asr: pocketsphinx on {len(english)} English files with no transcript, {len(pieces)} VAD pieces, {seconds:.0f} s")
    for preset in PRESETS:
        stage = PocketsphinxASR(preset=preset)
        stage.setup()
        outputs, spent = cpu(lambda stage=stage: run_stage(stage, pieces))
        text = defaultdict(list)
        for o in sorted(outputs, key=lambda o: (o["source_uri"], o["segment_start"])):
            text[o["source_uri"]].append(o.get("transcript") or "")
        print(f"  preset {preset:<9} {seconds / spent:5.1f}x real time   WER {wer_of({u: ' '.join(t) for u, t in text.items()}, truth):.1%}"
              f"   {PRESETS[preset] or '(pocketsphinx defaults)'}")
    print()


def bench_build(folder: Path, rows, presets: list[str]):
    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile

    english = [row for row in rows if row["language"] == "en"]
    work = Path(tempfile.mkdtemp(prefix="echat-rawbuild-"))
    try:
        audio = work / "audio"
        audio.mkdir()
        for row in english:
            os.symlink(folder / row["path"], audio / Path(row["path"]).name)
        truth = {Path(row["path"]).name: row for row in english}
        for preset in presets:
            cache = work / f"cache-{preset}"
            profile = load_profile("local", [f"cache_dir={cache}", f"asr.params.preset={preset}", "tts.max_in_flight=1"])
            summary = build(profile, str(audio), str(work / f"out-{preset}"), overwrite=True,
                            beam_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"])
            import pyarrow.parquet as pq

            rows_out = []
            for shard in sorted((work / f"out-{preset}" / "data").glob("*.parquet")):
                rows_out.extend(pq.read_table(shard, columns=["source_uri", "segment_start", "transcript"]).to_pylist())
            text = defaultdict(list)
            for r in sorted(rows_out, key=lambda r: (r["source_uri"], r["segment_start"])):
                text[Path(r["source_uri"]).name].append(r["transcript"] or "")
            by_name = {name: {"text": row["text"]} for name, row in truth.items()}
            wer = wer_of({name: " ".join(text.get(name, [])) for name in truth}, by_name)
            audio_s = summary["inputs"]["audio_hours"] * 3600
            print(f"== raw-speech build (no manifest), ASR preset {preset}: {len(english)} English files, {audio_s:.0f} s; "
                  f"{summary['outputs']['rows']} rows; wall {summary['wall_seconds']:.0f} s -> {summary['x_real_time']}x real time "
                  f"(target >= 10); WER of the rows {wer:.1%} (files missing from the shards count as all deleted)")
            print(f"  {'stage':<10} {'in':>5} {'out':>5} {'rej':>4} {'busy s':>8} {'x RT':>8}")
            for stage, s in summary["stages"].items():
                xrt = "" if s.get("x_real_time") is None else f"{s['x_real_time']:.1f}"
                print(f"  {stage:<10} {s['in']:>5} {s['out']:>5} {s['rejected']:>4} {s['busy_seconds']:>8.2f} {xrt:>8}")
            print()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=MIN_FILES, help=f"demo files (at least {MIN_FILES})")
    parser.add_argument("--corpus", help="folder of the demo corpus (made there when it has no manifest); default: a temp dir")
    parser.add_argument("--builds", default="fast,accurate", help="ASR presets to run the raw-speech build with ('' for none)")
    parser.add_argument("--skip-asr", action="store_true", help="skip the pocketsphinx WER part")
    args = parser.parse_args()
    if args.n < MIN_FILES:
        print(f"note: --n {args.n} is below the {MIN_FILES} files the figures are quoted on")

    import torch

    torch.set_num_threads(1)
    temp = None
    if args.corpus:
        folder = Path(args.corpus)
    else:
        temp = folder = Path(tempfile.mkdtemp(prefix="echat-demo-"))
    try:
        rows, truth, decoded, segments = prepare(folder, args.n)
        not_as_labelled = voices_not_as_labelled(rows)
        bench_pitch(segments)
        bench_gender(segments, truth, not_as_labelled)
        bench_age(segments, truth)
        bench_emotion(segments, truth)
        bench_events(decoded, segments, truth)
        bench_vad(decoded, truth)
        if not args.skip_asr:
            bench_asr(decoded, truth)
        presets = [p for p in args.builds.split(",") if p]
        if presets:
            bench_build(folder, rows, presets)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
