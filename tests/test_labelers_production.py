"""Production backends (pyannote VAD and diarization, Whisper, wav2vec2 age-gender, style) through
their real loading paths.

No test downloads anything. Each model is a tiny random-initialised one built with the library's own
classes (pyannote's PyanNet and WeSpeakerResNet34 saved as Lightning checkpoints and a pipeline
config.yaml naming them as speaker-diarization-community-1 does; transformers' Whisper and wav2vec2
classes with a locally built tokenizer and feature extractors), saved to a temp dir, and loaded by
the backend from there exactly as it would load a downloaded model. Values are random; the plumbing
(loading, batching, fields, vocabularies, provenance, splitting, reconciliation) is real. The
style endpoint is a local HTTP server speaking the chat-completions protocol.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import test_labelers_support as speech
from test_labelers_support import SR, run_stage

from echat.schemas.stage import Reject, TransientError
from echat.schemas.vocab import AGES, GENDERS, LANGUAGES, STYLES

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

# Random weights give pyannote's statistics pooling and clustering degenerate inputs; they say so.
pytestmark = [
    pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning"),
    pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _segment(uri: str, wave: np.ndarray, start: float | None = 0.0, **extra) -> dict:
    record = {"source_uri": uri, "_waveform": wave, "sampling_rate": SR, "duration": len(wave) / SR, **extra}
    if start is not None:
        record.update(segment_start=start, segment_end=start + len(wave) / SR, id=f"{Path(uri).stem}-{start:g}")
    return record


def _records(outputs):
    return [o for o in outputs if not isinstance(o, Reject)]


def _no_stage_errors(outputs):
    errors = [o for o in outputs if isinstance(o, Reject) and o.reason in ("stage_error", "invalid_label")]
    assert not errors, errors


@pytest.fixture(scope="module")
def voices():
    """Three short utterances (two voices)."""
    return [
        speech.say("The quick brown fox jumps over the lazy dog.", "en+m3"),
        speech.say("Please call me back when you get home tonight.", "en+f3"),
        speech.say("We need to buy some milk and bread.", "en+m1"),
    ]


# ---------------------------------------------------------------------------------------------
# pyannote: tiny models saved as Lightning checkpoints


def _save_lightning(model, folder: Path) -> Path:
    """`model` saved by Lightning's own Trainer as `folder/pytorch_model.bin` (a hub repo's layout)."""
    from lightning.pytorch import Trainer

    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(folder / "_trainer"), accelerator="cpu", devices=1)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(folder / "pytorch_model.bin"))
    shutil.rmtree(folder / "_trainer", ignore_errors=True)
    return folder


def _pyannet(specifications):
    from pyannote.audio.models.segmentation import PyanNet

    model = PyanNet(sincnet={"stride": 10}, lstm={"hidden_size": 16, "num_layers": 1},
                    linear={"hidden_size": 16, "num_layers": 1})
    model.specifications = specifications
    model.build()
    return model


@pytest.fixture(scope="module")
def pyannote_vad_model(tmp_path_factory) -> Path:
    """A multi-label speech/non-speech PyanNet (the VAD kind of segmentation model)."""
    import torch
    from pyannote.audio.core.task import Problem, Resolution, Specifications

    torch.manual_seed(0)
    spec = Specifications(problem=Problem.MULTI_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=5.0,
                          classes=["speech"])
    return _save_lightning(_pyannet(spec), tmp_path_factory.mktemp("pyannote") / "tiny-vad")


@pytest.fixture(scope="module")
def diarization_pipeline(tmp_path_factory) -> Path:
    """A folder laid out as pyannote/speaker-diarization-community-1: config.yaml naming
    $model/segmentation (a powerset PyanNet, as segmentation-3.0), $model/embedding (WeSpeakerResNet34)
    and $model/plda (VBx's transform and PLDA, small random matrices)."""
    import torch
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34

    root = tmp_path_factory.mktemp("pyannote") / "tiny-diarization"
    torch.manual_seed(0)
    segmentation = _pyannet(Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=5.0,
        classes=["speaker#1", "speaker#2", "speaker#3"], powerset_max_classes=2, permutation_invariant=True))
    _save_lightning(segmentation, root / "segmentation")
    embedding = WeSpeakerResNet34(num_mel_bins=16)
    embedding.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=5.0)
    _save_lightning(embedding, root / "embedding")
    dim, lda_dim = embedding.dimension, 16
    rng = np.random.default_rng(0)
    (root / "plda").mkdir()
    np.savez(root / "plda" / "xvec_transform.npz", mean1=np.zeros(dim), mean2=np.zeros(lda_dim),
             lda=rng.standard_normal((dim, lda_dim)))
    np.savez(root / "plda" / "plda.npz", mu=np.zeros(lda_dim), tr=np.eye(lda_dim), psi=np.linspace(2.0, 0.5, lda_dim))
    (root / "config.yaml").write_text(
        "pipeline:\n"
        "  name: pyannote.audio.pipelines.SpeakerDiarization\n"
        "  params:\n"
        "    clustering: VBxClustering\n"
        "    embedding: $model/embedding\n"
        "    embedding_batch_size: 8\n"
        "    embedding_exclude_overlap: true\n"
        "    plda: $model/plda\n"
        "    segmentation: $model/segmentation\n"
        "    segmentation_batch_size: 8\n"
        "params:\n"
        "  clustering: {threshold: 0.6, Fa: 0.07, Fb: 0.8}\n"
        "  segmentation: {min_duration_off: 0.0}\n"
    )
    return root


def test_pyannote_vad_loads_a_checkpoint_folder_and_cuts_segments(pyannote_vad_model, voices):
    from echat.labelers.pyannote_vad import PyannoteVAD

    stage = PyannoteVAD(model=str(pyannote_vad_model), min_segment_s=0.3)
    stage.setup()
    assert not stage._powerset
    files = [_segment(f"/data/file{i}.wav", np.concatenate([speech.silence(0.4), w, speech.silence(0.4)]), start=None)
             for i, w in enumerate(voices)]
    outputs = run_stage(stage, *files)
    _no_stage_errors(outputs)
    assert stage.describe() == "pyannote-vad:tiny-vad"
    by_file = {f["source_uri"]: f for f in files}
    for out in outputs:
        assert out.source_uri in by_file if isinstance(out, Reject) else out["source_uri"] in by_file
    records = _records(outputs)
    assert {o.reason for o in outputs if isinstance(o, Reject)} <= {"no_speech", "segment_too_short"}
    for rec in records:
        total = by_file[rec["source_uri"]]["duration"]
        assert 0.0 <= rec["segment_start"] < rec["segment_end"] <= total + 1e-6
        assert len(rec["_waveform"]) == round(rec["duration"] * SR) and rec["duration"] >= 0.3
    assert len({r["id"] for r in records}) == len(records)


def test_pyannote_vad_with_a_powerset_segmentation_model(diarization_pipeline, voices):
    """segmentation-3.0 is a powerset speaker-segmentation model: the VAD takes it as it is."""
    from echat.labelers.pyannote_vad import PyannoteVAD

    stage = PyannoteVAD(model=str(diarization_pipeline / "segmentation" / "pytorch_model.bin"), min_segment_s=0.2)
    outputs = run_stage(stage, _segment("/data/a.wav", voices[0], start=None), _segment("/data/b.wav", voices[1], start=None))
    _no_stage_errors(outputs)
    assert stage._powerset and stage.describe() == "pyannote-vad:segmentation"


def test_pyannote_vad_cuts_by_the_silero_stages_rules():
    """Given the same speech regions, both VAD backends give the same segments, rejects and flags."""
    from echat.labelers.pyannote_vad import PyannoteVAD
    from echat.labelers.vad import SileroVAD

    spans = [(0.2, 1.4), (1.6, 2.0), (3.5, 3.7), (5.0, 9.0)]
    wave = speech.white_noise(10 * SR, 0.01)
    record = {"source_uri": "/x/talk.wav", "_waveform": wave, "sampling_rate": SR, "transcript": "given text"}
    results = []
    for cls in (SileroVAD, PyannoteVAD):
        stage = cls(min_segment_s=0.5, merge_gap_s=0.8, max_segment_s=3.0, pad_s=0.1)
        stage.speech_spans_batch = lambda waves, s=spans: [list(s) for _ in waves]
        (result,) = stage.process_batch([record])
        results.append([(o.reason, o.segment_start) if isinstance(o, Reject) else
                        (o["id"], o["segment_start"], o["segment_end"], o["transcript"], o["quality_flags"]) for o in result])
    assert results[0] == results[1]
    assert len(results[0]) >= 4  # merged, split at the budget, one too short


def test_diarization_stage_splits_segments_into_speaker_turns(diarization_pipeline):
    from echat.labelers.diarize import PyannoteDiarization

    a, b = speech.say("I went to the market this morning.", "en-us+m3"), speech.say("Oh really, what did you buy?", "en-us+f3")
    conversation = np.concatenate([a, speech.silence(0.3), b, speech.silence(0.3), a])
    stage = PyannoteDiarization(model=str(diarization_pipeline), min_segment_s=0.2, pad_s=0.05)
    records = [_segment("/talks/dialogue.wav", conversation, start=2.0, transcript="the whole segment's words"),
               _segment("/talks/other.flac", b, start=None)]
    outputs = run_stage(stage, *records)
    _no_stage_errors(outputs)
    assert stage.describe() == "pyannote-diarization:tiny-diarization"
    rows = _records(outputs)
    assert rows, [o for o in outputs if isinstance(o, Reject)]
    for row in rows:
        if row["source_uri"].endswith("dialogue.wav"):
            assert re.fullmatch(r"dialogue@2\.00:SPEAKER_\d\d", row["speaker"])
            assert 2.0 <= row["segment_start"] < row["segment_end"] <= 2.0 + len(conversation) / SR + 1e-6
        else:
            assert re.fullmatch(r"other:SPEAKER_\d\d", row["speaker"]) and row["segment_start"] >= 0.0
        assert len(row["_waveform"]) == round(row["duration"] * SR)
        assert all(0.0 <= s < e <= row["duration"] + 1e-3 for s, e in row["_speech_spans"])
    assert len({r["id"] for r in rows}) == len(rows)
    dialogue = [r for r in rows if r["source_uri"].endswith("dialogue.wav")]
    if len(dialogue) + sum(isinstance(o, Reject) and o.source_uri.endswith("dialogue.wav") for o in outputs) > 1:
        assert all(r["transcript"] is None and "manifest_transcript_dropped_split" in r["quality_flags"] for r in dialogue)


def test_diarization_before_vad_gives_ids_per_file(diarization_pipeline, voices):
    """Placed before the VAD, the stage diarizes whole files: ids name the file, and the VAD cuts
    the turns further while the speaker travels with each piece."""
    from echat.labelers.diarize import PyannoteDiarization
    from echat.labelers.vad import SileroVAD
    from echat.schemas.stage_runner import run_stages

    wave = np.concatenate([voices[0], speech.silence(0.8), voices[1]])
    rows, rejects = run_stages([PyannoteDiarization(model=str(diarization_pipeline), min_segment_s=0.3),
                                SileroVAD(min_segment_s=0.3)], [_segment("/in/call.wav", wave, start=None)])
    assert rows or rejects
    assert all(re.fullmatch(r"call:SPEAKER_\d\d", r["speaker"]) for r in rows)
    assert all(0.0 <= r["segment_start"] < r["segment_end"] <= len(wave) / SR + 1e-6 for r in rows)


def test_diarization_turns_merge_pad_flag_and_drop_overlap():
    """The cutting rules on given turns (no model): merge a speaker's close turns, reject short
    pieces, flag overlapped speech, or drop it with `drop_overlap`."""
    from echat.labelers.diarize import OVERLAP_FLAG, PyannoteDiarization, merge_turns

    assert merge_turns([(0, 1, "A"), (1.2, 2, "A"), (2.1, 3, "B"), (3.1, 4, "A")], 0.5, 30.0) == [
        (0, 2, "A"), (2.1, 3, "B"), (3.1, 4, "A")]
    turns = [(0.5, 2.0, "SPEAKER_00"), (2.2, 2.5, "SPEAKER_00"), (3.0, 6.0, "SPEAKER_01"), (6.1, 6.3, "SPEAKER_00")]
    overlaps = [(3.0, 3.4)]
    wave = speech.white_noise(8 * SR, 0.01)
    record = {"source_uri": "gs://bucket/calls/c1.flac", "_waveform": wave, "sampling_rate": SR}
    for drop in (False, True):
        stage = PyannoteDiarization(model="unused/for-this-test", min_segment_s=0.5, pad_s=0.1, drop_overlap=drop)
        out = list(stage._pieces(record, wave, turns, overlaps))
        rows, rejects = _records(out), [o for o in out if isinstance(o, Reject)]
        assert [r["speaker"] for r in rows] == (["c1:SPEAKER_00", "c1:SPEAKER_01"] if not drop else ["c1:SPEAKER_00"])
        assert rows[0]["segment_start"] == pytest.approx(0.4) and rows[0]["segment_end"] == pytest.approx(2.6)
        assert [r.segment_start for r in rejects if r.reason == "segment_too_short"] == [pytest.approx(6.05)]
        if drop:
            assert [r.reason for r in rejects].count(OVERLAP_FLAG) == 1
        else:
            assert OVERLAP_FLAG in rows[1]["quality_flags"] and OVERLAP_FLAG not in (rows[0].get("quality_flags") or [])


def _two_speaker_wav(path: Path) -> Path:
    """Two espeak-ng voices of different gender taking turns, written with -w and concatenated with
    pauses (0.15 s) too short for the VAD to cut at, so that its segments hold both voices."""
    lines = [("en-us+m3", "Good morning, I would like to ask about the train to the city."),
             ("en-us+f3", "Of course. The next one leaves at ten, from platform two."),
             ("en-us+m3", "Thank you. Is there a later one in the afternoon?"),
             ("en-us+f3", "Yes, there is one every hour until six in the evening.")]
    pieces, rate = [], None
    for i, (voice, text) in enumerate(lines):
        part = path.parent / f"_turn{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(part), text], check=True, capture_output=True)
        data, rate = sf.read(str(part), dtype="float32")
        part.unlink()
        pieces += [data, np.zeros(int(0.15 * rate), dtype=np.float32)]
    sf.write(str(path), np.concatenate(pieces), rate)
    return path


@pytest.mark.slow
def test_a_two_speaker_file_goes_through_a_build_with_pyannote_diarization(diarization_pipeline, local_profile, tmp_path):
    import pyarrow.parquet as pq

    from echat.pipelines.build import build

    audio = tmp_path / "input"
    audio.mkdir()
    _two_speaker_wav(audio / "two_speakers.wav")
    profile = local_profile()
    entry = type(profile.stages[0])(slot="diarize", backend="pyannote",
                                    params={"model": str(diarization_pipeline), "min_segment_s": 0.3})
    stages = list(profile.stages)
    stages.insert([e.slot for e in stages].index("vad") + 1, entry)
    profile = profile.model_copy(update={"stages": stages})
    summary = build(profile, str(audio), str(tmp_path / "out"), overwrite=True)
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    diarize = summary["stages"]["diarize"]
    assert diarize["in"] >= 1 and diarize["out"] >= 1
    table = pq.read_table([str(p) for p in sorted((tmp_path / "out" / "data").glob("*.parquet"))],
                          columns=["id", "speaker", "segment_start", "segment_end"]).to_pylist()
    assert table, summary["rejects"]
    assert all(re.fullmatch(r"two_speakers@\d+\.\d\d:SPEAKER_\d\d", row["speaker"] or "") for row in table)
    assert len({row["id"] for row in table}) == len(table)


# ---------------------------------------------------------------------------------------------
# Whisper through transformers


LANG_CODES = ("en", "zh", "de", "fr")


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory) -> Path:
    """A tiny Whisper: the byte-level BPE of model/tiny_tokenizer with Whisper's special and
    timestamp tokens, an 80-bin feature extractor, a 2+2-layer model and a generation config with
    languages, tasks and alignment heads (as a hub checkpoint has). End-of-text is suppressed so a
    random model always decodes `max_new_tokens` text tokens."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    source = json.loads((Path(__file__).parents[1] / "model" / "tiny_tokenizer" / "tokenizer.json").read_text())
    base = [t for t, _ in sorted(source["model"]["vocab"].items(), key=lambda kv: kv[1]) if not t.startswith("<|")]
    vocab = {t: i for i, t in enumerate(base)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in source["model"]["merges"]]
    merges = [m for m in merges if all(part in vocab for part in m) and "".join(m) in vocab]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    specials = (["<|startoftranscript|>"] + [f"<|{c}|>" for c in LANG_CODES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    assert ids["<|endoftext|>"] == len(base)  # as in Whisper: the first id after the byte-level vocabulary
    folder = tmp_path_factory.mktemp("whisper") / "tiny-whisper"
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(folder)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=1500, max_target_positions=64, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=64,
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANG_CODES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        alignment_heads=[[1, 0], [1, 1]], begin_suppress_tokens=[eot],
        suppress_tokens=sorted(set(ids.values()) | set(range(ids["<|notimestamps|>"] + 1, len(tokenizer)))))
    model.save_pretrained(folder)
    return folder


def _check_words(row):
    words = row["words"]
    assert words and all(set(w) == {"word", "start", "end", "score"} for w in words)
    assert all(0.0 <= w["start"] <= w["end"] <= row["duration"] + 1e-6 and 0.0 <= w["score"] <= 1.0 for w in words)
    assert all(w["word"] and w["word"] == w["word"].strip() for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def test_whisper_transcribes_a_batch_with_language_id_and_word_timestamps(whisper_model, voices):
    from echat.labelers.whisper_asr import UNSUPPORTED_FLAG_PREFIX, WhisperASR

    stage = WhisperASR(model=str(whisper_model), max_new_tokens=8)
    calls = []
    stage.setup()
    generate = stage._model.generate
    stage._model.generate = lambda *a, **k: calls.append(a[0].shape[0]) or generate(*a, **k)
    records = [_segment(f"/d/u{i}.wav", w) for i, w in enumerate(voices)]
    outputs = run_stage(stage, *records)
    _no_stage_errors(outputs)
    assert calls == [3]  # one generate call for the batch
    for row in outputs:
        assert row["transcript"] and row["transcript_origin"] == "whisper:tiny-whisper"
        assert 0.0 <= row["transcript_confidence"] <= 1.0
        _check_words(row)
        flags = row.get("quality_flags") or []
        if row.get("language") is not None:
            assert row["language"] in LANGUAGES and row["language_origin"] == "whisper:tiny-whisper"
        else:  # the random model picked de or fr: outside the corpus languages, flagged
            assert any(f.startswith(UNSUPPORTED_FLAG_PREFIX) for f in flags)


def test_whisper_forced_language_known_transcripts_and_unsupported_languages(whisper_model, voices):
    from echat.labelers.whisper_asr import WhisperASR

    stage = WhisperASR(model=str(whisper_model), language="zh", max_new_tokens=6)
    given = _segment("/d/given.wav", voices[1], transcript="call me back")  # a manifest's: language ID only
    (forced, detected) = run_stage(stage, _segment("/d/zh.wav", voices[0]), given)
    assert forced["language"] == "zh" and forced["transcript"]
    assert detected["transcript"] == "call me back" and detected.get("words") is None
    assert detected.get("language") in (*LANGUAGES, None)
    # A language outside the vocabulary: flagged, or the record rejected when the profile says so.
    found = {"language": "fr", "text": "bonjour", "confidence": 0.5, "words": []}
    (flagged,) = list(stage._fill(_segment("/d/fr.wav", voices[0]), found, 2.0))
    assert flagged.get("language") is None and "unsupported_language:fr" in flagged["quality_flags"]
    strict = WhisperASR(model=str(whisper_model), reject_unsupported_language=True)
    (rejected,) = list(strict._fill(_segment("/d/fr.wav", voices[0]), found, 2.0))
    assert isinstance(rejected, Reject) and rejected.reason == "unsupported_language"
    (too_long,) = run_stage(stage, _segment("/d/long.wav", speech.silence(31.0)))
    assert isinstance(too_long, Reject) and too_long.reason == "too_long"


# ---------------------------------------------------------------------------------------------
# wav2vec2 age-gender


@pytest.fixture(scope="module")
def age_gender_model(tmp_path_factory) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from echat.labelers.age_gender import model_classes

    AgeGenderModel, _ = model_classes()
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            feat_extract_norm="layer", do_stable_layer_norm=True, final_dropout=0.1, vocab_size=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("w2v2") / "tiny-age-gender"
    AgeGenderModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def test_age_gender_model_has_audeerings_weight_names():
    import torch
    from transformers import Wav2Vec2Config

    from echat.labelers.age_gender import model_classes

    AgeGenderModel, _ = model_classes()
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    keys = {k for k in AgeGenderModel(config).state_dict() if not k.startswith("wav2vec2.")}
    assert keys == {f"{head}.{layer}.{p}" for head in ("age", "gender") for layer in ("dense", "out_proj")
                    for p in ("weight", "bias")}
    assert torch.nn.Module in AgeGenderModel.__mro__


def test_age_gender_labels_a_padded_batch(age_gender_model, voices):
    from echat.labelers.age_gender import Wav2Vec2AgeGender

    stage = Wav2Vec2AgeGender(model=str(age_gender_model))
    records = [_segment(f"/d/v{i}.wav", w) for i, w in enumerate(voices)]
    outputs = run_stage(stage, *records)
    _no_stage_errors(outputs)
    for row in outputs:
        assert row["gender"] in GENDERS and row["age"] in AGES
        assert 0.0 <= row["gender_score"] <= 1.0 and 0.0 <= row["age_score"] <= 1.0
        assert row["gender_model"] == row["age_model"] == "wav2vec2-age-gender:tiny-age-gender"
        assert row["_origins"] == {"gender": "model", "age": "model"}
    # Padding does not change a record's answer: each alone gives what the batch gave.
    alone = [stage.predict([w])[0] for w in voices]
    together = stage.predict(list(voices))
    for (y1, p1), (y2, p2) in zip(alone, together):
        assert y1 == pytest.approx(y2, abs=1e-3) and np.allclose(p1, p2, atol=1e-4)
    (short,) = run_stage(stage, _segment("/d/blip.wav", speech.silence(0.05)))
    assert isinstance(short, Reject) and short.reason == "too_short"
    # A gender from the manifest stays; the model still fills the age.
    (kept,) = run_stage(stage, _segment("/d/m.wav", voices[0], gender="female", gender_score=1.0, gender_model="manifest"))
    assert kept["gender"] == "female" and kept["gender_model"] == "manifest" and kept["age"] in AGES


def test_age_gender_decision_rules():
    from echat.labelers.age_gender import CHILD_CLASS_FLAG, Wav2Vec2AgeGender

    stage = Wav2Vec2AgeGender(model="audeering/wav2vec2-large-robust-24-ft-age-gender", child_below_years=13, old_from_years=60)
    adult = stage._label({}, 35.0, np.array([0.2, 0.7, 0.1]))
    assert (adult["gender"], adult["age"]) == ("male", "adult") and adult["gender_score"] == pytest.approx(0.7 / 0.9)
    old = stage._label({}, 72.0, np.array([0.8, 0.1, 0.1]))
    assert (old["gender"], old["age"]) == ("female", "old") and old["age_score"] > 0.9
    child = stage._label({}, 15.0, np.array([0.1, 0.3, 0.6]))  # the child class wins: a child, a boy's voice
    assert (child["gender"], child["age"]) == ("male", "child") and CHILD_CLASS_FLAG in child["quality_flags"]
    assert stage._label({}, 9.0, np.array([0.5, 0.4, 0.1]))["age"] == "child"
    assert Wav2Vec2AgeGender(child_class_sets_age=False)._label({}, 15.0, np.array([0.1, 0.3, 0.6]))["age"] == "adult"
    with pytest.raises(ValueError):
        Wav2Vec2AgeGender(child_below_years=70, old_from_years=60)


# ---------------------------------------------------------------------------------------------
# style: keywords offline, an OpenAI-compatible endpoint in production


@pytest.mark.parametrize("text, style", [
    ("Once upon a time a princess lived in a castle with a dragon.", "fairy tale"),
    ("Thank you for calling, how can I help you with your order today?", "customer service"),
    ("According to the report, scientists found the economy grew two percent.", "news/science"),
    ("The ghost screamed in the darkness of the haunted house at midnight.", "horror story"),
    ("Chapter one. He said nothing, and she replied with a smile.", "audiobook"),
    ("Hey, can you call me back tonight? I think we need milk.", "daily conversation"),
    ("从前有一位公主住在城堡里，她会魔法。", "fairy tale"),
    ("据新闻报道，科学家发现了新的数据。", "news/science"),
    ("Purple elephants calculate.", "other"),
])
def test_keyword_style_rules(text, style):
    from echat.labelers.style import KeywordStyle

    found, score = KeywordStyle().classify(text)
    assert found == style and 0.0 < score <= 0.6


def test_keyword_style_through_the_runner():
    from echat.labelers.style import KeywordStyle

    rows = run_stage(KeywordStyle(), {"source_uri": "a", "transcript": "Once upon a time there was a king."},
                     {"source_uri": "b", "transcript": None})
    assert rows[0]["style"] == "fairy tale" and rows[0]["style_model"] == "style-keywords-v1"
    assert rows[0]["_origins"] == {"style": "heuristic"}
    assert rows[1].get("style") is None and "style_unknown" in rows[1]["quality_flags"]
    assert all(r.get("style") in (*STYLES, None) for r in rows)


class StyleServer:
    """A chat-completions endpoint on 127.0.0.1: answers each request from `script` (a list of
    (status, content or None, headers)) in order, then with `default`; records what it was sent."""

    def __init__(self, default=(200, '{"style": "fairy tale", "confidence": 0.8}', {})):
        self.script, self.default, self.bodies, self.auth = [], default, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                server.bodies.append(body)
                server.auth.add(self.headers.get("Authorization"))
                status, content, headers = server.script.pop(0) if server.script else server.default
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59}}
                else:
                    payload = {"error": {"message": content or "injected", "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def style_server():
    server = StyleServer()
    yield server
    server.close()


def test_openai_style_labels_caches_and_keeps_the_key_secret(style_server, tmp_path, monkeypatch):
    from echat.labelers.style import OpenAIStyle

    monkeypatch.setenv("STYLE_TEST_KEY", "sk-test-secret-123456")
    params = dict(model="tiny-llm", base_url=style_server.url, api_key_env="STYLE_TEST_KEY", cache_dir=str(tmp_path))
    stage = OpenAIStyle(**params)
    record = {"source_uri": "a", "transcript": "Once upon a time there was a dragon."}
    (row,) = run_stage(stage, record)
    assert (row["style"], row["style_score"], row["style_model"]) == ("fairy tale", 0.8, "openai-compatible:tiny-llm")
    assert stage._client.max_retries == 0
    body = style_server.bodies[0]
    assert body["response_format"]["type"] == "json_schema" and "Once upon a time" in body["messages"][-1]["content"]
    assert style_server.auth == {"Bearer sk-test-secret-123456"}
    assert "sk-test" not in repr(stage) and "sk-test" not in json.dumps(stage.__getstate__(), default=str)
    # A second stage (a rerun) finds the answer in the cache and sends nothing.
    again = OpenAIStyle(**params)
    (row2,) = run_stage(again, record)
    assert row2["style"] == "fairy tale" and len(style_server.bodies) == 1 and again.usage()["cache_hits"] == 1


def test_openai_style_transient_errors_off_vocabulary_answers_and_refused_keys(style_server):
    from echat.labelers.style import OpenAIStyle

    stage = OpenAIStyle(model="tiny-llm", base_url=style_server.url, timeout_s=2.0)
    record = {"source_uri": "a", "transcript": "Thank you for calling."}
    style_server.script = [(429, "slow down", {"Retry-After": "3"})]
    with pytest.raises(TransientError) as rate_limited:
        list(stage.process(record))
    assert rate_limited.value.retry_after == 3.0
    style_server.script = [(503, "down", {})]
    with pytest.raises(TransientError):
        list(stage.process(record))
    # An answer outside the vocabulary is asked again with the error fed back, then left unknown.
    style_server.script = [(200, '{"style": "opera", "confidence": 0.9}', {}), (200, "no json here", {})]
    (unknown,) = run_stage(stage, record)
    assert unknown.get("style") is None and "style_unknown" in unknown["quality_flags"]
    assert "opera" in style_server.bodies[-1]["messages"][-1]["content"]
    # OSUM's Chinese style names are normalised through the alias table.
    style_server.script = [(200, '{"style": "客服", "confidence": 0.7}', {})]
    (row,) = run_stage(stage, record)
    assert row["style"] == "customer service"
    style_server.script = [(401, "bad key", {})]
    (refused,) = run_stage(stage, record)
    assert isinstance(refused, Reject) and refused.reason == "llm_auth_error"
