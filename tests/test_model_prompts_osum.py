"""The `osum` prompt profile: samples laid out exactly as OSUM-EChat's own code lays them out.

Every expectation here is rebuilt from OSUM's documented rules (processor.py `tokenize`,
llmasr_model_instruct_version.py `forward`, commit f2bcfac) by this file's own small
reimplementation, NOT through model/osum_prompts.py: the system prompts are written out below, the
text rule (`process_text2`) is re-coded, each piece is tokenized on its own as their forward does,
and the `<&&>` rule masks the middle token(s) of the placeholder.
"""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
import soundfile as sf
import yaml

from echat.model import osum_prompts, prompts
from echat.model.batch import IGNORE_INDEX
from echat.model.config import ModelConfigError, config_from_dict, load_config
from echat.model.features import AudioRef
from echat.model.samples import SampleBuilder
from echat.model.tokenizer import load_tokenizer, special_token_ids

# OSUM-EChat's system prompts (their forward(), output types in the comments), typed out here.
SYSTEM = {
    "understand": "You are OSUM-chat, an audio understanding assistant by ASLP Lab. You can transcribe speech "
                  "accurately and analyze paralinguistic cues to provide precise text responses.",  # text
    "s2t_chat": "You are OSUM-chat, a speech-to-text dialogue assistant by ASLP Lab. You understand both the "
                "meaning and paralinguistic cues in speech then respond exclusively with appropriate text.",
    "s2t_think": "You are OSUM-chat, a thinking-enabled speech-to-text dialogue assistant by ASLP Lab. You not only "
                 "comprehend the semantic meaning and paralinguistic cues in speech but also engage in deliberate "
                 "reasoning to process such information. Based on this thinking process, you then respond "
                 "exclusively with appropriate text.",  # s2t_chat_think
    "s2s": "You are OSUM-chat, a speech-to-speech dialogue assistant by ASLP Lab. You understand both the meaning "
           "and paralinguistic cues in speech then respond with appropriate text and emotionally matching "
           "synthetic speech.",  # speech2text_token
    "s2s_think": "You are OSUM-chat, a speech-to-speech dialogue assistant by ASLP Lab. You understand both the "
                 "meaning and paralinguistic cues in speech. Before responding, first output your reasoning inside "
                 "<think>...</think end>, analyzing the user\u2019s words and vocal cues. Then generate a reply with "
                 "appropriate text and emotionally matched synthetic speech.",  # speech2text_token_think
    "tts": "You are OSUM-chat, a speech synthesis assistant by ASLP Lab. You generate natural and fluent speech "
           "from text input.",  # text2token
    "t2t": "You are OSUM-chat, a text-to-text dialogue assistant by ASLP Lab. You understand user input in text "
           "then respond exclusively with appropriate text.",  # text2text
}
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"

TRANSCRIPT = "I feel  so tired 今天 真的 很累"
REPLY = "That sounds exhausting <3 . Maybe rest a little."
TAGS_TRACE = ("<think>User's words: i feel so tired; Age: <adult>; Gender: <female>; Emotion: <sad>; "
              "Sound event: <&&>; Reply emotion: <SAD><think end>")
NATURAL_TRACE = "<think>She sounds worn out and sad, so a gentle answer fits.<think end>"
CODES = [5, 17, 4095, 0, 256]
SECONDS = 1.37  # 137 mel frames: not a multiple of 8, so the speech length rounds


def _flac(seconds: float) -> tuple[bytes, int]:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue(), len(t)


def _record(**fields) -> dict:
    data, n = _flac(SECONDS)
    rec = {"id": "rec-osum", "_audio": AudioRef(data=data), "_num_samples": n, "language": "en",
           "transcript": TRANSCRIPT, "gender": "female", "age": "adult", "emotion": "sad",
           "events": ["cough"], "style": "daily conversation", "reply_text": REPLY,
           "reply_speech_tokens": CODES,
           "words": [{"word": "I", "start": 0.04, "end": 0.21}, {"word": "feel", "start": 0.21, "end": 0.55}]}
    rec.update(fields)
    return rec


def _tiny_config(profile: str):
    data = yaml.safe_load(load_config("tiny").to_yaml())
    data["prompt_profile"] = profile
    return config_from_dict(data)


@pytest.fixture(scope="module")
def osum_tok():
    return load_tokenizer(_tiny_config("osum"))


# ----------------------------------------------------------------------------- the reference rules


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def their_text_rule(text: str, task: str) -> str:
    """processor.py `process_text2`, typed again (after `txt.replace("\\n", " ")`)."""
    text = text.replace("\n", " ")
    text = re.sub(r"\s*([\u4e00-\u9fff])\s*", r"\1", text)
    if task == "<TRANSCRIBE>":
        text = text.lower()
    text = re.sub(r"\s*<\s*", "<", text)
    return re.sub(r"\s*>\s*", ">", text)


def their_sample(tok, kind: str, target: str | None, task: str, *, prompt: str | None = None,
                 speech: bool = True, tts_text: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) as their forward concatenates the pieces, speech as one <|audio|>."""
    ids: list[int] = []
    labels: list[int] = []

    def masked(piece: list[int]) -> None:
        ids.extend(piece)
        labels.extend([IGNORE_INDEX] * len(piece))

    masked(_ids(tok, f"<|im_start|>system\n{SYSTEM[kind]}<|im_end|>\n<|im_start|>user\n"))
    if prompt is not None:
        masked(_ids(tok, prompt))
    if speech:
        masked(_ids(tok, "<|audio|>"))
    if tts_text is not None:
        masked(_ids(tok, their_text_rule(tts_text, "<TEXT2TOKEN>")))
    masked(_ids(tok, ASSISTANT))
    if target is not None:
        middle = set(_ids(tok, "<&&>")[1:-1])  # `<`, then the piece(s) their loss masks, then `>`
        body = _ids(tok, their_text_rule(target, task))
        if not target.endswith("<&&>"):
            body.append(tok.eos_token_id)
        ids.extend(0 if i in middle else i for i in body)
        labels.extend(IGNORE_INDEX if i in middle else i for i in body)
    return ids, labels


def _build(tok, task: str, record: dict, seed: int = 3, **kw):
    instructions = {task: ("请转写这段音频 , 并给出 <> 标签。",)} if task in osum_prompts.instructed_tags() or kw.pop("instructed", False) else {}
    builder = SampleBuilder(tok, {task: 1.0}, instructions=instructions or None, **kw)
    return builder.build_task(record, task, random.Random(seed)), (instructions.get(task) or (None,))[0]


# ----------------------------------------------------------------------------- tokenizer


def test_markers_are_plain_text_under_osum_and_single_tokens_under_echat(osum_tok):
    plain = ("<think>", "<think end>", "<&&>", "<TRANSCRIBE>", "<S2TCHAT>", "<THINK>")
    added = osum_tok.get_added_vocab()
    assert not [t for t in plain if t in added]
    assert all(len(_ids(osum_tok, t)) > 1 for t in plain)
    # What their tokenizer adds is [PAD] (the pad token); <|audio|> is our placeholder the LLM never sees.
    assert set(added) - {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} == {"[PAD]", "<|audio|>"}
    assert osum_tok.pad_token == "[PAD]" and osum_tok.eos_token == "<|im_end|>"
    assert prompts.tokenizer_profile(osum_tok) == "osum"
    ids = special_token_ids(osum_tok)
    assert ids.think_start is None and ids.unknown is None and ids.pad == osum_tok.convert_tokens_to_ids("[PAD]")

    echat = load_tokenizer("tiny")
    assert prompts.tokenizer_profile(echat) == "echat"
    assert all(t in echat.get_added_vocab() and len(_ids(echat, t)) == 1 for t in plain)
    # Same BPE underneath: ordinary text encodes to the same ids in both.
    assert _ids(echat, "I feel so tired today.") == _ids(osum_tok, "I feel so tired today.")


def test_an_echat_tokenizer_is_refused_for_the_osum_profile():
    from echat.model.tokenizer import ensure_special_tokens

    with pytest.raises(ValueError, match="<think>.*plain text"):
        ensure_special_tokens(load_tokenizer("tiny"), "osum")


def test_prompt_profile_is_validated_and_set_for_the_release_configs():
    with pytest.raises(ModelConfigError, match=r"unknown prompt profile 'qwen'; choices: echat, osum"):
        _tiny_config("qwen")
    assert load_config("tiny").prompt_profile == "echat"
    assert load_config("osum-echat").prompt_profile == "osum"
    assert load_config("osum").prompt_profile == "osum"


# ----------------------------------------------------------------------------- layouts, task by task

UNDERSTANDING = {
    "<TRANSCRIBE>": TRANSCRIPT,
    "<TRANSCRIBE> <ALIGN>": "<0.0>I<0.2> <0.2>feel<0.6>",
    "<EMOTION>": "<SAD>",
    "<GENDER>": "<FEMALE>",
    "<AGE>": "<ADULT>",
    "<STYLE>": "<DAILY CONVERSATION>",
    "<CAPTION>": "<COUGH>",
    "<TRANSCRIBE> <EMOTION>": TRANSCRIPT + "<SAD>",
    "<TRANSCRIBE> <AGE> <GENDER>": TRANSCRIPT + "<ADULT><FEMALE>",
}


@pytest.mark.parametrize("task", list(UNDERSTANDING))
def test_understanding_tasks_match_their_layout(osum_tok, task):
    sample, instruction = _build(osum_tok, task, _record())
    want = their_sample(osum_tok, "understand", UNDERSTANDING[task], task, prompt=instruction)
    assert (sample.input_ids, sample.labels) == want
    assert sample.speech_tokens == []


# Label combinations outside the table that the osum profile instructs from its own files.
COMBINATIONS = {
    "<TRANSCRIBE> <STYLE>": TRANSCRIPT + "<DAILY CONVERSATION>",
    "<TRANSCRIBE> <GENDER>": TRANSCRIPT + "<FEMALE>",
    "<TRANSCRIBE> <AGE>": TRANSCRIPT + "<ADULT>",
    "<TRANSCRIBE> <CAPTION>": TRANSCRIPT + "<LAUGH><COUGH>",  # every event heard, in the record's order
    "<AGE> <GENDER>": "<ADULT><FEMALE>",
}


def _file_instructions(task: str) -> list[str]:
    """The task's instructions as the two data files list them (Chinese, then English), read here."""
    items: list[str] = []
    for lang in ("zh", "en"):
        data = yaml.safe_load((osum_prompts.osum_dir() / f"instructions_{lang}.yaml").read_text(encoding="utf-8"))
        assert task in data, (lang, task)
        items += [s.strip() for s in data[task]]
    return items


@pytest.mark.parametrize("task", list(COMBINATIONS))
def test_label_combinations_build_with_the_files_instructions_and_match_their_layout(osum_tok, task):
    assert task in osum_prompts.instructed_tags()  # so the coverage test checks its lists
    candidates = _file_instructions(task)
    layouts = {}
    for instruction in candidates:
        ids, labels = their_sample(osum_tok, "understand", COMBINATIONS[task], task, prompt=instruction)
        layouts[(tuple(ids), tuple(labels))] = instruction
    builder = SampleBuilder(osum_tok, {task: 1.0})  # the osum profile's own instruction files
    assert builder.profile == "osum"
    drawn = set()
    for seed in range(6):
        sample = builder.build_task(_record(events=["laugh", "cough"]), task, random.Random(seed))
        got = (tuple(sample.input_ids), tuple(sample.labels))
        assert got in layouts, (task, seed)
        drawn.add(layouts[got])
        assert sample.speech_tokens == [] and sample.audio is not None
        trained = osum_tok.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX])
        assert trained == their_text_rule(COMBINATIONS[task], task) + osum_tok.eos_token
    assert len(drawn) > 1  # drawn from the lists, not one fixed instruction


def test_transcribe_targets_are_normalised_as_theirs(osum_tok):
    sample, _ = _build(osum_tok, "<TRANSCRIBE>", _record())
    trained = osum_tok.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX])
    assert trained == "i feel  so tired今天真的很累<|im_end|>"  # lower case, no spaces at CJK; others kept
    labelled, _ = _build(osum_tok, "<TRANSCRIBE> <EMOTION>", _record())
    trained = osum_tok.decode([t for t, lab in zip(labelled.input_ids, labelled.labels) if lab != IGNORE_INDEX])
    assert trained.startswith("I feel")  # only the plain <TRANSCRIBE> task is lower-cased


def test_chat_and_speech_tasks_match_their_layout(osum_tok):
    record = _record()
    cases = [
        ("<S2TCHAT>", "s2t_chat", REPLY, [], {}),
        ("<S2TCHAT> <TEXT2TOKEN>", "s2s", REPLY, CODES, {}),
    ]
    for task, kind, target, codes, kw in cases:
        sample, _ = _build(osum_tok, task, record, **kw)
        assert (sample.input_ids, sample.labels) == their_sample(osum_tok, kind, target, task), task
        assert sample.speech_tokens == codes

    tts, _ = _build(osum_tok, "<TEXT2TOKEN>", record)
    assert (tts.input_ids, tts.labels) == their_sample(osum_tok, "tts", None, "<TEXT2TOKEN>", speech=False, tts_text=REPLY)
    assert tts.speech_tokens == CODES and tts.audio is None and set(tts.labels) == {IGNORE_INDEX}

    t2t, _ = _build(osum_tok, "<TEXT2TEXT>", record)  # their prompt is the question itself
    assert (t2t.input_ids, t2t.labels) == their_sample(osum_tok, "t2t", REPLY, "<TEXT2TEXT>", prompt=TRANSCRIPT, speech=False)


@pytest.mark.parametrize("task,kind,codes", [("<S2TCHAT> <THINK>", "s2t_think", []),
                                             ("<S2TCHAT> <TEXT2TOKEN> <THINK>", "s2s_think", CODES)])
def test_natural_reasoning_matches_their_layout(osum_tok, task, kind, codes):
    sample, _ = _build(osum_tok, task, _record(think_text=NATURAL_TRACE))
    target = NATURAL_TRACE + REPLY  # `<think>{think_str}<think end>{txt}`
    assert (sample.input_ids, sample.labels) == their_sample(osum_tok, kind, target, task)
    assert sample.speech_tokens == codes


def _their_tag_trace(unknown: bool) -> str:
    events = "<&&>" if unknown else "<OTHER>"
    return ("<think>用户说的话是:i feel so tired,年龄为:<ADULT>,性别为:<FEMALE>,情感为:<SAD>,"
            f"声音事件为:{events},推测使用的回复情感为:<悲伤>,我应该综合用户的语义和副语言信息给出专业且对应的回答<think end>")


@pytest.mark.parametrize("task,kind", [("<S2TCHAT> <THINK>", "s2t_think"), ("<S2TCHAT> <TEXT2TOKEN> <THINK>", "s2s_think")])
def test_tag_form_reasoning_matches_their_template_and_masks_the_middle_of_the_placeholder(osum_tok, task, kind):
    record = _record(think_tags=TAGS_TRACE, events=None)
    with_placeholder = their_sample(osum_tok, kind, _their_tag_trace(True) + "<悲伤>" + REPLY, task)
    with_default = their_sample(osum_tok, kind, _their_tag_trace(False) + "<悲伤>" + REPLY, task)
    assert with_placeholder != with_default
    seen = []
    for seed in range(60):
        sample, _ = _build(osum_tok, task, record, seed=seed)
        got = (sample.input_ids, sample.labels)
        assert got in (with_placeholder, with_default), seed
        seen.append(got == with_placeholder)
    assert 0.65 < sum(seen) / len(seen) < 0.98  # their unknown_rate 0.85: mostly `<&&>`, sometimes the default

    # The placeholder's `<` and `>` are trained, its middle is masked and fed as id 0.
    ids, labels = with_placeholder
    lt, *middle, gt = _ids(osum_tok, "<&&>")
    hidden = [i for i, (t, lab) in enumerate(zip(ids, labels)) if lab == IGNORE_INDEX and t == 0]
    assert len(hidden) == len(middle) >= 1
    assert labels[hidden[0] - 1] == lt and labels[hidden[-1] + 1] == gt


def test_a_target_ending_with_the_placeholder_gets_no_eos(osum_tok):
    face = osum_prompts.load_interface()
    encoder = prompts.ChatEncoder(osum_tok)
    with_eos, _ = encoder.encode(osum_prompts.target_segments("reply <SAD>", "<S2TCHAT>", encoder, face))
    without, labels = encoder.encode(osum_prompts.target_segments("reply<&&>", "<S2TCHAT>", encoder, face))
    assert with_eos[-1] == osum_tok.eos_token_id and without[-1] != osum_tok.eos_token_id
    assert labels[-1] == _ids(osum_tok, ">")[0]


def test_inference_prompts_follow_the_profile(osum_tok):
    encoder = prompts.ChatEncoder(osum_tok)
    ids, _ = their_sample(osum_tok, "s2t_think", None, "<S2TCHAT> <THINKER>")
    assert encoder.prompt_ids("s2t_think") == ids
    with pytest.raises(ValueError, match="understanding tasks only"):
        encoder.prompt_ids("s2t_chat", instruction="Reply to me.")


def test_what_osum_cannot_lay_out_is_refused(osum_tok):
    with pytest.raises(ValueError, match="<HISTORY>.*osum"):
        SampleBuilder(osum_tok, {"<HISTORY>": 1.0})
    with pytest.raises(ValueError, match="chat_instruction_ratio"):
        SampleBuilder(osum_tok, {"<S2TCHAT>": 1.0}, chat_instruction_ratio=0.5)


def test_osum_task_names_resolve_to_ours():
    face = osum_prompts.load_interface()
    assert face.osum_task("<S2TCHAT> <THINK>") == "<S2TCHAT> <THINKER>"
    assert face.osum_task("<TRANSCRIBE>") == "<TRANSCRIBE>"
    from echat.schemas import tasks

    assert tasks.task("<S2TCHAT> <THINKER>").tag == "<S2TCHAT> <THINK>"


# ----------------------------------------------------------------------------- the data files


def test_instructions_cover_every_instructed_tag_in_both_languages():
    table = osum_prompts.load_instructions()
    for tag in osum_prompts.instructed_tags():
        items = table[tag]
        zh = [s for s in items if re.search(r"[\u4e00-\u9fff]", s)]
        en = [s for s in items if not re.search(r"[\u4e00-\u9fff]", s)]
        assert len(zh) >= 30 and len(en) >= 30, tag
        assert len(set(items)) == len(items), tag
    assert prompts.load_instructions(profile="osum") == table


def test_a_tag_without_instructions_is_an_error_naming_it(tmp_path):
    src = osum_prompts.osum_dir()
    for name in ("instructions_en.yaml", "instructions_zh.yaml"):
        (tmp_path / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    data = yaml.safe_load((tmp_path / "instructions_zh.yaml").read_text(encoding="utf-8"))
    del data["<AGE>"]
    (tmp_path / "instructions_zh.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(osum_prompts.OsumProfileError, match=r"instructions_zh.yaml: no instructions for task\(s\) <AGE>"):
        osum_prompts.load_instructions(tmp_path)
    (tmp_path / "instructions_zh.yaml").write_text((src / "instructions_zh.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "instructions_en.yaml").write_text('"<NOPE>": [a]\n', encoding="utf-8")
    with pytest.raises(osum_prompts.OsumProfileError, match="<NOPE>"):
        osum_prompts.load_instructions(tmp_path)


def test_the_interface_files_are_checked(tmp_path):
    src = osum_prompts.osum_dir()
    (tmp_path / "interface.yaml").write_text((src / "interface.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    prompts_data = yaml.safe_load((src / "system_prompts.yaml").read_text(encoding="utf-8"))
    assert prompts_data == SYSTEM  # the data file holds their strings exactly
    del prompts_data["tts"]
    (tmp_path / "system_prompts.yaml").write_text(yaml.safe_dump(prompts_data), encoding="utf-8")
    with pytest.raises(osum_prompts.OsumProfileError, match="missing tts"):
        osum_prompts.load_interface(tmp_path)


# ----------------------------------------------------------------------------- sequence length


@pytest.mark.parametrize("profile", ["echat", "osum"])
def test_seq_len_is_the_assembled_length(profile):
    import torch

    from echat.model.data import collate
    from echat.model.features import LogMelExtractor
    from echat.model.osum import build_model

    cfg = _tiny_config(profile)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=tok).eval()
    tasks = ["<TRANSCRIBE>", "<EMOTION>", "<S2TCHAT>", "<S2TCHAT> <TEXT2TOKEN>", "<S2TCHAT> <TEXT2TOKEN> <THINK>",
             "<TEXT2TOKEN>", "<TEXT2TEXT>"]
    builder = SampleBuilder(tok, {t: 1.0 for t in tasks})
    samples = []
    for seconds in (1.37, 2.05):
        data, n = _flac(seconds)
        record = _record(_audio=AudioRef(data=data), _num_samples=n, think_text=NATURAL_TRACE)
        samples += [builder.build_task(record, t, random.Random(1)) for t in tasks]
    batch = collate(samples, LogMelExtractor(), builder.encoder.pad_id)
    with torch.no_grad():
        lengths = model.assemble(batch).lengths.tolist()
    assert [s.seq_len for s in samples] == lengths


def test_reasoning_markers_are_found_as_text_at_inference(osum_tok):
    """Under osum `<think end>` is several plain tokens: chat() cuts the reasoning where its text
    closes the trace, and a whole chat with reasoning runs on a tiny osum model."""
    import torch

    from echat.model.inference import Predictor
    from echat.model.osum import build_model

    tokens = _ids(osum_tok, "she sounds tired<think end>I am sorry")
    cfg = _tiny_config("osum")
    torch.manual_seed(0)
    predictor = Predictor(build_model(cfg, tokenizer=osum_tok), osum_tok, cfg)
    before, marker = predictor._cut_at_text(tokens, "<think end>")
    assert osum_tok.decode(before) == "she sounds tired" and osum_tok.decode(marker) == "<think end>"
    assert predictor._cut_at_text(_ids(osum_tok, "no marker here"), "<think end>")[1] is None
    assert predictor.instructions == prompts.load_instructions(profile="osum")

    data, _ = _flac(1.0)
    result = predictor.chat(data, think=True, speech=False, max_think_tokens=6, max_reply_tokens=4, seed=0)
    assert result.text.startswith("<think>")  # an untrained model does not close it: the end is forced
    assert result.think_forced_end or result.finished
