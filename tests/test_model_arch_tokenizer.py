"""The tiny tokenizer and the special tokens every tokenizer of the model must carry."""

from __future__ import annotations

import json

import pytest

from echat.model.config import config_from_dict, load_config
from echat.model.tokenizer import (
    SPECIAL_TOKENS, TASK_TAG_TOKENS, TINY_TOKENIZER_DIR, ensure_special_tokens, load_tokenizer,
    special_token_ids, tiny_tokenizer, train_tiny_tokenizer,
)
from echat.schemas import vocab


def test_special_tokens_are_single_ids_and_text_round_trips():
    tok = tiny_tokenizer()
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert set(TASK_TAG_TOKENS) == {w for tag in vocab.TASK_TAGS for w in tag.split()}
    ids = special_token_ids(tok)
    assert tok.pad_token_id == ids.pad and tok.eos_token_id == ids.im_end
    for text in ("<|im_start|>user\n请把这段音频转写成文字。<|audio|><|im_end|>\n",
                 "<think>Age: <adult>; Emotion: <&&><think end>I hear you.<|im_end|>",
                 "unseen bytes: ñ ü 😀 and digits 12345"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # The placeholder inside a reasoning trace is one token the data path can mask
    trace = tok("Sound event: <&&>;", add_special_tokens=False)["input_ids"]
    assert trace.count(ids.unknown) == 1
    assert len(tok) <= load_config("tiny").llm_vocab_size()


def test_bundled_files_are_what_the_trainer_produces(tmp_path):
    regenerated = train_tiny_tokenizer(out_dir=tmp_path)
    bundled = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert regenerated.get_vocab() == tiny_tokenizer().get_vocab()
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"] == bundled["model"]["merges"]


def test_ensure_special_tokens_adds_what_a_tokenizer_lacks():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world", "good morning"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bare = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok = ensure_special_tokens(bare)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in SPECIAL_TOKENS)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_load_tokenizer_from_config_or_saved_folder(tmp_path):
    tok = load_tokenizer("tiny")
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(load_config("tiny"), tmp_path / "tok")  # as a checkpoint's tokenizer/ folder
    assert again.get_vocab() == tok.get_vocab()
    assert special_token_ids(again) == special_token_ids(tok)
    data = load_config("tiny").model_dump(mode="json")
    data["llm"]["architecture"]["vocab_size"] = 512
    with pytest.raises(ValueError, match="embedding rows"):
        load_tokenizer(config_from_dict(data))
