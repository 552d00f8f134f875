"""Tokenizers of the model package: the tiny offline one, and the LLM's own for full configs.

Every tokenizer the model uses carries the special tokens the prompts need, each as ONE id:

    <|im_start|> <|im_end|>      ChatML turn markers (Qwen2 has them already)
    <|endoftext|>                padding (Qwen2's pad token)
    <|audio|>                    the speech placeholder that the model replaces (model/batch.py)
    <think> <think end>          the reasoning markers of dual thinking
    <&&>                         an unknown label, masked from the loss
    <TRANSCRIBE> <ALIGN> ...     the OSUM task tags (schemas/vocab.py), one token per tag word

The tiny tokenizer is a byte-level BPE trained with `tokenizers` on `model/tiny_corpus.txt` (text
written for this repository) and saved under `model/tiny_tokenizer/`; `train_tiny_tokenizer()`
regenerates it. For a full config the tokenizer comes from the LLM's hub id or local path, and the
tokens it lacks are added: Qwen2's embedding tables have spare rows past the tokenizer
(151,646 tokens in 151,936 / 152,064 rows), so adding a few tokens needs no resize;
`load_tokenizer` checks that they fit.

Heavy imports (tokenizers, transformers) stay inside functions: the CLI imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echat.schemas.reasoning import THINK_END, THINK_START, UNKNOWN
from echat.schemas.tasks import TAG_WORDS

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"  # the pad token
AUDIO = "<|audio|>"

# Each tag word of schemas.vocab.TASK_TAGS once, in first-seen order ("<S2TCHAT> <THINK>" -> 2).
TASK_TAG_TOKENS: tuple[str, ...] = TAG_WORDS

# Order matters only for the tiny tokenizer, whose special tokens take ids 0.. in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END, AUDIO, THINK_START, THINK_END, UNKNOWN, *TASK_TAG_TOKENS,
)

MODEL_DIR = Path(__file__).resolve().parent
TINY_TOKENIZER_DIR = MODEL_DIR / "tiny_tokenizer"
TINY_CORPUS = MODEL_DIR / "tiny_corpus.txt"
TINY_VOCAB_SIZE = 2048  # target; a small corpus may stop merging earlier

# A ChatML template in the Qwen2 style, so `apply_chat_template` works on the tiny tokenizer too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids the model and generation need from a tokenizer."""

    audio: int
    im_start: int
    im_end: int
    pad: int
    unknown: int
    think_start: int
    think_end: int


def train_tiny_tokenizer(
    corpus_files: list[str | Path] | None = None,
    out_dir: str | Path | None = TINY_TOKENIZER_DIR,
    vocab_size: int = TINY_VOCAB_SIZE,
):
    """Train the tiny byte-level BPE tokenizer and return it as a PreTrainedTokenizerFast.

    `out_dir=None` trains without saving. The result is deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = [str(p) for p in (corpus_files or [TINY_CORPUS])]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"tokenizer corpus file not found: {f}")
    tok = Tokenizer(models.BPE())
    # Qwen2-style: split on words/numbers/punctuation first, then byte-level so any text encodes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    fast = _wrap(tok)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    # Set after saving: the template is code here, not a package file (wheels ship no .jinja).
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _wrap(tok: Any):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.padding_side = "right"
    return fast


def tiny_tokenizer():
    """The bundled tiny tokenizer (model/tiny_tokenizer/)."""
    from transformers import PreTrainedTokenizerFast

    if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{TINY_TOKENIZER_DIR}/tokenizer.json is missing; regenerate it with "
            "`python -c 'from echat.model.tokenizer import train_tiny_tokenizer; train_tiny_tokenizer()'`"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return ensure_special_tokens(tok)


def load_tokenizer(model_config: Any = None, path: str | Path | None = None):
    """The tokenizer for a model config (a ModelConfig, a config name or YAML path).

    `path` (a saved tokenizer folder, e.g. a checkpoint's `tokenizer/`) wins over the config.
    Otherwise `tokenizer.name_or_path` of the config: "tiny" for the bundled one, else a hub id or
    local path; unset means the LLM's `name_or_path`. The special tokens are ensured, and the
    result is checked against the LLM's vocabulary size (an id past the embedding table is an error).
    """
    from echat.model.config import ModelConfig, load_config

    cfg = None
    if model_config is not None:
        cfg = model_config if isinstance(model_config, ModelConfig) else load_config(model_config)
    if path is not None:
        source: str = str(path)
    elif cfg is not None:
        source = cfg.tokenizer_source()
    else:
        source = "tiny"
    if source == "tiny":
        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        tok = ensure_special_tokens(tok)
    if cfg is not None:
        rows = cfg.llm_vocab_size()
        if rows is not None and len(tok) > rows:
            raise ValueError(
                f"tokenizer {source!r} has {len(tok)} tokens but the LLM of config {cfg.name!r} has "
                f"{rows} embedding rows; ids past the table would fail"
            )
    return tok


def ensure_special_tokens(tok: Any):
    """Add the special tokens `tok` lacks (as extra special tokens) and set pad/eos if unset."""
    vocab_now = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab_now]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT
    if tok.eos_token is None:
        tok.eos_token = IM_END
    tok.padding_side = "right"
    for t in SPECIAL_TOKENS:  # each must now be a single id, or prompts and splicing break
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"special token {t!r} does not encode to a single id in this tokenizer: {ids}")
    return tok


def special_token_ids(tok: Any) -> SpecialTokenIds:
    ids = tok.convert_tokens_to_ids
    return SpecialTokenIds(
        audio=ids(AUDIO), im_start=ids(IM_START), im_end=ids(IM_END), pad=ids(ENDOFTEXT),
        unknown=ids(UNKNOWN), think_start=ids(THINK_START), think_end=ids(THINK_END),
    )
