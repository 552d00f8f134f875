"""The reasoning traces: tag form (OSUM-EChat), its parser, and the hedged natural-language form."""

from __future__ import annotations

import re

import pytest

from echat.schemas.text import has_cjk
from echat.schemas import reasoning as trace_format
from echat.schemas import vocab
from echat.schemas.reasoning import ThinkParseError, parse_tag_form
from echat.synth.reasoning import Cues, EventsLabel, Label, natural_form, tag_form

FULL = Cues(
    transcript="I failed my exam again and I feel like giving up.",
    language="en",
    age=Label("adult", 0.9, "wav2vec2"),
    gender=Label("female", 0.95, "pitch"),
    emotion=Label("sad", 0.9, "emotion2vec"),
    events=EventsLabel(("cough",), 0.8, "sensevoice"),
)


def test_tag_form_writes_every_label_in_design_order():
    # DESIGN.md's order: emotion before the sound event, the reply emotion last.
    text = tag_form(FULL, "WORRIED")
    assert text == (
        "<think>User's words: I failed my exam again and I feel like giving up.; Age: <adult>; "
        "Gender: <female>; Emotion: <sad>; Sound event: <cough>; Reply emotion: <WORRIED><think end>"
    )


def test_tag_form_writes_the_placeholder_for_every_unknown_label():
    text = tag_form(Cues(transcript="hello there"), None)
    # age, gender, emotion, sound event and the reply emotion are all unknown
    assert text.count(vocab.UNKNOWN_PLACEHOLDER) == 5
    for name, _ in trace_format.TAG_FIELDS:
        assert f"{name}: {vocab.UNKNOWN_PLACEHOLDER}" in text


def test_tag_form_tells_no_event_heard_from_events_unknown():
    heard_nothing = tag_form(Cues("hi", events=EventsLabel((), 0.9, "sensevoice")), "NEUTRAL")
    not_labelled = tag_form(Cues("hi", events=EventsLabel(None)), "NEUTRAL")
    assert "Sound event: <none>" in heard_nothing
    assert f"Sound event: {vocab.UNKNOWN_PLACEHOLDER}" in not_labelled


def test_cues_from_record_treats_an_unvouched_empty_event_list_as_unknown():
    assert Cues.from_record({"transcript": "x", "events": []}).events.values is None
    assert Cues.from_record({"transcript": "x", "events": [], "events_model": "m"}).events.values == ()
    assert Cues.from_record({"transcript": "你好"}).language == "zh"


@pytest.mark.parametrize(
    "cues, reply_emotion",
    [
        (FULL, "WORRIED"),
        (Cues("hello there"), None),
        (Cues("hi", events=EventsLabel((), 1.0, "m")), "NEUTRAL"),
        (Cues("ha ha, and then ahem", events=EventsLabel(("laugh", "throat_clearing"), 0.5, "m"),
              emotion=Label("happy", 0.2, "h")), "HAPPY"),
        (Cues("我今天考试没考好，好难过。", language="zh", age=Label("child"), gender=Label("male"),
              emotion=Label("sad")), "SORRY"),
        # a transcript that itself contains a semicolon and the word "age:" must not be cut there
        (Cues("my age: forty; really", age=Label("old"), emotion=Label("neutral")), "CURIOUS"),
    ],
)
def test_parse_tag_form_round_trips(cues, reply_emotion):
    parsed = parse_tag_form(tag_form(cues, reply_emotion))
    assert parsed.words == trace_format.clean_words(cues.transcript)
    assert parsed.age == cues.age.value
    assert parsed.gender == cues.gender.value
    assert parsed.emotion == cues.emotion.value
    assert parsed.events == cues.events.values
    assert parsed.reply_emotion == reply_emotion
    assert parsed.reply == ""


def test_parse_accepts_osum_tokenizer_spacing_and_a_following_reply():
    # OSUM's process_text2 deletes the spaces around < and >; a model trained on it answers so.
    # The fields come in the README's order (sound event before emotion): any order is read.
    model_output = (
        "<think>User's words: it is raining again;Age:<adult>;Gender:<male>;Sound event:<&&>;"
        "Emotion:<sad>;Reply emotion:<sorry><think end>I'm sorry, rainy days can be gloomy."
    )
    parsed = parse_tag_form(model_output)
    assert parsed.words == "it is raining again"
    assert (parsed.age, parsed.gender, parsed.events, parsed.emotion) == ("adult", "male", None, "sad")
    assert parsed.reply_emotion == "SORRY"
    assert parsed.reply == "I'm sorry, rainy days can be gloomy."


@pytest.mark.parametrize(
    "bad, message",
    [
        ("User's words: hi; Age: <adult>", "no <think>"),
        ("<think>Age: <adult><think end>", "User's words"),
        ("<think>User's words: hi; Age: <adult>; Gender: <male><think end>", "lacks field"),
        ("<think>User's words: hi; Age: <teen>; Gender: <male>; Sound event: <none>; Emotion: <sad>; "
         "Reply emotion: <SAD><think end>", "teen"),
        ("<think>User's words: hi; Age: <adult>; Gender: <male>; Sound event: <burp>; Emotion: <sad>; "
         "Reply emotion: <SAD><think end>", "burp"),
    ],
)
def test_parse_rejects_what_is_not_the_tag_form(bad, message):
    with pytest.raises(ThinkParseError, match=message):
        parse_tag_form(bad)


def test_lenient_parse_fills_missing_fields_with_unknown():
    parsed = parse_tag_form("<think>User's words: hi; Emotion: <happy><think end>", strict=False)
    assert (parsed.emotion, parsed.age, parsed.reply_emotion, parsed.events) == ("happy", None, None, None)


def _emotion_sentence(text: str) -> str:
    return next(s for s in re.split(r"(?<=[.。])\s*", text) if "sad" in s or "难过" in s)


@pytest.mark.parametrize(
    "score, model, expected, not_expected",
    [
        (0.3, "heuristic", "might", ("seems", "sounds")),
        (0.65, "heuristic", "seems", ("might",)),
        (0.95, "emotion2vec", "sounds", ("might", "seems")),
        (None, "manifest", "sounds", ("might", "seems")),
        (None, "heuristic", "seems", ("might",)),
    ],
)
def test_natural_form_hedges_by_confidence(score, model, expected, not_expected):
    cues = Cues("I lost my keys.", emotion=Label("sad", score, model))
    sentence = _emotion_sentence(natural_form(cues, "WORRIED"))
    assert expected in sentence
    assert not any(word in sentence for word in not_expected)


def test_natural_form_hedges_in_chinese_and_speaks_the_users_language():
    unsure = natural_form(Cues("我丢了钥匙。", language="zh", emotion=Label("sad", 0.2, "h")), "WORRIED")
    sure = natural_form(Cues("我丢了钥匙。", language="zh", emotion=Label("sad", 0.9, "m")), "WORRIED")
    assert "可能" in _emotion_sentence(unsure)
    assert "可能" not in _emotion_sentence(sure) and "很难过" in sure
    assert not re.search(r"[A-Za-z]", unsure.replace("<think>", "").replace("<think end>", ""))
    english = natural_form(FULL, "WORRIED")
    assert not has_cjk(english)


def test_natural_form_reasons_over_words_and_cues():
    text = natural_form(FULL, "WORRIED", topic="exams and school")
    assert text.startswith("<think>") and text.endswith("<think end>")
    assert FULL.transcript in text  # what was said
    assert "exams and school" in text  # what it is about
    assert "sad" in text and "a cough" in text and "not be feeling well" in text  # how it was said
    assert "a woman" in text
    assert "worried" in text  # how the reply will answer
    assert "..." not in text and ".." not in text


def test_natural_form_says_so_when_the_emotion_is_unknown_and_simplifies_for_a_child():
    text = natural_form(Cues("Can we play?", age=Label("child", 0.9, "m")), "HAPPY")
    assert "cannot tell their mood" in text
    assert "simple words" in text
