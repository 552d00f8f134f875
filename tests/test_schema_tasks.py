"""The task-tag table (schemas/tasks.py): one entry per OSUM tag, and what a record serves."""

from __future__ import annotations

import pytest

from echat.schemas import tasks as t
from echat.schemas import vocab

FULL_ROW = {
    "audio": {"bytes": b"fLaC...", "path": "a.flac"},
    "transcript": "I lost my job",
    "words": [{"word": "I", "start": 0.0, "end": 0.2}],
    "age": "adult", "gender": "female", "emotion": "sad", "events": ["cough"], "style": "daily conversation",
    "reply_text": "I'm so sorry.",
    "think_tags": "<think>User's words: I lost my job; Age: <adult><think end>",
    "reply_speech_tokens": [1, 2, 3],
    "history": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}],
}


def test_every_task_tag_has_one_entry_in_vocab_order():
    assert tuple(t.TASKS) == vocab.TASK_TAGS
    for tag, entry in t.TASKS.items():
        assert entry.tag == tag and t.task(tag) is entry
        assert entry.output in t.OUTPUTS and entry.prompt in t.PROMPT_KINDS
        assert entry.input in (t.SPEECH_INPUT, t.TEXT_INPUT)
        assert entry.needs and all(alternatives for alternatives in entry.needs)
        assert entry.speaks == (entry.output in (t.TEXT_SPEECH, t.SPEECH))
        assert entry.reasons == ("<THINK>" in tag.split())
        assert (entry.input == t.SPEECH_INPUT) == (("audio",) in entry.needs)
    assert t.chat_task(reasons=True, speaks=True).tag == vocab.DEFAULT_RECORD_TASK


def test_entries_say_what_each_task_needs():
    assert t.task("<TRANSCRIBE>").needs == (("audio",), ("transcript",))
    assert t.task("<AGE>").needs == (("audio",), ("age",)) and t.task("<AGE>").output == t.LABEL
    assert t.task("<CAPTION>").labels == ("events",)
    think = t.task("<S2TCHAT> <THINK>")
    assert ("reply_text",) in think.needs and t.REASONING_FORMS in think.needs and think.reasons
    s2s = t.task("<S2TCHAT> <TEXT2TOKEN>")
    assert t.REPLY_SPEECH in s2s.needs and s2s.speaks and s2s.output == t.TEXT_SPEECH
    tts = t.task("<TEXT2TOKEN>")
    assert (tts.input, tts.user_text, tts.output, tts.instruction) == (t.TEXT_INPUT, "reply_text", t.SPEECH, False)
    assert t.task("<TEXT2TEXT>").user_text == "transcript"
    assert t.task("<TRANSCRIBE> <ALIGN>").aligns and t.task("<TRANSCRIBE> <ALIGN>").transcribes


def test_prompt_kinds_move_with_the_table():
    kinds = {tag: t.task(tag).prompt_kind() for tag in vocab.TASK_TAGS}
    assert kinds["<S2TCHAT> <THINK>"] == t.S2T_THINK and kinds["<S2TCHAT> <TEXT2TOKEN> <THINK>"] == t.S2S_THINK
    assert kinds["<TEXT2TOKEN>"] == t.TTS and kinds["<TEXT2TEXT>"] == t.T2T and kinds["<EMOTION>"] == t.UNDERSTAND
    history = t.task("<HISTORY>")
    assert history.prompt_kind() == t.S2T_CHAT and history.prompt_kind(speech_target=True) == t.S2S
    # A task that always speaks keeps its prompt even when asked for text only.
    assert t.task("<S2TCHAT> <TEXT2TOKEN>").prompt_kind(speech_target=False) == t.S2S


def test_label_combinations_compose_and_unknown_tags_raise_a_key_error_naming_them():
    combo = t.task("<TRANSCRIBE><STYLE>  <AGE>")
    assert combo.tag == "<TRANSCRIBE> <STYLE> <AGE>" and combo.labels == ("style", "age")
    assert combo.output == t.TEXT_LABEL and combo.needs == (("audio",), ("transcript",), ("style",), ("age",))
    assert t.is_known("<AGE> <GENDER>") and not t.is_known("<EMOTION> <EMOTION>")
    with pytest.raises(KeyError) as err:
        t.task("<TRANSLATE>")
    message = str(err.value)
    assert "'<TRANSLATE>'" in message and all(tag in message for tag in vocab.TASK_TAGS)
    with pytest.raises(ValueError, match="unknown task"):  # also a ValueError, for callers that catch those
        t.task("<STYLE> <TRANSCRIBE>")
    with pytest.raises(ValueError, match="not a task tag string"):
        t.task("transcribe")


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"transcript": "hi"}, "<TRANSCRIBE>"),
        ({"transcript": "hi", "reply_text": "   "}, "<TRANSCRIBE>"),  # a blank reply is no reply
        ({"reply_text": "Hello."}, "<S2TCHAT>"),
        ({"reply_text": "Hello.", "think_text": "<think>calm<think end>"}, "<S2TCHAT> <THINK>"),
        ({"reply_text": "Hello.", "reply_audio": {"bytes": b"x", "path": "r.flac"}}, "<S2TCHAT> <TEXT2TOKEN>"),
        ({"reply_text": "Hello.", "reply_audio": {"bytes": None, "path": None}}, "<S2TCHAT>"),  # an empty struct
        ({"reply_text": "Hello.", "think_tags": "<think>x<think end>", "reply_speech_tokens": [5]},
         "<S2TCHAT> <TEXT2TOKEN> <THINK>"),
        ({"reply_text": "Hello.", "think_tags": "", "reply_speech_tokens": []}, "<S2TCHAT>"),
    ],
)
def test_record_task_from_what_a_row_holds(row, expected):
    assert t.record_task(row) == expected


def test_tasks_a_record_supports():
    assert t.tasks_a_record_supports(FULL_ROW) == list(vocab.TASK_TAGS)
    asr_only = {"audio": FULL_ROW["audio"], "transcript": "hello", "emotion": "sad"}
    assert t.tasks_a_record_supports(asr_only) == ["<TRANSCRIBE>", "<EMOTION>", "<TRANSCRIBE> <EMOTION>"]
    text_only = {"transcript": "hello", "reply_text": "hi", "reply_speech_tokens": [1]}
    assert t.tasks_a_record_supports(text_only) == ["<TEXT2TOKEN>", "<TEXT2TEXT>"]
    no_think = {k: v for k, v in FULL_ROW.items() if k != "think_tags"}
    assert t.task("<S2TCHAT> <THINK>").missing(no_think) == ["think_tags|think_text"]


def test_chat_task_picks_the_dialogue_task_by_its_traits():
    assert t.chat_task(reasons=False, speaks=False).tag == "<S2TCHAT>"
    assert t.chat_task(reasons=True, speaks=False).tag == "<S2TCHAT> <THINK>"
    assert t.chat_task(reasons=False, speaks=True).tag == "<S2TCHAT> <TEXT2TOKEN>"
    assert t.chat_task(reasons=False, speaks=True, history=True).tag == "<HISTORY>"
    with pytest.raises(KeyError, match="reasons"):
        t.chat_task(reasons=True, speaks=False, history=True)


def test_tag_words_are_each_word_of_the_tags_once():
    assert set(t.TAG_WORDS) == {w for tag in vocab.TASK_TAGS for w in tag.split()}
    assert len(t.TAG_WORDS) == len(set(t.TAG_WORDS))
    assert set(t.UNINSTRUCTED_TAGS) == {tag for tag in vocab.TASK_TAGS if t.task(tag).replies}


def test_the_model_has_a_system_prompt_for_every_prompt_kind():
    from echat.model import prompts

    assert set(prompts.SYSTEM_PROMPTS) == set(t.PROMPT_KINDS)
    assert prompts.CHAT_TASKS == t.UNINSTRUCTED_TAGS
