"""`echat eval`: hand-made predictions with error rates and accuracies worked out by hand."""

from __future__ import annotations

import json

import pytest

from echat.cli import main
from echat.model import evaluate as ev


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(task, prediction, reference, key="k", **extra):
    return {"key": key, "task": task, "prediction": prediction, "reference": reference, **extra}


def test_wer_one_substitution_in_four_words():
    report = ev.evaluate([_row("<TRANSCRIBE>", "the cat sat down", "the dog sat down")])
    m = report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_en"]
    assert m["metric"] == "wer"
    assert m["wer"] == pytest.approx(1 / 4)
    assert (m["substitutions"], m["deletions"], m["insertions"], m["reference_tokens"]) == (1, 0, 0, 4)


def test_wer_is_corpus_level_over_rows():
    # Row 1: 1 deletion of 4 words; row 2: 1 insertion over 2 words. (1 + 1) / (4 + 2) = 1/3.
    report = ev.evaluate([
        _row("<TRANSCRIBE>", "i am fine", "i am very fine", key="a"),
        _row("<TRANSCRIBE>", "hello there world", "hello world", key="b"),
    ])
    m = report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_en"]
    assert m["wer"] == pytest.approx(2 / 6)
    assert m["deletions"] == 1 and m["insertions"] == 1
    assert m["utterances"] == 2
    assert m["sentence_error_rate"] == pytest.approx(1.0)


def test_normalisation_ignores_case_punctuation_spaces_and_tags():
    # Same words once case, punctuation, extra spaces, a label tag and timestamps are removed.
    report = ev.evaluate([
        _row("<TRANSCRIBE>", "Hello,   WORLD!  How are you?", "hello world how are you"),
        _row("<TRANSCRIBE> <ALIGN>", "<0.0> good <0.4> morning <0.9>", "<0.0>good<0.5> morning<1.0>"),
    ])
    assert report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_en"]["wer"] == 0.0
    assert report["tasks"]["<TRANSCRIBE> <ALIGN>"]["metrics"]["transcript_en"]["wer"] == 0.0
    assert ev.normalize_transcript("It's  FINE, really.<SAD>", "en") == ["its", "fine", "really"]


def test_punctuation_separates_words_and_apostrophes_join_them():
    # A dash or a decimal point between words is a word boundary; an apostrophe is part of the word.
    assert ev.normalize_transcript("stop\u2014it's 3.5", "en") == ["stop", "its", "3", "5"]
    assert ev.normalize_transcript("Don\u2019t  stop-it, OK?", "en") == ["dont", "stop", "it", "ok"]
    report = ev.evaluate([_row("<TRANSCRIBE>", "Stop, it's 3 5", "stop\u2014it's 3.5", key="a"),
                          _row("<TRANSCRIBE>", "stopits 35", "stop\u2014it's 3.5", key="b")])
    m = report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_en"]
    # Row a matches word for word; row b has merged words: 2 substitutions and 2 deletions of 4.
    assert m["reference_tokens"] == 8 and m["wer"] == pytest.approx(4 / 8)


def test_chinese_cer_counts_characters_and_ignores_punctuation():
    # 今天天气很好 (6 characters) vs 今天天气不好 with a full-width comma: 1 substitution / 6.
    report = ev.evaluate([_row("<TRANSCRIBE>", "今天，天气不好。", "今天天气很好")])
    m = report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_zh"]
    assert m["metric"] == "cer"
    assert m["cer"] == pytest.approx(1 / 6)
    assert m["reference_tokens"] == 6
    # A Latin word inside Chinese text is one token; the row's language wins over the script.
    assert ev.normalize_transcript("我用 iPhone 拍照", "zh") == ["我", "用", "iphone", "拍", "照"]
    report = ev.evaluate([_row("<TRANSCRIBE>", "ab", "abc", language="zh")])
    assert report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_zh"]["cer"] == pytest.approx(1.0)


def test_mixed_languages_are_reported_apart():
    report = ev.evaluate([
        _row("<TRANSCRIBE>", "a b", "a b", key="en"),
        _row("<TRANSCRIBE>", "你们", "你好", key="zh"),
    ])
    metrics = report["tasks"]["<TRANSCRIBE>"]["metrics"]
    assert metrics["transcript_en"]["wer"] == 0.0
    assert metrics["transcript_zh"]["cer"] == pytest.approx(0.5)


def test_emotion_accuracy_per_class_and_confusion():
    rows = [
        _row("<EMOTION>", "<SAD>", "<SAD>", key="1"),
        _row("<EMOTION>", "<HAPPY>", "<SAD>", key="2"),
        _row("<EMOTION>", "<happy>", "<HAPPY>", key="3"),
        _row("<EMOTION>", "I think it is sad", "<NEUTRAL>", key="4"),  # no tag: counted wrong, as <none>
        _row("<EMOTION>", "<SAD>", "<&&>", key="5"),  # unknown reference: not scored
    ]
    m = ev.evaluate(rows)["tasks"]["<EMOTION>"]["metrics"]["emotion"]
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert (m["scored"], m["correct"], m["unscored_no_reference"]) == (4, 2, 1)
    assert m["confusion"] == {"sad": {"sad": 1, "happy": 1}, "happy": {"happy": 1}, "neutral": {ev.NONE_CLASS: 1}}
    assert m["per_class"]["sad"] == {"support": 2, "predicted": 1, "correct": 1, "recall": 0.5, "precision": 1.0}
    assert m["per_class"]["happy"]["precision"] == pytest.approx(0.5)
    assert m["per_class"][ev.NONE_CLASS]["predicted"] == 1


def test_labels_after_a_transcript_and_multi_word_styles():
    rows = [
        _row("<TRANSCRIBE> <AGE> <GENDER>", "hello there<ADULT><MALE>", "hello there<ADULT><FEMALE>", key="1"),
        _row("<TRANSCRIBE> <AGE> <GENDER>", "hello<OLD><FEMALE>", "hello world<CHILD><FEMALE>", key="2"),
        _row("<STYLE>", "<HORROR_STORY>", "<HORROR STORY>", key="3"),
        _row("<STYLE>", "<news/science>", "<NEWS/SCIENCE>", key="4"),
    ]
    tasks = ev.evaluate(rows)["tasks"]
    combo = tasks["<TRANSCRIBE> <AGE> <GENDER>"]["metrics"]
    assert combo["age"]["accuracy"] == pytest.approx(1 / 2)
    assert combo["gender"]["accuracy"] == pytest.approx(1 / 2)
    # Transcript part: 0 errors in row 1, 1 deletion of 3 words total: 1/4 over both rows.
    assert combo["transcript_en"]["wer"] == pytest.approx(1 / 4)
    assert tasks["<STYLE>"]["metrics"]["style"]["accuracy"] == 1.0


def test_caption_event_sets():
    rows = [
        _row("<CAPTION>", "<LAUGH>", "<LAUGH>", key="1"),  # tp 1
        _row("<CAPTION>", "<LAUGH><COUGH>", "<COUGH><SIGH>", key="2"),  # tp 1 (cough), fp laugh, fn sigh
        _row("<CAPTION>", "", "<CRY>", key="3"),  # fn cry
    ]
    m = ev.evaluate(rows)["tasks"]["<CAPTION>"]["metrics"]["events"]
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["per_event"]["cough"] == {"tp": 1}


def test_think_fields_and_free_form_tasks():
    ref = ("<think>User's words: I lost my job; Age: <adult>; Gender: <female>; Emotion: <sad>; "
           "Sound event: <&&>; Reply emotion: <WORRIED>; <think end>I'm so sorry to hear that.")
    hyp = ("<think>User's words: I lost my job; Age: <adult>; Gender: <male>; Emotion: <sad>; "
           "Sound event: <cough>; Reply emotion: <SORRY>; <think end>Oh no.")
    # OSUM's spacing (`Age:<adult>`), several events compared as a set, and <none>.
    ref2 = "<think>User's words: ha; Age:<child>; Gender:<male>; Sound event:<laugh><cough>; Emotion:<happy>; Reply emotion:<HAPPY><think end>Fun!"
    hyp2 = "<think>User's words: ha; Age:<child>; Gender:<male>; Sound event:<cough><laugh>; Emotion:<happy>; Reply emotion:<HAPPY><think end>Yes"
    ref3 = "<think>User's words: hm; Age: <old>; Gender: <male>; Sound event: <none>; Emotion: <neutral>; Reply emotion: <NEUTRAL><think end>Ok"
    hyp3 = "<think>User's words: hm; Age: <old>; Gender: <male>; Sound event: <sigh>; Emotion: <neutral>; Reply emotion: <NEUTRAL><think end>Ok"
    report = ev.evaluate([
        _row("<S2TCHAT> <THINK>", hyp, ref, key="1"),
        _row("<S2TCHAT> <THINK>", hyp2, ref2, key="1b"),
        _row("<S2TCHAT> <THINK>", hyp3, ref3, key="1c"),
        _row("<S2TCHAT>", "Sure.", "Of course.", key="2"),
        _row("<S2TCHAT>", "Hi.", None, key="3"),
    ])
    think = report["tasks"]["<S2TCHAT> <THINK>"]["metrics"]
    assert think["think_age"]["accuracy"] == 1.0
    assert think["think_gender"]["accuracy"] == pytest.approx(2 / 3)
    assert think["think_emotion"]["accuracy"] == 1.0
    assert think["think_reply_emotion"]["accuracy"] == pytest.approx(2 / 3)
    events = think["think_sound_event"]
    assert (events["scored"], events["correct"], events["unscored_no_reference"]) == (2, 1, 1)
    assert events["confusion"] == {"none": {"sigh": 1}, "cough+laugh": {"cough+laugh": 1}}
    chat = report["tasks"]["<S2TCHAT>"]
    assert chat["metrics"] == {} and chat["rows"] == 2 and chat["without_reference"] == 1
    assert "no reference metric" in chat["note"]


def test_unknown_task_is_skipped_with_a_reason():
    report = ev.evaluate([_row("<TRANSLATE>", "x", "y"), _row("<TRANSCRIBE>", "a", "a")])
    assert list(report["tasks"]) == ["<TRANSCRIBE>"]
    (reason, count), = report["skipped"].items()
    assert count == 1 and "unknown task '<TRANSLATE>'" in reason
    # Spacing between tags does not matter.
    assert "<TRANSCRIBE> <EMOTION>" in ev.evaluate([_row("<TRANSCRIBE><EMOTION>", "a<SAD>", "a<SAD>")])["tasks"]
    # Tag orders and repeats that training does not take are skipped too.
    report = ev.evaluate([_row("<STYLE> <TRANSCRIBE>", "a", "a"), _row("<EMOTION> <EMOTION>", "<SAD>", "<SAD>")])
    assert report["tasks"] == {} and sum(report["skipped"].values()) == 2


def test_every_label_combination_training_takes_is_scored():
    rows = [
        _row("<TRANSCRIBE> <STYLE>", "good evening<NEWS/SCIENCE>", "good evening all<NEWS/SCIENCE>", key="1"),
        _row("<TRANSCRIBE> <STYLE>", "hello<AUDIOBOOK>", "hello<FAIRY TALE>", key="2"),
        _row("<AGE> <GENDER>", "<ADULT><FEMALE>", "<ADULT><MALE>", key="3"),
        _row("<GENDER> <AGE>", "<FEMALE><OLD>", "<FEMALE><OLD>", key="4"),
        _row("<TRANSCRIBE> <CAPTION>", "oh no<COUGH>", "oh no<COUGH><SIGH>", key="5"),
    ]
    report = ev.evaluate(rows)
    assert report["skipped"] == {}
    tasks = report["tasks"]
    style = tasks["<TRANSCRIBE> <STYLE>"]["metrics"]
    assert style["style"]["accuracy"] == pytest.approx(1 / 2)
    assert style["transcript_en"]["wer"] == pytest.approx(1 / 4)  # one deletion in 4 reference words
    pair = tasks["<AGE> <GENDER>"]["metrics"]
    assert (pair["age"]["accuracy"], pair["gender"]["accuracy"]) == (1.0, 0.0)
    assert tasks["<GENDER> <AGE>"]["metrics"]["gender"]["accuracy"] == 1.0
    caption = tasks["<TRANSCRIBE> <CAPTION>"]["metrics"]
    assert caption["transcript_en"]["wer"] == 0.0 and caption["events"]["recall"] == pytest.approx(1 / 2)


def test_cli_writes_report_and_table(tmp_path, capsys):
    preds = _write(tmp_path / "preds.jsonl", [
        _row("<TRANSCRIBE>", "the cat sat down", "the dog sat down", key="1"),
        _row("<GENDER>", "<FEMALE>", "<FEMALE>", key="2"),
        _row("<BOGUS>", "x", "y", key="3"),
    ])
    assert main(["eval", "--predictions", str(preds)]) == 0
    out, err = capsys.readouterr()
    assert "transcript_en WER" in out and "0.2500" in out and "gender acc" in out
    assert "unknown task '<BOGUS>'" in err
    report = json.loads((tmp_path / "preds.eval.json").read_text(encoding="utf-8"))
    assert report["rows"] == 3
    assert report["tasks"]["<GENDER>"]["metrics"]["gender"]["accuracy"] == 1.0
    assert report["tasks"]["<TRANSCRIBE>"]["metrics"]["transcript_en"]["wer"] == pytest.approx(0.25)


def test_cli_rejects_bad_files_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "1", "task": "<AGE>", "prediction": "<ADULT>", "reference": "<ADULT>"}\n{oops\n', encoding="utf-8")
    assert main(["eval", "--predictions", str(bad)]) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    missing = _write(tmp_path / "missing.jsonl", [{"key": "1", "task": "<AGE>", "prediction": "<ADULT>"}])
    assert main(["eval", "--predictions", str(missing)]) == 2
    assert "missing.jsonl:1: missing key(s) reference" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
