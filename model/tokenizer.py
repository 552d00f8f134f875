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

Prompt profiles (model/prompts.py): the list above is the `echat` profile's. Under `osum` the
tokenizer follows OSUM-EChat's: `<think>`, `<think end>`, `<&&>` and the tag words are plain text,
and the only token added to the LLM's own is `[PAD]`, set as the pad token as their model does
(`add_special_tokens({'pad_token': '[PAD]'})`), plus `<|audio|>`, the placeholder the model replaces
with speech before the LLM sees it. The bundled tiny tokenizer under `osum` is the same BPE with
those tokens no longer added (they stay in its vocabulary, unreachable: no merge builds them). A
tokenizer carries the name of its profile (`prompts.PROFILE_ATTRIBUTE`), which the prompt code follows.

Heavy imports (tokenizers, transformers) stay inside functions: the CLI imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echat.model.prompts import DEFAULT_PROFILE, OSUM, PROFILE_ATTRIBUTE, check_profile
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

OSUM_PAD = "[PAD]"  # the pad token OSUM-EChat adds to Qwen's tokenizer
# The tokens each profile needs as single ids (`osum` adds [PAD] as the pad token on top).
PROFILE_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "echat": SPECIAL_TOKENS,
    "osum": (ENDOFTEXT, IM_START, IM_END, AUDIO),
}
# What OSUM's tokenizer reads as plain text: none of these may be an added token under `osum`.
OSUM_PLAIN_TEXT: tuple[str, ...] = tuple(t for t in SPECIAL_TOKENS if t not in PROFILE_SPECIAL_TOKENS["osum"])

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
    # None under the osum profile, where these are plain text of several tokens.
    unknown: int | None
    think_start: int | None
    think_end: int | None


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


def tiny_tokenizer(profile: str = DEFAULT_PROFILE):
    """The bundled tiny tokenizer (model/tiny_tokenizer/), as the prompt profile needs it."""
    from transformers import PreTrainedTokenizerFast

    profile = check_profile(profile)
    if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{TINY_TOKENIZER_DIR}/tokenizer.json is missing; regenerate it with "
            "`python -c 'from echat.model.tokenizer import train_tiny_tokenizer; train_tiny_tokenizer()'`"
        )
    if profile == OSUM:
        tok = _tiny_plain_text_tokenizer()
    else:
        tok = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return ensure_special_tokens(tok, profile)


def _tiny_plain_text_tokenizer():
    """The tiny BPE with only the osum profile's tokens added: the markers and tag words it was
    trained with as added tokens are dropped from `added_tokens`, so text spells them out in
    ordinary pieces, as Qwen's tokenizer does."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    keep = set(PROFILE_SPECIAL_TOKENS[OSUM])
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["content"] in keep]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in PROFILE_SPECIAL_TOKENS[OSUM] if t not in (IM_END, ENDOFTEXT)],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.padding_side = "right"
    return fast


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
    profile = check_profile(getattr(cfg, "prompt_profile", DEFAULT_PROFILE) if cfg is not None else DEFAULT_PROFILE)
    if path is not None:
        source: str = str(path)
    elif cfg is not None:
        source = cfg.tokenizer_source()
    else:
        source = "tiny"
    if source == "tiny":
        tok = tiny_tokenizer(profile)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        tok = ensure_special_tokens(tok, profile)
    if cfg is not None:
        rows = cfg.llm_vocab_size()
        if rows is not None and len(tok) > rows:
            raise ValueError(
                f"tokenizer {source!r} has {len(tok)} tokens but the LLM of config {cfg.name!r} has "
                f"{rows} embedding rows; ids past the table would fail"
            )
    return tok


def ensure_special_tokens(tok: Any, profile: str = DEFAULT_PROFILE):
    """Add the special tokens the profile needs and `tok` lacks (as extra special tokens), set
    pad/eos if unset, and mark `tok` with the profile's name.

    Under `osum` the pad token becomes `[PAD]` (OSUM-EChat's), and a tokenizer that has any of
    OSUM's plain-text markers as an added token (one saved by the echat profile) is an error.
    """
    profile = check_profile(profile)
    needed = PROFILE_SPECIAL_TOKENS[profile]
    if profile == OSUM:
        added = [t for t in OSUM_PLAIN_TEXT if t in tok.get_added_vocab()]
        if added:
            raise ValueError(
                f"this tokenizer has {', '.join(added)} as added tokens, but the osum prompt profile reads "
                "them as plain text (OSUM-EChat's tokenizer does); load the LLM's own tokenizer instead"
            )
    vocab_now = tok.get_vocab()
    missing = [t for t in needed if t not in vocab_now]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if profile == OSUM and tok.pad_token != OSUM_PAD:
        tok.add_special_tokens({"pad_token": OSUM_PAD})
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT
    if tok.eos_token is None:
        tok.eos_token = IM_END
    tok.padding_side = "right"
    for t in needed:  # each must now be a single id, or prompts and splicing break
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"special token {t!r} does not encode to a single id in this tokenizer: {ids}")
    setattr(tok, PROFILE_ATTRIBUTE, profile)
    return tok


def profile_special_tokens(tok: Any) -> tuple[str, ...]:
    """The special tokens the tokenizer's prompt profile carries as single ids (SPECIAL_TOKENS for
    `echat`; under `osum` the ChatML markers, the pad token and <|audio|>, plus OSUM's [PAD])."""
    from echat.model.prompts import tokenizer_profile

    profile = tokenizer_profile(tok)
    return PROFILE_SPECIAL_TOKENS[profile] + ((OSUM_PAD,) if profile == OSUM else ())


def special_token_ids(tok: Any) -> SpecialTokenIds:
    from echat.model.prompts import tokenizer_profile

    ids = tok.convert_tokens_to_ids
    plain = tokenizer_profile(tok) == OSUM  # the markers are several ordinary tokens there
    pad = tok.pad_token_id if plain else ids(ENDOFTEXT)  # osum: OSUM's [PAD]
    return SpecialTokenIds(
        audio=ids(AUDIO), im_start=ids(IM_START), im_end=ids(IM_END), pad=int(pad),
        unknown=None if plain else ids(UNKNOWN),
        think_start=None if plain else ids(THINK_START),
        think_end=None if plain else ids(THINK_END),
    )
