"""Where production model stages get their weights: a hub id or a local path, and a download cache.

Every model stage (pyannote, transformers) takes the same three parameters:
  model      a Hugging Face hub id (`pyannote/segmentation-3.0`, `openai/whisper-large-v3`) or a local
             path (a folder as `huggingface-cli download ID --local-dir DIR` leaves it, or the
             checkpoint file itself where the library loads one). A path that exists is loaded from
             disk and nothing is downloaded; anything else is taken for a hub id.
  cache_dir  the download cache for hub ids (the `cache_dir` argument of the libraries'
             `from_pretrained`). The build hands every stage that takes `cache_dir` the profile's
             `cache_dir` unless the entry sets its own; a remote URL there (gs://, s3://: the LLM
             call cache may live in a bucket) cannot hold model files, so such a value falls back to
             the library's default cache (HF_HUB_CACHE, ~/.cache/huggingface/hub) with a warning.
  device     "cpu" (default), "cuda", "cuda:1", "mps"...
Gated models (pyannote's) need a Hugging Face token: huggingface_hub reads it from the environment
(`HF_TOKEN`) or from `huggingface-cli login`; no stage takes a token as a parameter, so none reaches
a profile, a log or the summary. With `HF_HUB_OFFLINE=1` hub ids resolve from the cache only.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def is_local(model: str) -> bool:
    """Whether `model` names something on this machine (a folder or a file) rather than a hub id."""
    return os.path.exists(os.path.expanduser(str(model)))


def local_or_id(model: str) -> str:
    """A local path with `~` expanded, or the hub id unchanged."""
    expanded = os.path.expanduser(str(model))
    return expanded if os.path.exists(expanded) else str(model)


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """The download cache to hand a library's `from_pretrained`, or None for its default."""
    if cache_dir is None or str(cache_dir).strip() == "":
        return None
    text = str(cache_dir)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        log.warning("cache_dir %s is not a local folder: model downloads go to the hub's default cache", text)
        return None
    return str(Path(os.path.expanduser(text)))


def check_model_param(model: str | None, stage: str) -> str:
    """`model` as given, or a ValueError naming the parameter (at profile load, before any download)."""
    if model is None or not str(model).strip():
        raise ValueError(f"{stage}: params.model is required (a hub id or a local path)")
    return str(model).strip()


def check_device(device: str) -> str:
    """A device string torch will accept; checked for form only, so a profile loads on any machine."""
    text = str(device).strip().lower()
    kind = text.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps", "xpu") or (":" in text and not text.split(":", 1)[1].isdigit()):
        raise ValueError(f"device must be cpu, cuda, cuda:N, mps or xpu; got {device!r}")
    return text


def model_label(model: str) -> str:
    """A model's name for provenance: the hub id, or a local path's folder name (never a home path).

    `/models/whisper-large-v3/` -> `whisper-large-v3`; `/ckpt/seg/pytorch_model.bin` -> `seg`.
    """
    if not is_local(model):
        return str(model)
    path = Path(os.path.expanduser(str(model))).resolve()
    if path.is_file():
        path = path.parent
    return path.name or str(model)
