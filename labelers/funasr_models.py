"""FunASR models for the stages: found on a hub or on disk, loaded once per worker, run on batches.

Used by the FunASR backends (funasr_vad.py, sensevoice.py, paraformer.py, emotion2vec.py). Nothing
here imports funasr, modelscope or huggingface_hub at module import time: `load` does, inside a
stage's `setup()`.

Where a model comes from (`ModelSource`, one per stage, from the stage's params):
  model              a local directory (config.yaml + model.pt, + tokens / bpe.model / am.mvn as the
                     model has them), a hub id ("iic/SenseVoiceSmall", "FunAudioLLM/SenseVoiceSmall"),
                     or one of funasr's short names ("fsmn-vad", "paraformer-zh", "ct-punc",
                     "emotion2vec_plus_large"), which funasr's own name tables map to a hub id
  hub                "ms" (ModelScope, funasr's default) or "hf" (Hugging Face)
  cache_dir          where a hub id is downloaded to (None: the hub client's default,
                     ~/.cache/modelscope/hub or ~/.cache/huggingface/hub). The build hands a stage
                     the profile's `cache_dir` unless its entry sets one; a remote URL there
                     (gs://, s3://) cannot hold model files and falls back to the default
                     (labelers/model_hub.py, shared with the pyannote and transformers stages)
  revision           a hub revision (branch, tag or commit); None: the hub's default
  local_files_only   take a hub id from `cache_dir` without asking the hub (offline workers with a
                     pre-filled cache); fails when it is not there
  device             "cpu" (default), "cuda", "cuda:0"...; funasr falls back to cpu when the
                     device is not there
  ncpu               torch threads funasr sets when it builds the model (funasr's own default is
                     4; 1 here, like the other stages: workers run in parallel processes)
A hub id is resolved to a local directory with the hub's own client (modelscope's or
huggingface_hub's `snapshot_download`, with `cache_dir`, `revision` and `local_files_only`), and
funasr's `AutoModel` is then given that directory: a downloaded model and a local checkpoint load
through exactly the same path. `disable_update=True` keeps funasr from checking PyPI for a newer
release at start.

Provenance (`*_model`, `transcript_origin`...) names the backend and the model: "<backend>:<hub id>",
or for a local directory its folder name (model_hub.model_label: never a home path).

A loaded model is kept per process, keyed by the resolved directory and the options it was built
with, so two stages (or two stage instances) naming the same model share one copy. funasr's
`AutoModel.generate` changes the model's own settings while it runs, so calls into one loaded
model are serialised by a lock that travels with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import BatchedStage, Result, as_result

from .model_hub import check_device, hub_cache_dir, model_label

HUBS = ("ms", "hf")
_HUB_NAMES = {"ms": "ms", "modelscope": "ms", "hf": "hf", "huggingface": "hf"}


def check_hub(hub: str) -> str:
    """The canonical hub name ("ms" or "hf") of what a profile gave; ValueError otherwise."""
    canonical = _HUB_NAMES.get(str(hub).strip().lower())
    if canonical is None:
        raise ValueError(f"hub must be one of {', '.join(HUBS)} (or modelscope, huggingface), got {hub!r}")
    return canonical


@dataclass(frozen=True)
class ModelSource:
    """Where one FunASR model comes from and how it is built (see the module docstring)."""

    model: str
    hub: str = "ms"
    cache_dir: str | None = None
    revision: str | None = None
    local_files_only: bool = False
    device: str = "cpu"
    ncpu: int = 1

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a hub id, a funasr model name or a local path, got {self.model!r}")
        object.__setattr__(self, "hub", check_hub(self.hub))
        if int(self.ncpu) < 1:
            raise ValueError(f"ncpu must be at least 1, got {self.ncpu}")
        object.__setattr__(self, "device", check_device(self.device))

    @property
    def label(self) -> str:
        """The model's name for provenance: the hub id, or a local directory's folder name."""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{model_label(self.model)}{revision}"

    def with_model(self, model: str) -> "ModelSource":
        """Another model (a punctuation model, say) from the same hub and cache, on the same device,
        at its hub's default revision (`revision` is this model's)."""
        return ModelSource(model, self.hub, self.cache_dir, None, self.local_files_only, self.device, self.ncpu)

    def local_dir(self) -> str:
        """The model's directory on this machine: the path itself, or the hub id downloaded (or
        found in `cache_dir`) by the hub's client."""
        return resolve_model_dir(self)


def resolve_model_dir(source: ModelSource) -> str:
    path = os.path.expanduser(source.model)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"model {source.model!r} is a file; give the model's directory (config.yaml, model.pt...)")
    repo_id = hub_id(source.model, source.hub)
    cache_dir = hub_cache_dir(source.cache_dir)
    try:
        if source.hub == "hf":
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id, revision=source.revision, cache_dir=cache_dir,
                                     local_files_only=source.local_files_only)
        from modelscope.hub.snapshot_download import snapshot_download

        return snapshot_download(repo_id, revision=source.revision, cache_dir=cache_dir,
                                 local_files_only=source.local_files_only)
    except Exception as exc:  # noqa: BLE001 - every hub client has its own errors: say what was asked
        where = f" in {cache_dir}" if cache_dir else ""
        how = " (local_files_only: the cache only)" if source.local_files_only else ""
        raise RuntimeError(f"cannot get model {source.model!r} (hub {source.hub}: {repo_id}){where}{how}: "
                           f"{type(exc).__name__}: {exc}") from exc


def hub_id(model: str, hub: str) -> str:
    """The hub id of a funasr short name ("fsmn-vad" -> "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch"
    on ModelScope), from funasr's own name tables; any other name is taken as a hub id."""
    from funasr.download.name_maps_from_hub import name_maps_hf, name_maps_ms

    names = name_maps_hf if check_hub(hub) == "hf" else name_maps_ms
    return names.get(model, model)


@dataclass
class LoadedModel:
    """A funasr AutoModel and the lock that serialises calls into it."""

    automodel: Any
    directory: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(self, inputs: list, **options) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.automodel.generate(input=inputs, **options))


_LOADED: dict[tuple, LoadedModel] = {}
_LOADING = threading.Lock()


def load(source: ModelSource, **options: Any) -> LoadedModel:
    """The model of `source` built by funasr's AutoModel (with `options`, such as a `punc_model`
    directory or a model setting from its config.yaml), loaded once per process."""
    directory = source.local_dir()
    key = (os.path.realpath(directory), source.hub, source.device, int(source.ncpu), repr(sorted(options.items())))
    with _LOADING:
        loaded = _LOADED.get(key)
        if loaded is None:
            from funasr import AutoModel

            automodel = AutoModel(
                model=directory,
                hub=source.hub,
                device=source.device,
                ncpu=int(source.ncpu),
                disable_update=True,
                disable_pbar=True,
                # AutoModel calls logging.basicConfig with this level: it sets the root logger only
                # where nothing configured it, and WARNING there hides nobody else's warnings.
                log_level="WARNING",
                **options,
            )
            loaded = _LOADED[key] = LoadedModel(automodel, directory)
        return loaded


def waveform_of(record: dict[str, Any], who: str) -> np.ndarray:
    """The record's waveform as funasr takes it (16 kHz mono float32), or ValueError saying why not."""
    if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"{who} expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
    waveform = record.get("_waveform")
    if waveform is None:
        raise ValueError(f"{who} needs the decoded waveform (_waveform); is a decode stage before it?")
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"{who} expects a mono waveform, got shape {waveform.shape}")
    if waveform.size == 0:
        raise ValueError(f"{who} got an empty waveform")
    return waveform


def generate_each(
    run: Callable[[list[np.ndarray]], list[dict[str, Any]]],
    waveforms: Sequence[np.ndarray],
) -> list[dict[str, Any] | BaseException]:
    """One funasr result per waveform, in order: `run` over the whole batch, and where that fails or
    gives a different number of results (funasr answers a batch in which it found no token with a
    single empty result), `run` over each waveform alone, a failure standing in for its result."""
    waveforms = list(waveforms)
    if not waveforms:
        return []
    try:
        results: list[dict[str, Any]] | None = list(run(waveforms))
    except Exception as exc:  # noqa: BLE001 - find the waveform that broke the batch: each alone
        if len(waveforms) == 1:
            return [exc]
        results = None
    if results is not None and len(results) == len(waveforms):
        return results
    if len(waveforms) == 1:
        return [results[0] if results else {}]
    return [result for waveform in waveforms for result in generate_each(run, [waveform])]


class FunASRStage(BatchedStage):
    """A labeler over one FunASR model: one `generate()` call per batch of records, each record's
    funasr result turned into its output by `label`. A record that cannot be read, or whose result
    cannot be used, fails alone (the runner rejects it); `passthrough` lets a record by untouched."""

    backend: ClassVar[str] = "funasr"

    def __init__(self, source: ModelSource):
        self.source = source
        self._model: LoadedModel | None = None

    def load_options(self) -> dict[str, Any]:
        """Extra AutoModel arguments (a punctuation model, a config.yaml setting)."""
        return {}

    def generate_options(self) -> dict[str, Any]:
        """Extra `generate()` arguments (language, use_itn, output_timestamp...)."""
        return {}

    def setup(self) -> None:
        self._model = load(self.source, **self.load_options())

    def teardown(self) -> None:
        self._model = None  # the process keeps the loaded model for whoever asks for it next

    def describe(self) -> str:
        return f"{self.backend}:{self.source.label}"

    def passthrough(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The output of a record the model need not see (with a flag, say), or None to run it."""
        return None

    def label(self, record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """The output record for `record` given funasr's result for its waveform."""
        raise NotImplementedError

    def run_model(self, waveforms: list[np.ndarray]) -> list[dict[str, Any]]:
        if self._model is None:
            self.setup()
        return self._model.generate(waveforms, batch_size=len(waveforms), **self.generate_options())

    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        results: list[Result | BaseException | None] = [None] * len(records)
        todo, waveforms = [], []
        for i, record in enumerate(records):
            try:
                passed = self.passthrough(record)
                if passed is not None:
                    results[i] = [passed]
                    continue
                waveforms.append(waveform_of(record, type(self).__name__))
                todo.append(i)
            except Exception as exc:  # noqa: BLE001 - this record alone fails
                results[i] = exc
        for i, result in zip(todo, generate_each(self.run_model, waveforms)):
            if isinstance(result, BaseException):
                results[i] = result
                continue
            try:
                results[i] = as_result([self.label(records[i], result)])
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        return results  # type: ignore[return-value]
