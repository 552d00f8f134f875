"""HeuristicEmotion: keywords (English and Chinese), negation, prosody, and its score cap; run under
StageRunner as a build runs it (precedence, provenance stamping, declared writes)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers.emotion import MODEL_NAME, HeuristicEmotion, arousal, decide, keyword_hits, load_lexicon
from echat.schemas.vocab import EMOTIONS

SR = speech.SR


@pytest.fixture(scope="module")
def emotion() -> HeuristicEmotion:
    stage = HeuristicEmotion()
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    return speech.say("I have something to tell you about today.", "en+f3")


def label(stage, waveform, transcript, language="en", **extra):
    record = {"_waveform": waveform, "sampling_rate": SR, "transcript": transcript, "language": language, **extra}
    (out,) = speech.run_stage(stage, record)
    return out


@pytest.mark.parametrize(
    "transcript, language, expected",
    [
        ("I am so happy and excited, this is wonderful news", "en", "happy"),
        ("I feel so sad and lonely since my dog died", "en", "sad"),
        ("this is ridiculous, I am furious and I hate it", "en", "anger"),
        ("I am scared and terrified of the dark", "en", "fear"),
        ("that smell is disgusting and gross", "en", "disgust"),
        ("wow I was so surprised, it was unexpected", "en", "surprise"),
        ("我今天特别开心，太好了", "zh", "happy"),
        ("我很难过，心里很伤心", "zh", "sad"),
        ("你太过分了，我真的很生气", "zh", "anger"),
        ("我好害怕，太可怕了", "zh", "fear"),
    ],
)
def test_keywords_decide_the_emotion(emotion, voice, transcript, language, expected):
    out = label(emotion, voice, transcript, language)
    assert out["emotion"] == expected
    assert 0.0 < out["emotion_score"] <= 0.6 and out["emotion_model"] == MODEL_NAME


def test_negated_keywords_do_not_count():
    lexicon = load_lexicon()
    assert keyword_hits("i am not happy at all", lexicon)["happy"] == 0
    assert keyword_hits("i am happy", lexicon)["happy"] == 1
    assert keyword_hits("我不开心", lexicon)["happy"] == 0
    assert keyword_hits("我很开心", lexicon)["happy"] == 1


def test_overlapping_chinese_keywords_count_once_for_the_longest():
    lexicon = load_lexicon()
    # "讨厌死了" is listed under disgust; its "讨厌" (anger) must not count as well and win the tie.
    assert keyword_hits("这个味道我讨厌死了", lexicon) == Counter({"disgust": 1})
    assert keyword_hits("烦死了", lexicon) == Counter({"anger": 1})  # not "烦" and "烦死了"
    assert keyword_hits("好开心，好开心", lexicon) == Counter({"happy": 2})  # each occurrence once


@pytest.mark.parametrize(
    "transcript",
    ["我不是很开心", "我不太开心", "我没有那么开心", "不用难过", "i'm not very happy", "i am not so sad"],
)
def test_a_negation_a_word_or_two_before_the_keyword_negates_it(transcript):
    assert keyword_hits(transcript, load_lexicon()) == Counter()


@pytest.mark.parametrize(
    "transcript, emotion",
    [
        ("不，我很开心", "happy"),  # the negation ends its own clause
        ("no, i'm happy", "happy"),  # "no" is two words before, but in the clause before
        ("别人很开心", "happy"),  # 别人 "other people" is not 别 "don't"
        ("不过很开心", "happy"),  # 不过 "but"
        ("我很不安", "fear"),  # 不安 is itself the keyword
    ],
)
def test_what_only_looks_like_a_negation_does_not_negate(transcript, emotion):
    assert keyword_hits(transcript, load_lexicon()) == Counter({emotion: 1})


def test_the_stage_labels_negated_chinese_happiness_as_not_happy(emotion, voice):
    assert label(emotion, voice, "我不是很开心", "zh")["emotion"] != "happy"
    assert label(emotion, voice, "我讨厌死了这个味道", "zh")["emotion"] == "disgust"


def test_no_evidence_is_neutral_with_a_low_score(emotion, voice):
    out = label(emotion, voice, "the meeting is on tuesday at ten in room four")
    assert out["emotion"] == "neutral" and out["emotion_score"] <= 0.3
    out = label(emotion, voice, None, language=None)  # no transcript at all
    assert out["emotion"] in EMOTIONS and out["emotion_score"] <= 0.4


def test_prosody_moves_arousal_the_right_way():
    flat = np.full(100, 150.0, dtype=np.float32)
    lively = (150 + 60 * np.sin(np.linspace(0, 12, 100))).astype(np.float32)
    assert arousal(lively, 4.0, -12.0, chinese=False) > 0.5
    assert arousal(flat, 1.2, -40.0, chinese=False) < -0.5
    assert arousal(np.zeros(0, np.float32), None, None, chinese=False) is None


def test_decision_rules_and_cap():
    assert decide(Counter(), -0.9, 0.6)[0] == "sad"
    assert decide(Counter(), 0.0, 0.6) == ("neutral", 0.3)
    emotion, score = decide(Counter({"happy": 9}), 0.9, 0.6)
    assert emotion == "happy" and score == 0.6  # many hits, agreeing prosody: still capped
    # a tie between a high- and a low-arousal emotion goes to the one prosody supports
    assert decide(Counter({"happy": 1, "sad": 1}), -0.8, 0.6)[0] == "sad"
    assert decide(Counter({"happy": 1, "sad": 1}), 0.8, 0.6)[0] == "happy"


def test_manifest_emotion_wins(emotion, voice):
    record = {"_waveform": voice, "sampling_rate": SR, "transcript": "I am so happy", "emotion": "sad",
              "emotion_score": 1.0, "emotion_model": "manifest"}
    (out,) = speech.run_stage(emotion, record)
    assert out is record  # the runner's precedence: the heuristic is not even run


def test_the_runner_records_the_heuristic_origin_and_keeps_a_model_emotion(voice):
    from echat.schemas.stage_runner import ORIGINS_KEY

    stage = HeuristicEmotion()
    stage.setup()
    (first,) = speech.run_stage(stage, {"_waveform": voice, "sampling_rate": SR, "transcript": "I am so happy"})
    assert first[ORIGINS_KEY] == {"emotion": "heuristic"} and first["emotion_model"] == MODEL_NAME
    held = {**first, "emotion": "sad", "emotion_score": 0.9, "emotion_model": "ser-model",
            ORIGINS_KEY: {"emotion": "model"}}
    (out,) = speech.run_stage(stage, held)
    assert out is held


def test_lexicon_only_names_known_emotions(tmp_path):
    lexicon = load_lexicon()
    assert set(lexicon["emotions"]) <= set(EMOTIONS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("negations: {en: [], zh: []}\nemotions:\n  joyous: {en: [yay]}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="joyous"):
        load_lexicon(str(bad))


def test_score_cap_is_enforced_in_configuration():
    with pytest.raises(ValueError, match="max_score"):
        HeuristicEmotion(max_score=0.9)
