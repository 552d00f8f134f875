"""The model's data path: records -> samples (prompts, masks, targets), features, the streaming loader.

Records carry real speech (espeak-ng, or a tone when it is missing) stored as FLAC in a parquet shard
written through the record schema, exactly as the pipeline writes them.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
import torch

from echat.model import prompts
from echat.model.batch import IGNORE_INDEX, Batch
from echat.model.data import ShardLoader, build_dataloader, dynamic_batches, sample_frames, shuffle_buffer
from echat.model.data_sources import (
    COLUMNS,
    DataSourceError,
    parse_align_text,
    plan_units,
    read_unit,
    record_from_osum,
    resolve_files,
)
from echat.model.features import AudioRef, LogMelExtractor, audio_num_samples, decode_audio
from echat.model.samples import Sample, SampleBuilder, align_text
from echat.schemas import record as record_schema
from echat.schemas import vocab

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio|>", "<think>", "<think end>", "<&&>",
    *dict.fromkeys(tag for task in vocab.TASK_TAGS for tag in task.split()),
]

THINK_TAGS = (
    "<think>User's words: i feel so tired; Age: <adult>; Gender: <female>; Emotion: <sad>; "
    "Sound event: <&&>; Reply emotion: <WORRIED><think end>"
)
THINK_TEXT = "<think>She sounds exhausted and a little sad, so a gentle, caring answer fits.<think end>"

ALL_TASKS = {task: 1.0 for task in vocab.TASK_TAGS} | {
    "<TRANSCRIBE> <GENDER>": 1.0,
    "<TRANSCRIBE> <CAPTION>": 1.0,
    "<AGE> <GENDER>": 1.0,
}


# ----------------------------------------------------------------------------- fixtures


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [
        "I feel so tired today and I do not know why.",
        "Transcribe the speech in this audio into text.",
        "You are a speech-to-text dialogue assistant.",
        "That sounds exhausting. Maybe a short rest would help you feel better.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", extra_special_tokens=SPECIALS[3:]
    )


@pytest.fixture(scope="module", params=["throwaway", "tiny"])
def tokenizer(request):
    if request.param == "throwaway":
        return _train_tokenizer()
    from echat.model.tokenizer import tiny_tokenizer  # the bundled one: missing data is a packaging bug, not a skip

    return tiny_tokenizer()


def _speech(text: str, tmp: Path, seconds: float = 1.5) -> np.ndarray:
    """Speech of `text` at 16 kHz from espeak-ng (a tone when espeak-ng is not installed)."""
    if shutil.which("espeak-ng"):
        wav = tmp / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", "en+f3", "-w", str(wav), text], check=True, capture_output=True)
        data, rate = sf.read(wav, dtype="float32")
        return soxr.resample(data, rate, 16000).astype(np.float32)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _flac(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="FLAC")
    return buf.getvalue()


def _record(i: int, wav: np.ndarray, **fields) -> dict:
    duration = len(wav) / 16000
    rec = {
        "id": f"rec{i:03d}",
        "source_uri": f"/data/in/{i}.wav",
        "audio": {"bytes": _flac(wav), "path": f"{i}.flac"},
        "sampling_rate": 16000,
        "duration": duration,
        "segment_start": 0.0,
        "segment_end": duration,
        "language": "en",
        "schema_version": record_schema.SCHEMA_VERSION,
        "pipeline_version": "test",
    }
    rec.update(fields)
    return rec


def _rich_fields() -> dict:
    return dict(
        transcript="I feel so tired today",
        words=[
            {"word": "I", "start": 0.04, "end": 0.21, "score": 0.9},
            {"word": "feel", "start": 0.21, "end": 0.55, "score": 0.9},
            {"word": "so", "start": 0.55, "end": 0.71, "score": 0.9},
            {"word": "tired", "start": 0.71, "end": 1.18, "score": 0.9},
            {"word": "today", "start": 1.18, "end": 1.66, "score": 0.9},
        ],
        gender="female", gender_score=0.9, gender_model="test",
        age="adult", age_score=0.8, age_model="test",
        emotion="sad", emotion_score=0.7, emotion_model="test",
        events=["sigh", "cough"], events_score=0.6, events_model="test",
        style="daily conversation", style_score=0.5, style_model="test",
        think_tags=THINK_TAGS, think_text=THINK_TEXT,
        reply_emotion="WORRIED",
        reply_text="That sounds exhausting. Maybe a short rest would help.",
        reply_speech_tokens=[5, 17, 4095, 0, 256, 1024],
        history=[{"role": "user", "text": "Hi there."}, {"role": "assistant", "text": "Hello! How are you?"}],
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A shard folder with 10 records in row groups of 2, plus the records themselves."""
    tmp = tmp_path_factory.mktemp("shards")
    texts = ["I feel so tired today", "what a lovely morning", "please call me back", "it is raining again", "thank you so much"]
    records = []
    for i in range(10):
        wav = _speech(texts[i % len(texts)], tmp)
        if i == 0:
            fields = _rich_fields()
        elif i % 3 == 1:  # transcript and a low-confidence gender only
            fields = dict(transcript=texts[i % 5], gender="male", gender_score=0.2, emotion=None)
        elif i % 3 == 2:  # a dialogue without speech tokens, natural-language reasoning only
            fields = dict(transcript=texts[i % 5], reply_text="I am here for you.", think_text=THINK_TEXT, emotion="neutral", emotion_score=0.9)
        else:  # a dialogue with speech tokens and the tag-form reasoning
            fields = dict(transcript=texts[i % 5], reply_text="Let us talk about it.", think_tags=THINK_TAGS, reply_speech_tokens=[1, 2, 3, 4], age="old", age_score=0.9)
        records.append(_record(i, wav, **fields))
    table = pa.Table.from_pylist([record_schema.to_row(r) for r in records], schema=record_schema.arrow_schema())
    data = tmp / "out" / "data"
    data.mkdir(parents=True)
    pq.write_table(table.slice(0, 6), data / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(6), data / "train-00001-of-00002.parquet", row_group_size=2)
    # what else `echat build` leaves in its output folder: must not be taken for data
    (tmp / "out" / "rejects").mkdir()
    (tmp / "out" / "rejects" / "rejects-00000-of-00001.jsonl").write_text('{"reason": "x"}\n')
    return {"folder": str(tmp / "out"), "records": records, "tmp": tmp}


def _read_records(folder: str) -> list[dict]:
    units = plan_units(resolve_files([folder]))
    return [r for u in units for r in read_unit(u)]


# ----------------------------------------------------------------------------- instructions & prompts


def test_every_task_tag_has_at_least_eight_english_instructions():
    table = prompts.load_instructions()
    for task in list(vocab.TASK_TAGS) + ["<TRANSCRIBE> <GENDER>", "<TRANSCRIBE> <AGE>", "<TRANSCRIBE> <STYLE>", "<TRANSCRIBE> <CAPTION>", "<AGE> <GENDER>"]:
        assert task in table, task
        assert len(table[task]) >= 8, task
        assert len(set(table[task])) == len(table[task]), f"duplicate instruction for {task}"
        assert all(s.isascii() for s in table[task]), task


def test_malformed_instruction_files_are_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text('"<TRANSCRIBE>": ["Transcribe."]\n')
    (tmp_path / "b.yaml").write_text('"<TRANSCRIBE>": ["Write it down."]\n')
    with pytest.raises(prompts.InstructionError, match="already defined in a.yaml"):
        prompts.load_instructions(tmp_path)
    (tmp_path / "b.yaml").write_text('"<EMOTION>": []\n')
    with pytest.raises(prompts.InstructionError, match="non-empty list"):
        prompts.load_instructions(tmp_path)


def test_task_names_are_normalised_and_checked(tokenizer):
    assert prompts.normalize_task("<TRANSCRIBE><AGE>  <GENDER>") == "<TRANSCRIBE> <AGE> <GENDER>"
    builder = SampleBuilder(tokenizer, {"<TRANSCRIBE><EMOTION>": 1.0})
    assert list(builder.tasks) == ["<TRANSCRIBE> <EMOTION>"]
    with pytest.raises(ValueError, match="unknown task"):
        SampleBuilder(tokenizer, {"<TRANSLATE>": 1.0})
    with pytest.raises(ValueError, match="no instructions"):
        SampleBuilder(tokenizer, {"<STYLE> <EMOTION>": 1.0})
    with pytest.raises(ValueError, match="positive"):
        SampleBuilder(tokenizer, {"<TRANSCRIBE>": 0})


def test_inference_prompt_matches_the_training_prompt(tokenizer, corpus):
    record = _read_records(corpus["folder"])[0]
    builder = SampleBuilder(tokenizer, {"<S2TCHAT>": 1.0})
    sample = builder.build_task(record, "<S2TCHAT>", random.Random(0))
    # The expected prompt, written out as ChatML and tokenized in one piece (not through prompt_segments):
    # the system prompt of speech-to-text chat, then a user turn that is only the audio placeholder.
    text = (f"<|im_start|>system\n{prompts.SYSTEM_PROMPTS[prompts.S2T_CHAT]}<|im_end|>\n"
            "<|im_start|>user\n<|audio|><|im_end|>\n<|im_start|>assistant\n")
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|audio|>")) == 1
    assert sample.input_ids[: len(prompt)] == prompt
    assert builder.encoder.prompt_ids(prompts.S2T_CHAT) == prompt  # what inference sends
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(prompt)])
    # and what follows the prompt is the reply, trained on
    reply = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert reply == f"{record['reply_text']}<|im_end|>"


def test_an_instruction_and_the_user_text_are_two_lines(tokenizer, corpus):
    segments = prompts.prompt_segments(prompts.T2T, instruction="Answer the user's message below.",
                                       user_text="I feel so tired", with_audio=False)
    assert "".join(s.text for s in segments).endswith(
        "<|im_start|>user\nAnswer the user's message below.\nI feel so tired<|im_end|>\n<|im_start|>assistant\n")
    # Training samples are built through the same layout (inference too: test_model_infer's parity test).
    record = next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000")
    builder = SampleBuilder(tokenizer, {"<TEXT2TEXT>": 1.0}, chat_instruction_ratio=1.0)
    text = tokenizer.decode(builder.build_task(record, "<TEXT2TEXT>", random.Random(0)).input_ids)
    user_turn = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    instruction, user_text = user_turn.split("\n")
    assert instruction in prompts.load_instructions()["<TEXT2TEXT>"] and user_text == record["transcript"]
    # Speech follows the instruction directly, as in OSUM.
    segments = prompts.prompt_segments(prompts.UNDERSTAND, instruction="Transcribe the audio.")
    assert "".join(s.text for s in segments).endswith("user\nTranscribe the audio.<|audio|><|im_end|>\n<|im_start|>assistant\n")


def test_system_prompts_and_instructions_hold_no_special_token(tokenizer):
    from echat.model.tokenizer import SPECIAL_TOKENS

    texts = list(prompts.SYSTEM_PROMPTS.values()) + [s for items in prompts.load_instructions().values() for s in items]
    for text in texts:
        assert not [t for t in SPECIAL_TOKENS if t in text], text
        special_ids = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not special_ids & set(ids), text


def test_the_encoder_caches_fixed_pieces_and_instructions_not_user_texts(tokenizer):
    encoder = prompts.ChatEncoder(tokenizer)
    history = [{"role": "user", "text": "Earlier words."}, {"role": "assistant", "text": "An earlier reply."}]
    encoder.prompt_ids(prompts.T2T, instruction="Answer the message below.", user_text="warm up", history=history,
                       with_audio=False)
    cached = dict(encoder._cache)
    for i in range(50):
        ids = encoder.prompt_ids(prompts.T2T, instruction="Answer the message below.", user_text=f"message number {i}",
                                 history=[{"role": "user", "text": f"turn {i}"}], with_audio=False)
        assert tokenizer.decode(ids).endswith(f"below.\nmessage number {i}<|im_end|>\n<|im_start|>assistant\n")
    assert encoder._cache == cached  # no user text or history turn entered it
    assert "Answer the message below.\n" in cached and not any("message number" in k or "turn" in k for k in cached)
    encoder.encode(prompts.target_segments("a reply<&&>"))
    assert "a reply" not in encoder._cache


# ----------------------------------------------------------------------------- samples


def _trained_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX])


def test_a_rich_record_yields_every_task_with_its_target_and_masks(tokenizer, corpus):
    record = next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000")
    builder = SampleBuilder(tokenizer, ALL_TASKS, think_text_ratio=0.5, seed=7)
    assert builder.supported_tasks(record) == list(ALL_TASKS)
    samples = {s.task: s for s in builder.build(record)}
    assert set(samples) == set(ALL_TASKS)

    reply = "That sounds exhausting. Maybe a short rest would help."
    tags_trained = THINK_TAGS.replace("<&&>", "")  # the placeholder is masked
    expected = {
        "<TRANSCRIBE>": "I feel so tired today",
        "<TRANSCRIBE> <ALIGN>": "<0.0>I<0.2> <0.2>feel<0.6> <0.6>so<0.7> <0.7>tired<1.2> <1.2>today<1.7>",
        "<CAPTION>": "<SIGH><COUGH>",
        "<EMOTION>": "<SAD>",
        "<STYLE>": "<DAILY CONVERSATION>",
        "<GENDER>": "<FEMALE>",
        "<AGE>": "<ADULT>",
        "<TRANSCRIBE> <AGE> <GENDER>": "I feel so tired today<ADULT><FEMALE>",
        "<TRANSCRIBE> <EMOTION>": "I feel so tired today<SAD>",
        "<TRANSCRIBE> <GENDER>": "I feel so tired today<FEMALE>",
        "<TRANSCRIBE> <CAPTION>": "I feel so tired today<SIGH><COUGH>",
        "<AGE> <GENDER>": "<ADULT><FEMALE>",
        "<S2TCHAT>": reply,
        "<S2TCHAT> <TEXT2TOKEN>": reply,
        "<TEXT2TEXT>": reply,
        "<HISTORY>": reply,
    }
    for task, text in expected.items():
        assert _trained_text(tokenizer, samples[task]) == text + "<|im_end|>", task
    for task in ("<S2TCHAT> <THINK>", "<S2TCHAT> <TEXT2TOKEN> <THINK>"):
        assert _trained_text(tokenizer, samples[task]) in (tags_trained + reply + "<|im_end|>", THINK_TEXT + reply + "<|im_end|>")
    # TTS: the reply is the input, the speech tokens the only target
    tts = samples["<TEXT2TOKEN>"]
    assert all(lab == IGNORE_INDEX for lab in tts.labels)
    assert reply in tokenizer.decode(tts.input_ids)
    for task, sample in samples.items():
        audio_count = sample.input_ids.count(builder.encoder.audio_id)
        speech_input = task not in ("<TEXT2TOKEN>", "<TEXT2TEXT>")
        assert audio_count == (1 if speech_input else 0), task
        assert (sample.audio is not None) == speech_input and (sample.num_frames > 0) == speech_input
        has_speech_target = "<TEXT2TOKEN>" in task or task == "<HISTORY>"
        assert sample.speech_tokens == ([5, 17, 4095, 0, 256, 1024] if has_speech_target else []), task
        assert len(sample.input_ids) == len(sample.labels)
        text = tokenizer.decode(sample.input_ids)
        out_type = prompts.output_type(task, speech_target=has_speech_target)
        assert text.startswith(f"<|im_start|>system\n{prompts.SYSTEM_PROMPTS[out_type]}<|im_end|>\n")
        # everything up to the assistant turn is masked
        head = len(builder.encoder.ids("<|im_start|>assistant\n"))
        start = max(i for i in range(len(sample.input_ids) - head + 1) if sample.input_ids[i : i + head] == builder.encoder.ids("<|im_start|>assistant\n"))
        assert all(lab == IGNORE_INDEX for lab in sample.labels[: start + head]), task
    # understanding tasks get an instruction from the paraphrase files, dialogue tasks none
    table = prompts.load_instructions()
    asr_text = tokenizer.decode(samples["<TRANSCRIBE>"].input_ids)
    assert any(f"<|im_start|>user\n{ins}<|audio|>" in asr_text for ins in table["<TRANSCRIBE>"])
    assert "<|im_start|>user\n<|audio|><|im_end|>" in tokenizer.decode(samples["<S2TCHAT>"].input_ids)
    history = tokenizer.decode(samples["<HISTORY>"].input_ids)
    assert "<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\nHello! How are you?<|im_end|>\n" in history


def test_placeholder_tokens_are_masked(tokenizer, corpus):
    record = next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000")
    builder = SampleBuilder(tokenizer, {"<S2TCHAT> <THINK>": 1.0}, think_text_ratio=0.0)
    sample = builder.build(record)[0]
    unknown = builder.encoder.ids("<&&>")
    assert len(unknown) == 1
    positions = [i for i, t in enumerate(sample.input_ids) if t == unknown[0]]
    assert positions, "the tag-form reasoning holds a <&&> placeholder"
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)
    assert "Sound event: <&&>" in tokenizer.decode(sample.input_ids)


def test_think_form_ratio(tokenizer, corpus):
    record = next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000")
    for ratio, form in ((0.0, "User's words"), (1.0, "exhausted")):
        builder = SampleBuilder(tokenizer, {"<S2TCHAT> <THINK>": 1.0}, think_text_ratio=ratio)
        assert all(form in tokenizer.decode(builder.build(record, epoch=e)[0].input_ids) for e in range(5))
    builder = SampleBuilder(tokenizer, {"<S2TCHAT> <THINK>": 1.0}, think_text_ratio=0.5)
    forms = {"User's words" in tokenizer.decode(builder.build(record, epoch=e)[0].input_ids) for e in range(20)}
    assert forms == {True, False}


def test_labels_below_the_score_or_unknown_make_no_task(tokenizer, corpus):
    records = {r["id"]: r for r in _read_records(corpus["folder"])}
    low = records["rec001"]  # gender male at 0.2, emotion None
    strict = SampleBuilder(tokenizer, {"<GENDER>": 1.0, "<EMOTION>": 1.0, "<TRANSCRIBE>": 1.0}, min_label_score=0.5)
    assert strict.supported_tasks(low) == ["<TRANSCRIBE>"]
    lenient = SampleBuilder(tokenizer, {"<GENDER>": 1.0, "<EMOTION>": 1.0, "<TRANSCRIBE>": 1.0})
    assert lenient.supported_tasks(low) == ["<GENDER>", "<TRANSCRIBE>"]
    assert _trained_text(tokenizer, lenient.build_task(low, "<GENDER>", random.Random(0))) == "<MALE><|im_end|>"
    # no reply speech tokens: no speech tasks; no words: no alignment
    plain = records["rec002"]
    builder = SampleBuilder(tokenizer, ALL_TASKS)
    supported = builder.supported_tasks(plain)
    assert "<S2TCHAT> <THINK>" in supported and "<TEXT2TOKEN>" not in supported
    assert "<TRANSCRIBE> <ALIGN>" not in supported and "<HISTORY>" not in supported


def test_weights_set_the_expected_samples_per_record(tokenizer, corpus):
    record = next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000")
    builder = SampleBuilder(tokenizer, {"<TRANSCRIBE>": 2.0, "<EMOTION>": 0.25})
    counts = Counter(s.task for e in range(400) for s in builder.build(record, epoch=e))
    assert counts["<TRANSCRIBE>"] == 800
    assert 60 <= counts["<EMOTION>"] <= 140
    # the two copies of a sample differ only in their drawn instruction: same trained tokens, and
    # the same prompt once the instruction is taken out; over a few epochs the instructions differ
    instructions = prompts.load_instructions()["<TRANSCRIBE>"]
    differing = 0
    for epoch in range(5):
        twins = [s for s in builder.build(record, epoch=epoch) if s.task == "<TRANSCRIBE>"]
        assert len(twins) == 2
        trained = [[label for label in twin.labels if label != IGNORE_INDEX] for twin in twins]
        assert trained[0] == trained[1] and trained[0]
        prompts_without = []
        for twin in twins:
            text = tokenizer.decode(twin.input_ids)
            (used,) = [i for i in instructions if i in text]
            prompts_without.append(text.replace(used, ""))
        assert prompts_without[0] == prompts_without[1]
        differing += twins[0].input_ids != twins[1].input_ids
    assert differing > 0


def test_out_of_range_speech_tokens_disable_speech_tasks(tokenizer, corpus):
    record = dict(next(r for r in _read_records(corpus["folder"]) if r["id"] == "rec000"))
    record["reply_speech_tokens"] = [1, 4096]
    assert "<TEXT2TOKEN>" not in SampleBuilder(tokenizer, ALL_TASKS).supported_tasks(record)


# ----------------------------------------------------------------------------- features


def test_features_are_whisper_log_mel_at_100_frames_per_second(corpus):
    record = _read_records(corpus["folder"])[0]
    wav = decode_audio(record["_audio"])
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert audio_num_samples(record["_audio"]) == len(wav) == record["_num_samples"]
    feats = LogMelExtractor()(wav)
    assert feats.shape == (80, len(wav) // 160)
    assert abs(feats.shape[1] - 100 * len(wav) / 16000) <= 1
    # the same numbers as WhisperFeatureExtractor padded to 30 s, over the valid frames
    from transformers import WhisperFeatureExtractor

    padded = WhisperFeatureExtractor(feature_size=80)(wav, sampling_rate=16000, return_tensors="np")["input_features"][0]
    assert padded.shape == (80, 3000)
    assert np.allclose(feats.numpy(), padded[:, : feats.shape[1]], atol=1e-4)


def test_audio_of_another_rate_or_channels_is_resampled(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32) * 0.2
    path = tmp_path / "a.wav"
    sf.write(path, stereo, 44100)
    ref = AudioRef(path=str(path))
    assert audio_num_samples(ref) == 16000
    assert decode_audio(ref).shape == (16000,)
    span = AudioRef(path=str(path), start=0.25, end=0.75)
    assert audio_num_samples(span) == 8000 and decode_audio(span).shape == (8000,)


# ----------------------------------------------------------------------------- reading


def test_a_shard_folder_reads_only_its_parquet_shards(corpus):
    files = resolve_files([corpus["folder"]])
    assert [Path(p).name for p, _ in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert len(plan_units(files)) == 5  # 3 + 2 row groups
    assert resolve_files([corpus["folder"] + "/data/train-*-of-00002.parquet"]) == files
    records = _read_records(corpus["folder"])
    assert [r["id"] for r in records] == [f"rec{i:03d}" for i in range(10)]
    assert set(COLUMNS) <= set(record_schema.FIELD_NAMES)
    with pytest.raises(DataSourceError, match="matches no file"):
        resolve_files([corpus["folder"] + "/nothing-*.parquet"])
    with pytest.raises(DataSourceError, match="not a parquet shard"):
        resolve_files([str(Path(__file__))])


def test_units_are_cut_when_there_are_more_workers_than_row_groups(corpus):
    files = resolve_files([corpus["folder"]])
    units = plan_units(files, min_units=12)
    assert len(units) == 15 and {u.parts for u in units} == {3}
    ids = [r["id"] for u in units for r in read_unit(u)]
    assert sorted(ids) == [f"rec{i:03d}" for i in range(10)]  # each row once


def test_unreadable_audio_keeps_the_text_tasks(tmp_path, tokenizer, caplog):
    rows = [record_schema.to_row(_record(0, np.zeros(1600, np.float32), transcript="hi", reply_text="Hello.")) ]
    rows[0]["audio"] = {"bytes": b"not audio", "path": None}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=record_schema.arrow_schema()), path)
    (record,) = _read_records(str(path))
    assert record["_audio"] is None and "cannot read its audio" in caplog.text
    builder = SampleBuilder(tokenizer, {"<TRANSCRIBE>": 1.0, "<TEXT2TEXT>": 1.0})
    assert builder.supported_tasks(record) == ["<TEXT2TEXT>"]


def test_audio_longer_than_the_encoder_takes_keeps_only_the_text_tasks(tmp_path, tokenizer, caplog):
    wavs = {"short": np.zeros(16000, np.float32), "long": np.zeros(40000, np.float32)}  # 1 s and 2.5 s
    rows = [record_schema.to_row(_record(i, wav, id=key, transcript="so tired", reply_text="Rest a little."))
            for i, (key, wav) in enumerate(wavs.items())]
    path = tmp_path / "lengths.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=record_schema.arrow_schema()), path)
    tasks = {"<TRANSCRIBE>": 1.0, "<TEXT2TEXT>": 1.0}
    # A limit of 200 mel frames (2 s), as a speech encoder with max_source_positions 100 would take.
    loader = build_dataloader([str(path)], tokenizer, tasks=tasks, max_frames_per_batch=100000, shuffle_buffer=0,
                              seed=1, epochs=1, max_audio_frames=200)
    got = sorted((k, t) for b in loader for k, t in zip(b.keys, b.tasks))
    assert got == [("long", "<TEXT2TEXT>"), ("short", "<TEXT2TEXT>"), ("short", "<TRANSCRIBE>")]
    assert "record long: 2.5 s of audio (250 mel frames) is longer than the speech encoder takes (200 frames" in caplog.text
    (unit,) = plan_units(resolve_files([str(path)]))
    long = next(r for r in read_unit(unit, max_frames=200) if r["id"] == "long")
    assert long["_audio"] is None and long["_audio_issue"] == "audio longer than the speech encoder takes"
    # Without a limit the long record keeps its audio (and its speech tasks).
    assert next(r for r in read_unit(unit) if r["id"] == "long")["_audio"] is not None


# ----------------------------------------------------------------------------- batching


def _fake(key: str, frames: int, tokens: int = 10, audio: bool = True) -> Sample:
    return Sample(key=key, task="<TRANSCRIBE>", input_ids=[1] * tokens, labels=[1] * tokens,
                  audio=AudioRef(data=b"x") if audio else None, num_frames=frames if audio else 0)


def test_dynamic_batches_respect_the_frame_budget():
    rng = random.Random(0)
    samples = [_fake(f"s{i}", rng.randint(50, 900)) for i in range(300)] + [_fake("text", 0, tokens=40, audio=False)]
    samples.append(_fake("huge", 5000))
    batches = list(dynamic_batches(samples, max_frames=2000, sort_window=64, rng=random.Random(1)))
    keys = [s.key for b in batches for s in b]
    assert sorted(keys) == sorted(s.key for s in samples if s.key != "huge")  # all but the one too long
    for b in batches:
        assert len(b) * max(sample_frames(s) for s in b) <= 2000
    assert sample_frames(_fake("text", 0, tokens=40, audio=False)) == 320
    # sorting inside windows keeps batches tight: little padding overall
    padded = sum(len(b) * max(sample_frames(s) for s in b) for b in batches)
    assert sum(sample_frames(s) for b in batches for s in b) / padded > 0.8
    capped = list(dynamic_batches(samples[:50], max_frames=100000, max_tokens=35, sort_window=64, rng=random.Random(1)))
    assert all(len(b) * max(s.seq_len for s in b) <= 35 for b in capped)


def test_shuffle_buffer_is_seeded_and_keeps_everything():
    a = list(shuffle_buffer(range(100), 16, random.Random(3)))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(shuffle_buffer(range(100), 16, random.Random(3)))
    assert a != list(shuffle_buffer(range(100), 16, random.Random(4)))


# ----------------------------------------------------------------------------- the loader


TASKS = {"<TRANSCRIBE>": 1.0, "<EMOTION>": 1.0, "<S2TCHAT> <THINK>": 1.0, "<TEXT2TOKEN>": 1.0, "<TEXT2TEXT>": 1.0}


def _expected_samples(tokenizer, folder: str, tasks=TASKS) -> Counter:
    builder = SampleBuilder(tokenizer, tasks, seed=5)
    return Counter((s.key, s.task) for r in _read_records(folder) for s in builder.build(r, epoch=0))


def _loader(tokenizer, folder, **kw) -> ShardLoader:
    args = dict(tasks=TASKS, max_frames_per_batch=900, shuffle_buffer=8, seed=5, epochs=1, sort_window=6)
    args.update(kw)
    return build_dataloader([folder], tokenizer, **args)


def test_the_loader_yields_padded_batches_of_every_supported_sample(tokenizer, corpus):
    loader = _loader(tokenizer, corpus["folder"])
    batches = list(loader)
    assert batches and all(isinstance(b, Batch) for b in batches)
    got = Counter((k, t) for b in batches for k, t in zip(b.keys, b.tasks))
    assert got == _expected_samples(tokenizer, corpus["folder"])
    audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
    for b in batches:
        n = len(b)
        assert b.features.shape[:2] == (n, 80) and b.features.dtype == torch.float32
        assert n * b.features.shape[2] <= 900 or b.features.shape[2] == 0
        assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
        assert b.speech_tokens.shape[0] == n and b.speech_token_lengths.shape == (n,)
        for i in range(n):
            length = int(b.attention_mask[i].sum())
            assert (b.input_ids[i, length:] == tokenizer.pad_token_id).all()
            assert (b.labels[i, length:] == IGNORE_INDEX).all()
            frames = int(b.feature_lengths[i])
            assert (b.features[i, :, frames:] == 0).all()
            has_audio = int((b.input_ids[i] == audio_id).sum())
            assert has_audio == (1 if frames > 0 else 0)
            s = int(b.speech_token_lengths[i])
            assert (b.speech_tokens[i, s:] == IGNORE_INDEX).all()
            assert (b.speech_tokens[i, :s] >= 0).all()
        assert ((b.speech_token_lengths > 0) == torch.tensor(["<TEXT2TOKEN>" in t for t in b.tasks])).all()


def _one_tokenizer_for_workers(request, workers: int) -> None:
    """Worker processes are slow to start: run those cases with one tokenizer only."""
    if workers and request.node.callspec.params["tokenizer"] != "throwaway":
        pytest.skip("the multi-worker case runs with the throwaway tokenizer")


def _keys(batches) -> list[tuple]:
    return [tuple(zip(b.keys, b.tasks)) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_partition_the_samples_exactly(tokenizer, corpus, workers, request):
    _one_tokenizer_for_workers(request, workers)
    expected = _expected_samples(tokenizer, corpus["folder"])
    seen: Counter = Counter()
    per_rank = []
    for rank in range(2):
        loader = _loader(tokenizer, corpus["folder"], rank=rank, world_size=2, num_workers=workers)
        keys = Counter((k, t) for b in loader for k, t in zip(b.keys, b.tasks))
        per_rank.append(keys)
        seen += keys
    assert seen == expected
    assert not set(per_rank[0]) & set(per_rank[1])


def test_the_order_is_seeded(tokenizer, corpus):
    first = _keys(_loader(tokenizer, corpus["folder"], seed=5))
    assert first == _keys(_loader(tokenizer, corpus["folder"], seed=5))
    assert first != _keys(_loader(tokenizer, corpus["folder"], seed=6))
    two_epochs = _keys(_loader(tokenizer, corpus["folder"], epochs=2))
    assert two_epochs[: len(first)] == first and two_epochs[len(first) :] != first


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_tail(tokenizer, corpus, workers, request):
    _one_tokenizer_for_workers(request, workers)
    make = lambda: _loader(tokenizer, corpus["folder"], epochs=2, num_workers=workers)  # noqa: E731
    full = list(make())
    assert len(full) > 6
    for k in (3, len(full) // 2 + 1, len(full) - 1):
        loader = make()
        head = []
        for batch in loader:
            head.append(batch)
            if len(head) == k:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
        resumed = make()
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert _keys(head) + _keys(tail) == _keys(full)
        for a, b in zip(tail, full[k:]):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.features, b.features) and torch.equal(a.speech_tokens, b.speech_tokens)


def test_a_state_from_another_loader_is_refused(tokenizer, corpus, tmp_path):
    state = _loader(tokenizer, corpus["folder"]).state_dict()
    _loader(tokenizer, corpus["folder"]).load_state_dict(state)  # the same settings: accepted
    with pytest.raises(ValueError, match="num_workers"):
        _loader(tokenizer, corpus["folder"], num_workers=2).load_state_dict(state)
    # Every setting that changes which samples are made, or how they are batched, is in the fingerprint.
    instructions = tmp_path / "instructions"
    instructions.mkdir()
    table = {task: list(texts) for task, texts in prompts.load_instructions().items()}
    table["<TRANSCRIBE>"] = ["Write down what is said."]
    (instructions / "all.yaml").write_text(json.dumps(table), encoding="utf-8")  # JSON is YAML
    for changed in (dict(max_frames_per_batch=1000), dict(min_label_score=0.5), dict(chat_instruction_ratio=0.5),
                    dict(instructions=str(instructions)), dict(max_audio_frames=3000)):
        with pytest.raises(ValueError, match="fingerprint"):
            _loader(tokenizer, corpus["folder"], **changed).load_state_dict(state)
    # The tokenizer: another one with the same vocabulary fits, one with a token more does not.
    trained = _loader(_train_tokenizer(), corpus["folder"]).state_dict()
    same, more = _train_tokenizer(), _train_tokenizer()
    more.add_tokens(["tiredness"])
    _loader(same, corpus["folder"]).load_state_dict(trained)
    with pytest.raises(ValueError, match="fingerprint"):
        _loader(more, corpus["folder"]).load_state_dict(trained)


# ----------------------------------------------------------------------------- OSUM raw lists


def test_osum_raw_entries_map_onto_record_fields():
    chat = record_from_osum({
        "key": "k1", "wav": "/x/a.wav", "txt": "Let us talk.", "task": "<S2TCHAT> <TEXT2TOKEN> <THINK>", "lang": "en",
        "extra": {"dataset": "d", "age": "<ADULT>", "gender": "<FEMALE>", "think_str": "She sounds sad.",
                  "question": "I feel low", "speech_token": [1, 2, 3], "a_wav_path": "/x/r.wav"},
    })
    assert chat["reply_text"] == "Let us talk." and chat["transcript"] == "I feel low"
    assert chat["think_text"] == "She sounds sad." and chat["reply_speech_tokens"] == [1, 2, 3]
    assert chat["age"] == "adult" and chat["gender"] == "female" and chat["_audio"].path == "/x/a.wav"
    asr_x = record_from_osum({"key": "k2", "wav": "a.wav", "txt": "good morning<HAPPY>", "task": "<TRANSCRIBE><EMOTION>"})
    assert asr_x["transcript"] == "good morning" and asr_x["emotion"] == "happy"
    combo = record_from_osum({"key": "k3", "wav": "a.wav", "txt": "hi <YOUTH> <MALE>", "task": "<TRANSCRIBE> <AGE> <GENDER>"})
    assert (combo["transcript"], combo["age"], combo["gender"]) == ("hi", "adult", "male")
    style = record_from_osum({"key": "k4", "wav": "a.wav", "txt": "<新闻科普>", "task": "<STYLE>"})
    assert style["style"] == "news/science" and "transcript" not in style
    caption = record_from_osum({"key": "k5", "wav": "a.wav", "txt": "<Laugh><THROAT CLEARING>", "task": "<CAPTION>"})
    assert caption["events"] == ["laugh", "throat_clearing"]
    words = [{"word": "so", "start": 0.12, "end": 0.3}, {"word": "tired", "start": 0.3, "end": 0.81}]
    align = record_from_osum({"key": "k6", "wav": "a.wav", "txt": align_text(words), "task": "<TRANSCRIBE> <ALIGN>"})
    assert align["transcript"] == "so tired"
    assert [(w["word"], w["start"], w["end"]) for w in align["words"]] == [("so", 0.1, 0.3), ("tired", 0.3, 0.8)]
    assert parse_align_text("no timestamps here") == []


def test_an_osum_raw_list_trains_like_a_shard(tokenizer, corpus, tmp_path, caplog):
    wav_dir = tmp_path / "wav"
    wav_dir.mkdir()
    lines = []
    for i, rec in enumerate(corpus["records"][:4]):
        sf.write(wav_dir / f"{i}.wav", decode_audio(AudioRef(data=rec["audio"]["bytes"])), 16000)
        lines.append({"key": f"raw{i}", "wav": f"wav/{i}.wav", "txt": "Take it easy.", "task": "<S2TCHAT> <TEXT2TOKEN> <THINK>",
                      "lang": "en", "extra": {"question": "I feel so tired", "think_str": "She is tired.", "speech_token": [7, 8, 9],
                                              "age": "<ADULT>", "gender": "<FEMALE>"}})
    lines.append({"key": "asr", "wav": "wav/0.wav", "txt": "I feel so tired today<SAD>", "task": "<TRANSCRIBE> <EMOTION>"})
    raw = tmp_path / "data.list"
    raw.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\nnot json\n", encoding="utf-8")
    tasks = {"<TRANSCRIBE>": 1.0, "<EMOTION>": 1.0, "<S2TCHAT> <TEXT2TOKEN> <THINK>": 1.0, "<TEXT2TOKEN>": 1.0, "<GENDER>": 1.0}
    loader = build_dataloader([str(raw)], tokenizer, tasks=tasks, max_frames_per_batch=1000, shuffle_buffer=4, seed=1, epochs=1)
    batches = list(loader)
    got = Counter((k, t) for b in batches for k, t in zip(b.keys, b.tasks))
    think = next(
        tokenizer.decode(b.input_ids[i][b.labels[i] != IGNORE_INDEX])
        for b in batches for i, t in enumerate(b.tasks) if t == "<S2TCHAT> <TEXT2TOKEN> <THINK>"
    )
    assert think == "<think>She is tired.<think end>Take it easy.<|im_end|>"
    expected = Counter({(f"raw{i}", t): 1 for i in range(4) for t in ("<TRANSCRIBE>", "<S2TCHAT> <TEXT2TOKEN> <THINK>", "<TEXT2TOKEN>", "<GENDER>")})
    expected.update({("asr", "<TRANSCRIBE>"): 1, ("asr", "<EMOTION>"): 1})
    assert got == expected
    assert "not an OSUM raw entry" in caplog.text


@pytest.mark.slow
def test_the_loader_reads_the_shards_of_a_real_build(demo_shards, request):
    """The shards `echat build` writes (Beam, offline profile) feed the loader as they are."""
    tokenizer = _train_tokenizer()
    tasks = {task: 1.0 for task in vocab.TASK_TAGS}
    loader = build_dataloader([str(demo_shards)], tokenizer, tasks=tasks, max_frames_per_batch=4000,
                              shuffle_buffer=16, seed=3, epochs=1, num_workers=2)
    batches = list(loader)
    produced = Counter(t for b in batches for t in b.tasks)
    records = _read_records(str(demo_shards))
    assert records
    builder = SampleBuilder(tokenizer, tasks)
    supported = Counter(t for r in records for t in builder.supported_tasks(r))
    assert produced == supported
    # one epoch: every (record, supported task) exactly once, counted from the records, not the batches
    expected = Counter((r["id"], t) for r in records for t in builder.supported_tasks(r))
    assert Counter((k, t) for b in batches for k, t in zip(b.keys, b.tasks)) == expected
    assert sum(len(b) for b in batches) == sum(expected.values())
    for task in ("<TRANSCRIBE>", "<S2TCHAT>", "<S2TCHAT> <THINK>", "<TEXT2TEXT>"):
        assert produced[task] > 0, f"the demo build supports {task}"
    for b in batches:
        assert len(b) * b.features.shape[2] <= 4000


def test_tasks_no_record_supports_are_an_error_not_an_endless_loop(tokenizer, corpus):
    loader = _loader(tokenizer, corpus["folder"], tasks={"<STYLE>": 1.0}, min_label_score=0.99, epochs=None)
    with pytest.raises(ValueError, match="no record of its shards supports"):
        next(iter(loader))


def test_shards_in_an_object_store_read_like_local_ones(demo_shards):
    """A build's folder on an fsspec filesystem (memory:// here, gs:// or s3:// alike) gives the
    same units and records as the same shards on disk."""
    import fsspec

    from echat.model.data_sources import plan_units, read_unit, resolve_files

    fs = fsspec.filesystem("memory")
    for shard in sorted((demo_shards / "data").glob("*.parquet")):
        fs.pipe(f"/bucket/build/data/{shard.name}", shard.read_bytes())
    local = resolve_files([str(demo_shards / "data")])
    remote = resolve_files(["memory://bucket/build"])
    assert [k for _, k in remote] == [k for _, k in local] and len(remote) == len(local)

    def records(files):
        return [{k: v for k, v in r.items() if k not in ("_audio",)} | {"_audio": r["_audio"] and r["_audio"].data}
                for u in plan_units(files) for r in read_unit(u)]

    got = records(remote)
    assert len(got) >= 40 and all(r["_audio"] for r in got)  # the demo build's rows, with their audio
    assert got == records(local)
