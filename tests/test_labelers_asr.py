"""ASR stages: the real pocketsphinx decoder on espeak speech, and the manifest pass-through."""

from __future__ import annotations

import jiwer
import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.asr import ASR_EMPTY_FLAG, ManifestTranscript, PocketsphinxASR
from echat.schemas.stage import Reject

SR = speech.SR


@pytest.fixture(scope="module")
def asr() -> PocketsphinxASR:
    stage = PocketsphinxASR()
    stage.setup()
    return stage


def segment(waveform, **extra):
    return {"source_uri": "a.wav", "id": "seg1", "_waveform": waveform, "sampling_rate": SR, **extra}


def normalise(text: str) -> str:
    return jiwer.RemovePunctuation()(text.lower()).strip()


def test_pocketsphinx_transcribes_espeak_with_word_timings(asr):
    waveform = np.concatenate([speech.silence(0.3), speech.say(speech.SENTENCES[0], "en+f3"), speech.silence(0.3)])
    (out,) = list(asr.process(segment(waveform)))
    duration = len(waveform) / SR
    print(f"\nreference : {normalise(speech.SENTENCES[0])}\nhypothesis: {out['transcript']}")
    assert out["transcript"] and out["transcript"] == out["transcript"].lower()
    assert out["transcript_origin"] == "pocketsphinx-5 en-us"
    assert 0.0 <= out["transcript_confidence"] <= 1.0 and isinstance(out["transcript_confidence"], float)
    assert (out["language"], out["language_origin"]) == ("en", "assumed")
    words = out["words"]
    assert [w["word"] for w in words] == out["transcript"].split()
    for w in words:
        assert set(w) == {"word", "start", "end", "score"}
        assert "(" not in w["word"] and not w["word"].startswith(("<", "["))
        assert 0.0 <= w["start"] < w["end"] <= duration + 0.01
        assert 0.0 <= w["score"] <= 1.0
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    # the speech starts after the 0.3 s of leading silence and ends before the trailing one
    assert words[0]["start"] >= 0.2 and words[-1]["end"] <= duration - 0.15


def test_word_error_rate_on_espeak_is_measured(asr):
    refs, hyps = [], []
    for voice in ("en+f3", "en+m3"):
        for sentence in speech.SENTENCES:
            (out,) = list(asr.process(segment(speech.say(sentence, voice))))
            refs.append(normalise(sentence))
            hyps.append(out["transcript"] or "")
    wer = jiwer.wer(refs, hyps)
    print(f"\npocketsphinx-5 en-us WER on {len(refs)} espeak sentences (en+f3, en+m3): {wer:.1%}")
    # Not a quality bar: the general language model is poor on synthetic speech. It must at least
    # hear some words right, which a broken decoder (wrong rate, wrong scaling) would not.
    assert wer < 1.0
    assert sum(h != "" for h in hyps) == len(hyps)


def test_existing_transcript_passes_untouched(asr):
    record = segment(speech.silence(1.0), transcript="from the manifest", transcript_origin="manifest", language="zh")
    (out,) = list(asr.process(record))
    assert out is record


def test_other_language_is_flagged_not_transcribed(asr):
    record = segment(speech.say(speech.PINYIN, "cmn-latn-pinyin+f3"), language="zh", quality_flags=["x"])
    (out,) = list(asr.process(record))
    assert out.get("transcript") is None and out.get("words") is None
    assert out["quality_flags"] == ["x", "no_asr_for_language:zh"]
    assert record["quality_flags"] == ["x"]


def test_no_words_in_silence_or_noise(asr):
    for waveform in (speech.silence(1.5), speech.white_noise(int(1.5 * SR), 0.001)):
        (out,) = list(asr.process(segment(waveform)))
        assert out.get("transcript") is None
        assert ASR_EMPTY_FLAG in out["quality_flags"]
        assert out["language"] == "en"


def test_manifest_transcript_stage():
    stage = ManifestTranscript()
    with_text = {"source_uri": "a.wav", "transcript": "hello there"}
    assert list(stage.process(with_text)) == [with_text]
    (rejected,) = list(stage.process({"source_uri": "b.wav", "id": "s2", "segment_start": 0.0, "transcript": None}))
    assert isinstance(rejected, Reject) and rejected.reason == "no_transcript" and rejected.stage == "asr"
    (split,) = list(
        stage.process({"source_uri": "c.wav", "transcript": None, "quality_flags": ["manifest_transcript_dropped_split"]})
    )
    assert split.reason == "no_transcript" and "split" in split.detail


def test_custom_model_paths_and_options_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="lm"):
        PocketsphinxASR(lm=str(tmp_path / "missing.lm.bin")).setup()
    with pytest.raises(ValueError, match="nosuchoption"):
        PocketsphinxASR(decoder_options={"nosuchoption": 1}).setup()


def test_decoder_options_reach_pocketsphinx():
    stage = PocketsphinxASR(fwdflat=True, decoder_options={"lw": 8.0})
    stage.setup()
    assert stage._decoder.config["fwdflat"] is True and stage._decoder.config["lw"] == 8.0
