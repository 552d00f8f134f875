"""The offline labelers chained with `run_stages`, as the build runs them, on espeak files."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import test_labelers_support as speech
from echat.labelers.asr import PocketsphinxASR
from echat.labelers.decode import DecodeAudio
from echat.labelers.emotion import HeuristicEmotion
from echat.labelers.gender import PitchGender
from echat.labelers.metrics import METRIC_FIELDS, AcousticMetrics
from echat.labelers.vad import SPLIT_FLAG, SileroVAD
from echat.schemas.record import FIELDS_BY_NAME, SAMPLE_RATE
from echat.schemas.stage_runner import run_stages
from echat.schemas.vocab import EMOTIONS, GENDERS


def write_native(path, text, voice, gap_text=None):
    """An espeak file at 22,050 Hz (stereo when `gap_text` is given: two sentences, 2 s apart)."""
    data, rate = speech.espeak_native(text, voice)
    if gap_text is not None:
        second, _ = speech.espeak_native(gap_text, voice)
        data = np.concatenate([data, np.zeros(2 * rate, np.float32), second])
        data = np.stack([data, data * 0.8], axis=1)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return str(path)


def test_chain_labels_files_and_accounts_for_everything(tmp_path):
    manifest_file = write_native(tmp_path / "manifest.wav", "I am so happy to see you again today.", "en+f3")
    split_file = write_native(tmp_path / "split.wav", speech.SENTENCES[0], "en+m3", gap_text=speech.SENTENCES[1])
    bare_file = write_native(tmp_path / "bare.wav", "The train leaves at nine in the morning.", "en+m7")
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    records = [
        {"source_uri": manifest_file, "source_dataset": "t", "transcript": "i am so happy to see you again today",
         "transcript_origin": "manifest", "transcript_confidence": 1.0, "language": "en", "language_origin": "manifest"},
        {"source_uri": split_file, "source_dataset": "t", "transcript": "two sentences", "transcript_origin": "manifest",
         "transcript_confidence": 1.0},
        {"source_uri": bare_file, "source_dataset": "t"},
        {"source_uri": str(broken), "source_dataset": "t"},
    ]
    stages = [
        DecodeAudio(max_file_seconds=3600.0, max_channels=8),
        SileroVAD(threshold=0.5, min_silence_s=0.3, merge_gap_s=0.8, min_segment_s=1.0, max_segment_s=30.0, pad_s=0.15,
                  keep_transcribed_whole=False),  # exercise the split path: the transcript is dropped, ASR fills in
        PocketsphinxASR(),
        PitchGender(),
        HeuristicEmotion(),
        AcousticMetrics(),
    ]
    outputs, rejects = run_stages(stages, records)

    assert [(r.source_uri, r.stage, r.reason) for r in rejects] == [(str(broken), "decode", "decode_error")]
    by_source = {}
    for out in outputs:
        by_source.setdefault(out["source_uri"], []).append(out)
    assert sorted(map(len, by_source.values())) == [1, 1, 2]

    (kept,) = by_source[manifest_file]
    assert kept["transcript"] == "i am so happy to see you again today" and kept["transcript_origin"] == "manifest"
    assert kept["emotion"] == "happy" and kept["gender"] == "female"

    pieces = by_source[split_file]
    assert all(SPLIT_FLAG in p["quality_flags"] for p in pieces)
    # The split dropped the manifest's transcript: ASR must have filled at least one piece back in
    # (pocketsphinx may hear nothing in a short piece, which leaves that one empty and flagged).
    assert any(p["transcript"] for p in pieces), "pocketsphinx transcribed none of the split pieces"
    assert all(p["transcript_origin"] == "pocketsphinx-5 en-us" for p in pieces if p["transcript"])
    assert all(p["gender"] == "male" for p in pieces)
    assert pieces[0]["segment_end"] < pieces[1]["segment_start"]
    assert all(p["_source_channels"] == 2 for p in pieces)

    (bare,) = by_source[bare_file]
    assert bare["language"] == "en" and bare["language_origin"] == "assumed"

    for out in outputs:
        assert out["sampling_rate"] == SAMPLE_RATE and out["_waveform"].dtype == np.float32
        assert len(out["_waveform"]) == round(out["duration"] * SAMPLE_RATE)
        assert out["gender"] in GENDERS and out["emotion"] in EMOTIONS and out["emotion_score"] <= 0.6
        for name in (*METRIC_FIELDS, "gender_score", "emotion_score", "transcript_confidence"):
            value = out.get(name)
            if value is not None:
                field = FIELDS_BY_NAME[name]
                assert type(value) is float and field.min <= value <= field.max, (name, value)
        assert "_f0" in out  # computed once, shared by gender, emotion and metrics
