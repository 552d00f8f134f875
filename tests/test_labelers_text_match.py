"""text_match: one phrase matcher and one idea of a Chinese character for labelers and synth."""

from __future__ import annotations

from echat.labelers.metrics import speaking_rate
from echat.labelers.text_match import PhraseMatch, count_phrases, find_phrases, mask
from echat.schemas.scoring import language_of, normalize_transcript
from echat.schemas.text import count_cjk, has_cjk
from echat.synth.reasoning import guess_language

COMPATIBILITY_IDEOGRAPHS = "\uf900\uf901"  # U+F900-FAFF: variants some input methods and OCR produce


def test_compatibility_ideographs_are_chinese_everywhere():
    # emotion.py once left U+F900-FAFF out while metrics.py and reasoning.py had it.
    assert has_cjk(COMPATIBILITY_IDEOGRAPHS) and count_cjk(COMPATIBILITY_IDEOGRAPHS) == 2
    assert guess_language(COMPATIBILITY_IDEOGRAPHS) == "zh"
    assert speaking_rate(COMPATIBILITY_IDEOGRAPHS, 1.0) == 2.0
    assert language_of(COMPATIBILITY_IDEOGRAPHS) == "zh"
    assert normalize_transcript("\uf900\uf901 ok", "zh") == ["\uf900", "\uf901", "ok"]
    assert not has_cjk("hello, world") and not has_cjk(None) and count_cjk("abc") == 0


def test_longest_phrase_wins_and_no_stretch_counts_twice():
    assert count_phrases("我不开心，不开心", ["开心", "不开心"], "zh") == {"不开心": 2}
    assert count_phrases("I am not happy, just happy", ["happy", "not happy"], "en") == {"not happy": 1, "happy": 1}
    assert count_phrases("讨厌死了", ["讨厌", "讨厌死了", "死"], "zh") == {"讨厌死了": 1}


def test_matches_come_in_text_order_with_positions_in_the_lower_cased_text():
    text = "Wow, I PASSED my exams"
    matches = find_phrases(text, ["exam", "pass", "wow"], "en")
    assert matches == [PhraseMatch("wow", 0, 3), PhraseMatch("pass", 7, 13), PhraseMatch("exam", 17, 22)]
    assert [text.lower()[m.start : m.end] for m in matches] == ["wow", "passed", "exams"]


def test_english_matches_whole_words_with_optional_inflections():
    assert count_phrases("my exams", ["exam"], "en") == {"exam": 1}
    assert count_phrases("my exams", ["exam"], "en", inflections=False) == {}
    assert count_phrases("examine it", ["exam"], "en") == {}  # not inside another word
    assert count_phrases("don't", ["don"], "en") == {}  # nor the start of an apostrophe form


def test_mask_keeps_positions():
    assert mask("我不开心啊", [(1, 2), (2, 4)]) == "我|||啊"
