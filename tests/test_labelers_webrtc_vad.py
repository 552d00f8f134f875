"""WebRTC's VAD as a second offline VAD: its segments against silero's on the demo corpus, its frame
decisions turned into spans, and the cutting rules it shares with SileroVAD; under StageRunner."""

from __future__ import annotations

import subprocess
import sys

import labelers_demo_support as demo
import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.webrtc_vad import WebrtcVAD
from echat.pipelines.backends import stage_class
from echat.schemas.stage import Reject
from echat.schemas.stage_runner import run_stages

SR = speech.SR
TOLERANCE_S = 0.2


@pytest.fixture(scope="module")
def webrtc() -> WebrtcVAD:
    stage = WebrtcVAD()
    stage.setup()
    return stage


def by_file(outputs):
    found = {}
    for o in outputs:
        found.setdefault(o["source_uri"], []).append((o["segment_start"], o["segment_end"]))
    return found


@pytest.mark.parametrize("transcribed", [True, False], ids=["transcribed-whole", "raw-split"])
def test_segments_agree_with_silero_on_the_demo_corpus(webrtc, transcribed):
    from echat.labelers.vad import SileroVAD

    truth = demo.truth()
    files = [r if transcribed else {**r, "transcript": None, "transcript_origin": None} for r in demo.decoded()]
    silero = SileroVAD()
    silero.setup()
    theirs, their_rejects = run_stages([silero], files)
    ours, our_rejects = run_stages([webrtc], files)
    a, b = by_file(theirs), by_file(ours)
    assert a.keys() == b.keys() and len(their_rejects) == len(our_rejects)
    worst_clean, cough_files = 0.0, 0
    for uri, segments in a.items():
        assert len(b[uri]) == len(segments), uri  # measured: the same count on every file
        if truth[uri]["events"]:
            # WebRTC calls the cough-like burst speech, silero does not: its segment holds silero's
            cough_files += 1
            assert all(x0 <= y0 + TOLERANCE_S and y1 <= x1 + TOLERANCE_S for (x0, x1), (y0, y1) in zip(b[uri], segments)), uri
            continue
        for (x0, x1), (y0, y1) in zip(b[uri], segments):
            worst_clean = max(worst_clean, abs(x0 - y0), abs(x1 - y1))
    print(f"\n{len(a)} files, {cough_files} with a cough; worst bound difference on the others {worst_clean * 1000:.0f} ms")
    # Measured on 120 demo files, mode 3: median 26 ms, 95th percentile 76 ms, worst 138 ms.
    assert worst_clean < TOLERANCE_S


def test_frame_decisions_become_spans_by_the_pause_and_blip_rules():
    stage = WebrtcVAD(frame_ms=30, min_silence_s=0.3, min_speech_s=0.25)
    decisions = np.zeros(100, dtype=np.float32)
    decisions[10:30] = 1  # 0.6 s of speech
    decisions[35:50] = 1  # after a 0.15 s pause: the same span
    decisions[70:75] = 1  # 0.15 s blip after a long pause: dropped
    decisions[85:100] = 1  # 0.45 s to the end
    assert stage.spans_from_decisions(decisions) == [(0.3, 1.5), (2.55, 3.0)]
    assert stage.spans_from_decisions(np.zeros(10, dtype=np.float32)) == []


def test_it_cuts_and_rejects_as_silero_does(webrtc):
    a, b = speech.say(speech.SENTENCES[0]), speech.say(speech.SENTENCES[1], "en+m3")
    waveform = np.concatenate([speech.silence(0.5), a, speech.silence(2.0), b, speech.silence(0.5)])
    outputs = speech.run_stage(webrtc, {"source_uri": "x.wav", "_waveform": waveform, "sampling_rate": SR})
    assert len(outputs) == 2 and all(not isinstance(o, Reject) for o in outputs)
    assert outputs[0]["segment_end"] < outputs[1]["segment_start"] and outputs[0]["_speech_spans"]
    (silent,) = speech.run_stage(webrtc, {"source_uri": "s.wav", "_waveform": speech.silence(2.0), "sampling_rate": SR})
    assert isinstance(silent, Reject) and silent.reason == "no_speech"
    assert webrtc.describe() == "webrtcvad-mode3"
    assert stage_class("vad", "webrtc") is WebrtcVAD
    with pytest.raises(ValueError, match="mode"):
        WebrtcVAD(mode=4)
    with pytest.raises(ValueError, match="frame_ms"):
        WebrtcVAD(frame_ms=25)


def test_it_runs_without_torch():
    code = ("import sys, numpy as np; from echat.labelers.webrtc_vad import WebrtcVAD; v = WebrtcVAD(); v.setup(); "
            "v.speech_spans(np.zeros(16000, np.float32)); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
