"""Age and gender stage with a wav2vec2 age-gender model through transformers.

The architecture is audeering's `audeering/wav2vec2-large-robust-24-ft-age-gender` (and its 6-layer
sibling `-6-ft-age-gender`), as their model card defines it: a `Wav2Vec2Model`, its hidden states
averaged over time, and two heads of the same shape (dense -> tanh -> projection): `age`, one
regression output where 0..1 stands for 0..100 years, and `gender`, three classes in the order
female, male, child. `AgeGenderModel` below is that class, built on transformers'
`Wav2Vec2PreTrainedModel`, so the published checkpoint loads with `from_pretrained` (its weight
names are `wav2vec2.*`, `age.dense.*`, `age.out_proj.*`, `gender.dense.*`, `gender.out_proj.*`);
the waveform is normalised by the checkpoint's `Wav2Vec2FeatureExtractor`. Records of a batch are
padded together and the average skips the padded frames.

Labels (OSUM's sets):
  age     from the regressed years: below `child_below_years` (13) -> child, at least
          `old_from_years` (60) -> old, else adult. The score is the larger of the model's child
          probability and a ramp on the distance to the nearest threshold for "child", and the ramp
          alone for "adult"/"old": 0.5 at a threshold, `max_score` 10 years away.
  gender  female or male: the larger of the two class probabilities, renormalised over the pair
          (the child class says nothing about which). When the child class wins the three-way
          vote the record is also flagged `age_gender_child_class` and its age is at most "child"
          when `child_class_sets_age` (default): a child's voice regressed to 14 years is still a
          child by the model's own classifier.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import MODEL, BatchedStage, Result, as_result

from . import model_hub
from .flags import add_flag

DEFAULT_MODEL = "audeering/wav2vec2-large-robust-24-ft-age-gender"
GENDER_CLASSES = ("female", "male", "child")  # the heads' order in audeering's checkpoints
CHILD_CLASS_FLAG = "age_gender_child_class"
MIN_SECONDS = 0.1  # wav2vec2's convolutions need a few hundred samples; shorter input is rejected


def model_classes():
    """(AgeGenderModel, ModelHead), defined on first use so that importing this module stays torch-free."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import torch
    from torch import nn
    from transformers import Wav2Vec2Model, Wav2Vec2PreTrainedModel

    class ModelHead(nn.Module):
        """Dense -> tanh -> projection, with dropout (audeering's head)."""

        def __init__(self, config, num_labels: int):
            super().__init__()
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.dropout = nn.Dropout(config.final_dropout)
            self.out_proj = nn.Linear(config.hidden_size, num_labels)

        def forward(self, features):
            x = self.dropout(features)
            x = torch.tanh(self.dense(x))
            x = self.dropout(x)
            return self.out_proj(x)

    class AgeGenderModel(Wav2Vec2PreTrainedModel):
        """wav2vec2 + age regression head + 3-way gender head (female, male, child)."""

        def __init__(self, config):
            super().__init__(config)
            self.config = config
            self.wav2vec2 = Wav2Vec2Model(config)
            self.age = ModelHead(config, 1)
            self.gender = ModelHead(config, 3)
            self.post_init()

        def forward(self, input_values, attention_mask=None):
            outputs = self.wav2vec2(input_values, attention_mask=attention_mask)
            hidden_states = outputs[0]
            if attention_mask is None:
                pooled = hidden_states.mean(dim=1)
            else:  # the mean over the frames of real audio, not the padding
                lengths = self.wav2vec2._get_feat_extract_output_lengths(attention_mask.sum(-1))
                frames = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None, :] < lengths[:, None]
                weights = frames.to(hidden_states.dtype).unsqueeze(-1)
                pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            logits_age = self.age(pooled)
            probs_gender = torch.softmax(self.gender(pooled), dim=1)
            return pooled, logits_age, probs_gender

    _CLASSES = (AgeGenderModel, ModelHead)
    return _CLASSES


_CLASSES = None


class Wav2Vec2AgeGender(BatchedStage):
    name: ClassVar[str] = "age_gender"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate")
    writes: ClassVar[tuple[str, ...]] = (
        "gender", "gender_score", "gender_model", "age", "age_score", "age_model", "quality_flags",
    )
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | None = None,
        device: str = "cpu",
        child_below_years: float = 13.0,
        old_from_years: float = 60.0,
        child_class_sets_age: bool = True,
        max_score: float = 0.95,
        max_seconds: float = 30.0,
    ):
        if not 0 < child_below_years < old_from_years <= 100:
            raise ValueError(f"need 0 < child_below_years ({child_below_years}) < old_from_years ({old_from_years}) <= 100")
        if not 0.5 <= max_score <= 1.0:
            raise ValueError(f"max_score must be in [0.5, 1], got {max_score}")
        if max_seconds <= MIN_SECONDS:
            raise ValueError(f"max_seconds must exceed {MIN_SECONDS}, got {max_seconds}")
        self.model = model_hub.check_model_param(model, "wav2vec2 age-gender")
        self.cache_dir = cache_dir
        self.device = model_hub.check_device(device)
        self.child_below_years = float(child_below_years)
        self.old_from_years = float(old_from_years)
        self.child_class_sets_age = bool(child_class_sets_age)
        self.max_score = float(max_score)
        self.max_seconds = float(max_seconds)
        self._model = None
        self._extractor = None

    def setup(self) -> None:
        import torch
        from transformers import Wav2Vec2FeatureExtractor

        source, cache = model_hub.local_or_id(self.model), model_hub.hub_cache_dir(self.cache_dir)
        AgeGenderModel, _ = model_classes()
        self._extractor = Wav2Vec2FeatureExtractor.from_pretrained(source, cache_dir=cache)
        model = AgeGenderModel.from_pretrained(source, cache_dir=cache)
        model.to(torch.device(self.device))
        model.eval()
        self._model = model

    def teardown(self) -> None:
        self._model = self._extractor = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = state["_extractor"] = None
        return state

    def describe(self) -> str:
        return f"wav2vec2-age-gender:{model_hub.model_label(self.model)}"

    # ------------------------------------------------------------------ records

    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        if self._model is None:
            self.setup()
        results: list[Result | BaseException | None] = [None] * len(records)
        todo, waves = [], []
        for i, record in enumerate(records):
            try:
                wave = _model_input(record)
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
                continue
            seconds = len(wave) / SAMPLE_RATE
            if seconds < MIN_SECONDS:
                results[i] = self.reject(record, "too_short", f"{seconds:.3f} s < {MIN_SECONDS} s for wav2vec2")
                continue
            todo.append(i)
            waves.append(wave[: int(self.max_seconds * SAMPLE_RATE)])  # the voice is in the first seconds
        try:
            predictions = self.predict(waves)
        except Exception:  # noqa: BLE001 - each alone, so one bad record fails alone
            predictions = []
            for wave in waves:
                try:
                    predictions.extend(self.predict([wave]))
                except Exception as exc:  # noqa: BLE001
                    predictions.append(exc)
        for i, found in zip(todo, predictions):
            results[i] = found if isinstance(found, BaseException) else as_result([self._label(records[i], *found)])
        return results  # type: ignore[return-value]

    def predict(self, waves: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """(age in years, [p_female, p_male, p_child]) for each 16 kHz mono waveform."""
        import torch

        if self._model is None:
            self.setup()
        if len(waves) > 1 and getattr(self._model.config, "feat_extract_norm", "layer") == "group":
            # Checkpoints with group-norm feature encoders take no attention mask (their padding would
            # leak into every frame): their records go one by one, unpadded.
            return [found for wave in waves for found in self.predict([wave])]
        inputs = self._extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True,
                                 return_attention_mask=True)
        device = torch.device(self.device)
        values = inputs["input_values"].to(device=device, dtype=self._model.dtype)
        mask = inputs.get("attention_mask")
        with torch.inference_mode():
            _, age, gender = self._model(values, attention_mask=mask.to(device) if mask is not None else None)
        years = (age[:, 0].float().clamp(0.0, 1.0) * 100.0).cpu().numpy()
        probs = gender.float().cpu().numpy()
        return [(float(y), p) for y, p in zip(years, probs)]

    def _label(self, record: dict[str, Any], years: float, probs: np.ndarray) -> dict[str, Any]:
        out = dict(record)
        p_female, p_male, p_child = (float(p) for p in probs)
        pair = p_female + p_male
        out["gender"] = "female" if p_female >= p_male else "male"
        out["gender_score"] = min(self.max_score, max(p_female, p_male) / pair) if pair > 0 else 0.5
        child_class = p_child > max(p_female, p_male)
        if child_class:
            add_flag(out, CHILD_CLASS_FLAG)
        age = self.age_group(years)
        score = self._ramp(years)
        if age == "child":
            score = max(score, min(self.max_score, p_child))
        elif child_class and self.child_class_sets_age:
            age, score = "child", min(self.max_score, p_child)
        out["age"], out["age_score"] = age, float(score)
        return out

    def age_group(self, years: float) -> str:
        if years < self.child_below_years:
            return "child"
        if years >= self.old_from_years:
            return "old"
        return "adult"

    def _ramp(self, years: float) -> float:
        """0.5 at the nearest threshold, rising linearly to max_score 10 years away."""
        distance = min(abs(years - self.child_below_years), abs(years - self.old_from_years))
        return float(min(self.max_score, 0.5 + (self.max_score - 0.5) * distance / 10.0))


def _model_input(record: dict[str, Any]) -> np.ndarray:
    if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"wav2vec2 age-gender expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
    waveform = np.asarray(record["_waveform"], dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"wav2vec2 age-gender expects a mono waveform, got shape {waveform.shape}")
    return waveform
