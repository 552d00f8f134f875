"""The reasoning-trace format (schemas/reasoning.py): markers, tag form, split, parse, reply emotion."""

from __future__ import annotations

import subprocess
import sys

import pytest

from echat.schemas import reasoning as r
from echat.schemas import vocab


def test_markers_and_placeholder_are_osums():
    assert (r.THINK_START, r.THINK_END, r.UNKNOWN) == ("<think>", "<think end>", "<&&>")
    assert r.UNKNOWN == vocab.UNKNOWN_PLACEHOLDER
    assert r.wrap_think("x") == "<think>x<think end>"
    assert [name for name, _ in r.TAG_FIELDS] == ["Age", "Gender", "Emotion", "Sound event", "Reply emotion"]
    assert set(r.FIELD_VOCABS) == {attr for _, attr in r.TAG_FIELDS}


@pytest.mark.parametrize(
    "labels",
    [
        dict(age="adult", gender="female", emotion="sad", events=("cough",), reply_emotion="WORRIED"),
        dict(age=None, gender="male", emotion=None, events=None, reply_emotion=None),  # unknowns: <&&>
        dict(age="child", gender=None, emotion="happy", events=(), reply_emotion="HAPPY"),  # no event heard
        dict(age="old", gender="male", emotion="neutral", events=("laugh", "throat_clearing"), reply_emotion="CURIOUS"),
    ],
)
def test_build_then_parse_round_trips_with_the_placeholder_for_unknowns(labels):
    words = "my age: forty; <really> I'm   fine"
    trace = r.build_tag_form(words, **labels)
    assert trace.startswith(r.THINK_START) and trace.endswith(r.THINK_END)
    unknown = sum(labels[k] is None for k in ("age", "gender", "emotion", "events", "reply_emotion"))
    assert trace.count("<&&>") == unknown
    parsed = r.parse_tag_form(trace + " And the reply.")
    assert parsed == r.TagThink(words=r.clean_words(words), reply="And the reply.", **labels)
    assert parsed.words == "my age: forty; really I'm fine"  # brackets and runs of spaces cleaned


def test_build_writes_design_order_and_case():
    trace = r.build_tag_form("hi", age="adult", gender="female", emotion="sad", events=("cough",), reply_emotion="worried")
    assert trace == ("<think>User's words: hi; Age: <adult>; Gender: <female>; Emotion: <sad>; "
                     "Sound event: <cough>; Reply emotion: <WORRIED><think end>")
    assert "Sound event: <none>" in r.build_tag_form("hi", events=())
    assert "Sound event: <&&>" in r.build_tag_form("hi", events=None)


def test_split_think_closed_unclosed_and_none():
    assert r.split_think("<think> Age: <adult> <think end> I'm sorry. ") == ("Age: <adult>", "I'm sorry.")
    # An opened but unclosed trace is all reasoning, and the reply is empty.
    assert r.split_think("<think>Age: <adult>; Gen") == ("Age: <adult>; Gen", "")
    assert r.split_think("Just a reply. ") == (None, "Just a reply.")
    assert r.split_think("") == (None, "")
    assert r.split_think("<think><think end>") == ("", "")
    # A closing marker without an opening one is no trace.
    assert r.split_think("reply<think end>") == (None, "reply<think end>")


def test_parse_refuses_an_unclosed_trace_when_strict_and_reads_it_when_lenient():
    cut = "<think>User's words: hi; Age: <adult>; Gender: <male>; Emotion: <sad>; Sound event: <none>; Reply emotion: <SAD>"
    with pytest.raises(r.ThinkParseError, match="never closed"):
        r.parse_tag_form(cut)
    parsed = r.parse_tag_form(cut, strict=False)
    assert (parsed.age, parsed.emotion, parsed.events, parsed.reply_emotion, parsed.reply) == ("adult", "sad", (), "SAD", "")
    with pytest.raises(r.ThinkParseError, match="no <think>"):
        r.parse_tag_form("User's words: hi; Age: <adult>")


def test_reply_emotion_of_reads_the_tag_form_only():
    body = "User's words: x; Age: <adult>; Emotion: <sad>; Reply emotion: <WORRIED>"
    assert r.reply_emotion_of(body) == "WORRIED"
    assert r.reply_emotion_of(r.wrap_think(body) + "reply") == "WORRIED"
    assert r.reply_emotion_of("Reply  emotion:<sorry>") == "SORRY"
    assert r.reply_emotion_of("Reply emotion: <&&>") is None
    assert r.reply_emotion_of("Reply emotion: <ECSTATIC>") is None
    assert r.reply_emotion_of("She sounds sad; a worried reply fits.") is None
    assert r.reply_emotion_of(None) is None


def test_tag_form_labels_is_lenient_and_keeps_the_first_occurrence():
    text = "Age:<child>; sound EVENT: <laugh><cough>; Emotion: <happy>; Age: <old>; Gender: male"
    assert r.tag_form_labels(text) == {"age": ("child",), "events": ("laugh", "cough"), "emotion": ("happy",)}
    assert r.tag_form_labels(r.build_tag_form("hi"))["reply_emotion"] == ("&&",)
    # The closing marker is not a label of the field before it (README order: the event last).
    assert r.tag_form_labels("<think>User's words: hm; Sound event: <cough><think end>ok")["events"] == ("cough",)


def test_the_format_module_needs_neither_torch_nor_yaml_nor_other_folders():
    code = (
        "import sys, echat.schemas.reasoning, echat.schemas.tasks\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'yaml', 'transformers')"
        " or m.startswith(('echat.model', 'echat.synth', 'echat.labelers', 'echat.pipelines'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
