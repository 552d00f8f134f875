"""The FunASR backends (fsmn-vad, SenseVoiceSmall, Paraformer + punctuation, emotion2vec) through
their real loading path, and the mappings of their outputs to the record's vocabularies.

Each model is built tiny and random-initialised from funasr's own registered classes
(FsmnVADStreaming + FSMN + WavFrontendOnline; Paraformer + SANMEncoder + ParaformerSANMDecoder +
CifPredictorV2 + WavFrontend + CharTokenizer; CTTransformer + SANMEncoder + CharTokenizer;
SenseVoiceSmall + SenseVoiceEncoderSmall + WavFrontend + SentencepiecesTokenizer over a
sentencepiece bpe.model trained here; Emotion2vec + CharTokenizer), through
`AutoModel.build_model` with a config, and saved as a downloaded model is laid out (config.yaml,
model.pt, tokens.json / tokens.txt / bpe.model). The stages then load it from that directory, or
by hub id from a ModelScope or Hugging Face cache folder with `local_files_only`, exactly as
they would a downloaded model, and label a batch under the real StageRunner (so an undeclared
write or an off-vocabulary label fails). Values are random; the plumbing is real. Nothing is
downloaded.

Where a test needs a known output, the tiny model's output layer is set so that one token wins
every frame (documented at each builder); the rest of the network stays random.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_labelers_support as speech
from echat.labelers import emotion2vec, funasr_models
from echat.labelers.emotion2vec import Emotion2vecEmotion, osum_emotion
from echat.labelers.funasr_vad import FsmnVAD
from echat.labelers.paraformer import ParaformerASR, tidy_text, words_of
from echat.labelers.sensevoice import SenseVoiceASR, parse
from echat.labelers.vad import SPLIT_FLAG
from echat.schemas import vocab
from echat.schemas.record import record_id
from echat.schemas.stage import Reject

SR = speech.SR
run_stage = speech.run_stage

SENSEVOICE_TAGS = [
    f"<|{t}|>"
    for t in (
        "zh en yue ja ko nospeech HAPPY SAD ANGRY NEUTRAL FEARFUL DISGUSTED SURPRISED EMO_UNKNOWN "
        "Speech BGM Applause Laughter Cry Sneeze Breath Cough Sing Speech_Noise GBG Event_UNK withitn woitn"
    ).split()
]
# One sentencepiece symbol that decodes to a full SenseVoice answer (see `sensevoice_dirs`).
SENSEVOICE_ANSWER = "<|en|><|HAPPY|><|Laughter|><|woitn|>hello"
PARAFORMER_TOKENS = ["<blank>", "<s>", "</s>", *"abcdefghij", "你", "好", "世", "界", "<unk>"]
EMOTION2VEC_LABELS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral", "其他/other",
                      "难过/sad", "吃惊/surprised", "<unk>"]
TINY_SANM = {
    "output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 1, "dropout_rate": 0.0,
    "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0, "input_layer": "pe",
    "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True, "kernel_size": 3, "sanm_shfit": 0,
    "selfattention_layer_type": "sanm",
}
FBANK_LFR = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10, "lfr_m": 7, "lfr_n": 6}


# ---------------------------------------------------------------------------------------------
# building tiny models with funasr's registered classes


def save_model(directory: Path, config: dict, *, tokenizer_file: str | None = None, doctor=None) -> Path:
    """Build `config` with funasr's registry (AutoModel.build_model), optionally adjust its weights,
    and save it as a model directory: config.yaml + model.pt (the tokenizer file already there)."""
    import torch
    import yaml
    from funasr import AutoModel

    built = dict(config)
    if tokenizer_file is not None:  # what funasr's hub loader fills in from the model directory
        key = "bpemodel" if tokenizer_file.endswith(".model") else "token_list"
        built["tokenizer_conf"] = {**config.get("tokenizer_conf", {}), key: str(directory / tokenizer_file)}
    model, _ = AutoModel.build_model(**built, device="cpu", disable_update=True)
    if doctor is not None:
        with torch.no_grad():
            doctor(model)
    torch.save(model.state_dict(), directory / "model.pt")
    with open(directory / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True)
    return directory


def fsmn_vad_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "frontend": "WavFrontendOnline",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
                          "dither": 0.0, "lfr_m": 5, "lfr_n": 1},
        "model": "FsmnVADStreaming",
        "model_conf": {"sample_rate": 16000, "detect_mode": 1, "max_end_silence_time": 800, "max_start_silence_time": 3000,
                       "window_size_ms": 200, "sil_to_speech_time_thres": 150, "speech_to_sil_time_thres": 150,
                       "max_single_segment_time": 60000, "speech_noise_thres": 0.6, "decibel_thres": -100.0,
                       "snr_thres": -100.0, "sil_pdf_ids": [0], "frame_in_ms": 10, "frame_length_ms": 25},
        "encoder": "FSMN",
        "encoder_conf": {"input_dim": 400, "input_affine_dim": 16, "fsmn_layers": 2, "linear_dim": 16, "proj_dim": 8,
                         "lorder": 4, "rorder": 0, "lstride": 1, "rstride": 0, "output_affine_dim": 16, "output_dim": 248},
    }
    return save_model(directory, config)


def sensevoice_dir(directory: Path, *, answer_every_frame: bool = False) -> Path:
    """SenseVoiceSmall with a bpe.model trained here on a few sentences, SenseVoice's tags as user
    symbols, plus one symbol holding a whole answer (SENSEVOICE_ANSWER). With `answer_every_frame`
    the CTC layer's weights are zeroed and its bias favours that symbol, so every frame decodes to
    it and the model answers exactly SENSEVOICE_ANSWER through funasr's CTC decoding and tokenizer."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    sentences = ["the quick brown fox jumps over the lazy dog", "please call me back when you get home",
                 "我今天去了市场买了一些苹果", "你好世界"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(directory / "bpe"), vocab_size=120, model_type="bpe",
        user_defined_symbols=[*SENSEVOICE_TAGS, SENSEVOICE_ANSWER], character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=3, pad_id=-1, minloglevel=2)
    (directory / "bpe.vocab").unlink()
    config = {
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {**TINY_SANM, "num_blocks": 2, "tp_blocks": 1},
        "frontend": "WavFrontend",
        "frontend_conf": FBANK_LFR,
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
    }
    answer_id = spm.SentencePieceProcessor(model_file=str(directory / "bpe.model")).piece_to_id(SENSEVOICE_ANSWER)

    def answer(model):
        model.ctc.ctc_lo.weight.zero_()
        model.ctc.ctc_lo.bias.zero_()
        model.ctc.ctc_lo.bias[answer_id] = 10.0

    return save_model(directory, config, tokenizer_file="bpe.model", doctor=answer if answer_every_frame else None)


def paraformer_dir(directory: Path) -> Path:
    """Paraformer whose CIF predictor fires about every other frame (its output bias raised) and
    whose decoder favours "你" (output bias), so every waveform gets a non-empty transcript."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokens.json").write_text(json.dumps(PARAFORMER_TOKENS, ensure_ascii=False), encoding="utf-8")
    config = {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": TINY_SANM,
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1, "dropout_rate": 0.0,
                         "positional_dropout_rate": 0.0, "self_attention_dropout_rate": 0.0,
                         "src_attention_dropout_rate": 0.0, "att_layer_num": 1, "kernel_size": 3, "sanm_shfit": 0},
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": 16, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": FBANK_LFR,
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    }

    def speak(model):
        model.predictor.cif_output.bias.fill_(1.0)
        model.decoder.output_layer.bias[PARAFORMER_TOKENS.index("你")] = 20.0

    return save_model(directory, config, tokenizer_file="tokens.json", doctor=speak)


def ct_punc_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokens.json").write_text(json.dumps(PARAFORMER_TOKENS, ensure_ascii=False), encoding="utf-8")
    config = {
        "model": "CTTransformer",
        "model_conf": {"ignore_id": 0, "embed_unit": 16, "att_unit": 16, "dropout_rate": 0.0,
                       "punc_list": ["<unk>", "_", "，", "。", "？", "、"], "punc_weight": [1.0] * 6, "sentence_end_id": 3},
        "encoder": "SANMEncoder",
        "encoder_conf": {**TINY_SANM, "input_size": 16, "padding_idx": 0},
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    }
    return save_model(directory, config, tokenizer_file="tokens.json")


def emotion2vec_dir(directory: Path) -> Path:
    """Emotion2vec with a tiny conv feature encoder, one transformer block and the nine-class head
    of emotion2vec+ (tokens.txt as the released models name their classes)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokens.txt").write_text("\n".join(EMOTION2VEC_LABELS) + "\n", encoding="utf-8")
    audio = {
        "type": "AUDIO", "prenet_depth": 1, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0,
        "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "num_extra_tokens": 2, "init_extra_token_zero": True,
        "mask_noise_std": 0.01, "mask_prob_min": None, "mask_prob": 0.5, "inverse_mask": False, "mask_prob_adjust": 0.05,
        "keep_masked_pct": 0.0, "mask_length": 5, "add_masks": False, "remove_masks": False, "mask_dropout": 0.0,
        "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_channel_length": 64, "ema_local_encoder": False,
        "local_grad_mult": 1.0, "use_alibi_encoder": True, "alibi_scale": 1.0, "learned_alibi": False,
        "alibi_max_pos": None, "learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": False, "num_alibi_heads": 2, "model_depth": 1, "decoder": None,
        "extractor_mode": "layer_norm", "feature_encoder_spec": "[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16, 2, 2)]",
        "conv_pos_width": 6, "conv_pos_groups": 2, "conv_pos_depth": 2, "conv_pos_pre_ln": False,
    }
    config = {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0, "loss_scale": None, "depth": 1, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
            "num_heads": 2, "norm_eps": 1e-5, "norm_affine": True, "encoder_dropout": 0.0, "post_mlp_drop": 0.0,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0, "embed_dim": 16,
            "mlp_ratio": 2.0, "layer_norm_first": False, "average_top_k_layers": 1, "end_of_block_targets": False,
            "clone_batch": 1, "normalize": True, "modalities": {"audio": audio},
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }
    return save_model(directory, config, tokenizer_file="tokens.txt")


def yaml_config(model_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))


def as_modelscope_cache(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay `model_dir` out as ModelScope's cache holds a downloaded model: <cache>/<org>/<name>/."""
    target = cache / repo_id
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())


def as_huggingface_cache(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay `model_dir` out as huggingface_hub's cache holds a downloaded snapshot of `main`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model, built once for the module."""
    root = tmp_path_factory.mktemp("funasr-models")
    return {
        "fsmn": fsmn_vad_dir(root / "fsmn-vad"),
        "sensevoice": sensevoice_dir(root / "sensevoice"),
        "sensevoice_answer": sensevoice_dir(root / "sensevoice-answer", answer_every_frame=True),
        "paraformer": paraformer_dir(root / "paraformer"),
        "punc": ct_punc_dir(root / "ct-punc"),
        "emotion2vec": emotion2vec_dir(root / "emotion2vec"),
    }


def waveforms(n: int = 3) -> list[np.ndarray]:
    """Short noise bursts of 1.5, 2 and 2.5 s (the values are random anyway)."""
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(SR * (1.5 + 0.5 * i)))).astype(np.float32) for i in range(n)]


def segment_records(n: int = 3, **extra) -> list[dict]:
    return [
        {"id": f"seg{i}", "source_uri": f"corpus/{i}.wav", "_waveform": w, "sampling_rate": SR,
         "segment_start": 0.0, "segment_end": len(w) / SR, "duration": len(w) / SR, **extra}
        for i, w in enumerate(waveforms(n))
    ]


# ---------------------------------------------------------------------------------------------
# SenseVoice's tags


@pytest.mark.parametrize(
    "tag, language, flag",
    [("zh", "zh", None), ("en", "en", None), ("yue", None, "language_unsupported:yue"),
     ("ja", None, "language_unsupported:ja"), ("ko", None, "language_unsupported:ko"),
     ("nospeech", None, "asr_no_speech")],
)
def test_sensevoice_language_tags(tag, language, flag):
    parsed = parse(f"<|{tag}|><|NEUTRAL|><|Speech|><|woitn|>text")
    assert parsed.language == language and parsed.language_tag == tag
    assert (flag in parsed.flags) if flag else not [f for f in parsed.flags if f.startswith("language")]


@pytest.mark.parametrize(
    "tag, emotion",
    [("HAPPY", "happy"), ("SAD", "sad"), ("ANGRY", "anger"), ("NEUTRAL", "neutral"), ("FEARFUL", "fear"),
     ("DISGUSTED", "disgust"), ("SURPRISED", "surprise"), ("EMO_UNKNOWN", None)],
)
def test_sensevoice_emotion_tags(tag, emotion):
    parsed = parse(f"<|en|><|{tag}|><|Speech|><|woitn|>text")
    assert parsed.emotion == emotion
    assert emotion is None or emotion in vocab.EMOTIONS
    assert ("emotion_unknown" in parsed.flags) == (emotion is None)


@pytest.mark.parametrize(
    "tag, events, flag",
    [("Speech", [], None), ("Laughter", ["laugh"], None), ("Cry", ["cry"], None), ("Cough", ["cough"], None),
     ("Sneeze", ["sneeze"], None), ("BGM", [], "sound_event:bgm"), ("Applause", [], "sound_event:applause"),
     ("Breath", [], "sound_event:breath"), ("Sing", [], "sound_event:sing"),
     ("Speech_Noise", [], "sound_event:speech_noise"), ("GBG", [], None), ("Event_UNK", [], None)],
)
def test_sensevoice_event_tags(tag, events, flag):
    parsed = parse(f"<|zh|><|HAPPY|><|{tag}|><|withitn|>今天天气很好。")
    assert list(parsed.events) == events and set(events) <= set(vocab.EVENTS)
    assert [f for f in parsed.flags if f.startswith("sound_event:")] == ([flag] if flag else [])
    assert parsed.text == "今天天气很好。" and parsed.itn is True


def test_sensevoice_output_with_every_tag_kind_maps_to_the_right_fields():
    output = (
        "<|en|><|SAD|><|Laughter|><|woitn|>I miss  you "
        "<|zh|><|HAPPY|><|Cough|><|withitn|>我也想你。"
        "<|yue|><|SAD|><|BGM|><|Cry|><|ja|><|ANGRY|><|Applause|><|Sneeze|><|ko|><|NEUTRAL|><|Breath|>"
        "<|nospeech|><|FEARFUL|><|Sing|><|DISGUSTED|><|Speech_Noise|><|SURPRISED|><|GBG|><|EMO_UNKNOWN|>"
        "<|Event_UNK|><|Speech|><|Laughter|><|NEW_TAG|>"
    )
    parsed = parse(output)
    assert parsed.text == "I miss you 我也想你。"
    assert parsed.language == "en" and parsed.language_tag == "en"  # the first language tag counts
    assert parsed.emotion == "sad"  # the most frequent (twice)
    assert parsed.emotion_tags == ("SAD", "HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN")
    assert parsed.events == ("laugh", "cough", "cry", "sneeze")  # each once, in order
    assert parsed.itn is False  # the first itn tag
    assert set(parsed.flags) == {
        "sound_event:bgm", "sound_event:applause", "sound_event:breath", "sound_event:sing",
        "sound_event:speech_noise", "sensevoice_tag:NEW_TAG",
    }


def test_sensevoice_output_without_tags_is_text_with_unknown_labels():
    parsed = parse("  just   words ")
    assert parsed.text == "just words"
    assert parsed.language is None and parsed.emotion is None and parsed.events is None and parsed.itn is None
    assert parsed.flags == ("emotion_unknown",)
    tie = parse("<|en|><|HAPPY|><|SAD|><|Speech|>")
    assert tie.emotion == "happy" and tie.text == "" and tie.events == ()


# ---------------------------------------------------------------------------------------------
# emotion2vec's classes, Paraformer's words


@pytest.mark.parametrize(
    "label, emotion",
    [("生气/angry", "anger"), ("厌恶/disgusted", "disgust"), ("恐惧/fearful", "fear"), ("开心/happy", "happy"),
     ("中立/neutral", "neutral"), ("其他/other", "other"), ("难过/sad", "sad"), ("吃惊/surprised", "surprise"),
     ("<unk>", None), ("unknown", None), ("angry", "anger"), ("Surprised", "surprise")],
)
def test_emotion2vec_classes_map_to_the_osum_set(label, emotion):
    assert osum_emotion(label) == emotion
    assert emotion is None or emotion in vocab.EMOTIONS


def test_every_emotion2vec_class_is_mapped():
    mapped = {c: osum_emotion(c) for c in emotion2vec.EMOTION2VEC_CLASSES}
    assert mapped.pop("unknown") is None
    assert set(mapped.values()) == set(vocab.EMOTIONS)  # the eight others cover the OSUM set exactly


def test_paraformer_words_pair_tokens_with_timestamps():
    assert words_of("你 好 hello", [[-30, 200], [200, 400], [400, 900]], 0.8) == [
        {"word": "你", "start": 0.0, "end": 0.2, "score": None},
        {"word": "好", "start": 0.2, "end": 0.4, "score": None},
        {"word": "hello", "start": 0.4, "end": 0.8, "score": None},  # inside the audio
    ]
    assert words_of("你 好", [[0, 200]], 1.0) is None and words_of("你", None, 1.0) is None
    assert tidy_text(" 你 好 ， hello  world 世 界") == "你好 ， hello world 世界"


# ---------------------------------------------------------------------------------------------
# the stages on the tiny models


def test_fsmn_vad_segments_a_batch_from_a_local_model(models):
    stage = FsmnVAD(model=str(models["fsmn"]), min_segment_s=0.2, max_segment_s=30.0, pad_s=0.1)
    files = [{"source_uri": f"corpus/{i}.wav", "_waveform": w, "sampling_rate": SR} for i, w in enumerate(waveforms())]
    outputs = run_stage(stage, *files)
    segments = [o for o in outputs if not isinstance(o, Reject)]
    rejects = [o for o in outputs if isinstance(o, Reject)]
    assert all(r.reason in ("no_speech", "segment_too_short") for r in rejects), rejects
    assert segments, "the random FSMN model finds speech in noise at 0.1 rms (it did when this test was written)"
    for seg in segments:
        wave = next(f["_waveform"] for f in files if f["source_uri"] == seg["source_uri"])
        assert 0.0 <= seg["segment_start"] < seg["segment_end"] <= len(wave) / SR + 1e-9
        assert seg["duration"] == pytest.approx(seg["segment_end"] - seg["segment_start"])
        assert seg["id"] == record_id(seg["source_uri"], seg["segment_start"], seg["segment_end"])
        i0 = round(seg["segment_start"] * SR)
        assert np.shares_memory(seg["_waveform"], wave) and np.array_equal(seg["_waveform"], wave[i0:i0 + len(seg["_waveform"])])
        assert all(0 <= a < b <= seg["duration"] + 1e-6 for a, b in seg["_speech_spans"])
    assert stage.describe() == f"fsmn-vad:{models['fsmn'].name}"
    # FSMN's own segment limit is the segment budget less the padding
    assert stage._loaded.automodel.model.vad_opts.max_single_segment_time == 29800


def test_fsmn_vad_loads_a_hub_id_from_a_modelscope_cache(models, tmp_path):
    as_modelscope_cache(models["fsmn"], tmp_path, "tiny-org/fsmn-vad-tiny")
    stage = FsmnVAD(model="tiny-org/fsmn-vad-tiny", hub="ms", cache_dir=str(tmp_path), local_files_only=True,
                    min_silence_s=0.5, min_segment_s=0.2)
    (record,) = segment_records(1)
    outputs = run_stage(stage, {k: v for k, v in record.items() if k in ("source_uri", "_waveform", "sampling_rate")})
    assert outputs and all(isinstance(o, Reject) or o["id"] for o in outputs)
    assert stage._loaded.directory == str(tmp_path / "tiny-org" / "fsmn-vad-tiny")
    assert stage.describe() == "fsmn-vad:tiny-org/fsmn-vad-tiny"
    missing = FsmnVAD(model="tiny-org/not-there", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(RuntimeError, match="tiny-org/not-there"):
        missing.setup()


def test_fsmn_vad_cuts_and_clears_a_split_manifest_transcript_as_silero_does(models):
    """The cutting is SileroVAD's, inherited: a transcribed file whose speech fits one segment stays
    whole; split, its pieces have the manifest transcript cleared (never filled), with the flag."""
    wave = waveforms(3)[2]  # 2.5 s
    record = {"source_uri": "corpus/x.wav", "_waveform": wave, "sampling_rate": SR,
              "transcript": "one transcript for the whole file", "transcript_origin": "manifest"}
    spans = lambda ws: [[(0.2, 0.8), (2.0, 2.4)] for _ in ws]  # noqa: E731 - FSMN's answer, fixed
    whole = FsmnVAD(model=str(models["fsmn"]), min_segment_s=0.2, merge_gap_s=0.8, pad_s=0.1)
    whole.speech_spans_batch = spans
    (kept,) = run_stage(whole, record)
    assert (kept["segment_start"], kept["segment_end"], kept["transcript"]) == (0.1, 2.5, record["transcript"])
    stage = FsmnVAD(model=str(models["fsmn"]), min_segment_s=0.2, merge_gap_s=0.8, pad_s=0.1, keep_transcribed_whole=False)
    stage.speech_spans_batch = spans
    outputs = run_stage(stage, record)
    assert [(o["segment_start"], o["segment_end"]) for o in outputs] == [(0.1, 0.9), (1.9, 2.5)]
    for seg in outputs:
        assert seg["transcript"] is None and seg["transcript_origin"] is None
        assert SPLIT_FLAG in seg["quality_flags"]
    stage.speech_spans_batch = lambda ws: [[] for _ in ws]
    (reject,) = run_stage(stage, record)
    assert reject.reason == "no_speech" and "FSMN" in reject.detail


def test_sensevoice_labels_a_batch_from_a_local_model(models):
    stage = SenseVoiceASR(model=str(models["sensevoice"]))
    outputs = run_stage(stage, *segment_records())
    assert len(outputs) == 3 and not [o for o in outputs if isinstance(o, Reject)], outputs
    described = f"sensevoice:{models['sensevoice'].name}"
    for out in outputs:
        assert out.get("language") is None or out["language"] in vocab.LANGUAGES
        assert out.get("emotion") is None or out["emotion"] in vocab.EMOTIONS
        assert out.get("events") is None or set(out["events"]) <= set(vocab.EVENTS)
        for value, provenance in (("transcript", "transcript_origin"), ("language", "language_origin"),
                                  ("emotion", "emotion_model"), ("events", "events_model")):
            assert out.get(provenance) == (described if out.get(value) is not None else None)
        assert out.get("transcript") is not None or "asr_empty" in out["quality_flags"]


def test_sensevoice_answer_fills_transcript_language_emotion_and_events(models):
    """A model that answers SENSEVOICE_ANSWER for any audio: every group it speaks of is filled,
    with SenseVoice's fixed scores and its provenance."""
    stage = SenseVoiceASR(model=str(models["sensevoice_answer"]), use_itn=False)
    outputs = run_stage(stage, *segment_records())
    described = f"sensevoice:{models['sensevoice_answer'].name}"
    assert len(outputs) == 3
    for out in outputs:
        assert (out["transcript"], out["transcript_confidence"], out["transcript_origin"]) == ("hello", 0.8, described)
        assert (out["language"], out["language_origin"]) == ("en", described)
        assert (out["emotion"], out["emotion_score"], out["emotion_model"]) == ("happy", 0.7, described)
        assert (out["events"], out["events_score"], out["events_model"]) == (["laugh"], 0.7, described)
        assert not out.get("quality_flags")


def test_sensevoice_keeps_what_the_manifest_gave_and_fills_the_rest(models):
    stage = SenseVoiceASR(model=str(models["sensevoice_answer"]))
    given = segment_records(2, transcript="the manifest's words", language="zh", transcript_confidence=1.0)
    outputs = run_stage(stage, *given)
    for out in outputs:
        assert (out["transcript"], out["language"]) == ("the manifest's words", "zh")  # manifest > model
        assert out.get("transcript_origin") is None and out.get("language_origin") is None
        assert out["emotion"] == "happy" and out["events"] == ["laugh"]
    held = segment_records(1, transcript="t", language="en", emotion="sad", events=[])
    assert run_stage(stage, *held)[0] is held[0]  # every group held by the manifest: skipped


def test_sensevoice_loads_a_hub_id_from_a_huggingface_cache(models, tmp_path):
    as_huggingface_cache(models["sensevoice_answer"], tmp_path, "tiny-org/SenseVoiceTiny")
    stage = SenseVoiceASR(model="tiny-org/SenseVoiceTiny", hub="hf", cache_dir=str(tmp_path), local_files_only=True)
    (out,) = run_stage(stage, *segment_records(1))
    assert out["transcript"] == "hello" and out["transcript_origin"] == "sensevoice:tiny-org/SenseVoiceTiny"
    assert SenseVoiceASR(hub="hf").describe() == "sensevoice:FunAudioLLM/SenseVoiceSmall"
    assert SenseVoiceASR().describe() == "sensevoice:iic/SenseVoiceSmall"
    assert SenseVoiceASR(revision="v2.0.4").describe() == "sensevoice:iic/SenseVoiceSmall@v2.0.4"


def test_paraformer_transcribes_a_batch_with_word_timestamps(models):
    stage = ParaformerASR(model=str(models["paraformer"]))
    records = segment_records()
    outputs = run_stage(stage, *records)
    assert len(outputs) == 3 and not [o for o in outputs if isinstance(o, Reject)], outputs
    for out, record in zip(outputs, records):
        assert out["transcript"] and set(out["transcript"]) == {"你"}  # the tiny model's favourite token, de-spaced
        assert out["transcript_confidence"] == 0.8 and out["transcript_origin"] == f"paraformer:{models['paraformer'].name}"
        words = out["words"]
        assert len(words) == len(out["transcript"])
        assert all(w["word"] == "你" and 0 <= w["start"] <= w["end"] <= record["duration"] for w in words)
        assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def test_paraformer_flags_timestamps_that_do_not_pair_with_the_tokens():
    (record,) = segment_records(1)
    out = ParaformerASR().label(record, {"text": "你 好", "timestamp": [[0, 100]]})
    assert out["transcript"] == "你好" and out.get("words") is None and out["quality_flags"] == ["words_unaligned"]


def test_paraformer_with_a_punctuation_model(models):
    stage = ParaformerASR(model=str(models["paraformer"]), punc_model=str(models["punc"]))
    outputs = run_stage(stage, *segment_records())
    assert stage.describe() == f"paraformer:{models['paraformer'].name}+{models['punc'].name}"
    for out in outputs:
        assert out["transcript_origin"] == stage.describe()
        assert out["transcript"].replace("你", "").strip("，。？、 ") == ""  # the words, punctuated or not
        assert out["words"] and all(w["word"] == "你" for w in out["words"])  # from the text before punctuation


def test_paraformer_passes_on_records_in_other_languages(models):
    stage = ParaformerASR(model=str(models["paraformer"]), languages=["zh"], timestamps=False)
    english, unknown = segment_records(2)
    english["language"] = "en"
    out_en, out_unknown = run_stage(stage, english, unknown)
    assert out_en.get("transcript") is None and "no_asr_for_language:en" in out_en["quality_flags"]
    assert out_unknown["transcript"] and out_unknown.get("words") is None  # no timestamps asked


def test_emotion2vec_labels_a_batch_with_the_class_probability(models):
    stage = Emotion2vecEmotion(model=str(models["emotion2vec"]))
    records = segment_records()
    outputs = run_stage(stage, *records)
    direct = stage._model.automodel.generate(input=[r["_waveform"] for r in records], granularity="utterance",
                                             extract_embedding=False)
    assert len(outputs) == 3
    for out, raw in zip(outputs, direct):
        best = int(np.argmax(raw["scores"]))
        expected = osum_emotion(raw["labels"][best])
        assert out.get("emotion") == expected
        if expected is None:
            assert "emotion_unknown" in out["quality_flags"]
        else:
            assert out["emotion"] in vocab.EMOTIONS
            assert out["emotion_score"] == pytest.approx(raw["scores"][best])
            assert out["emotion_model"] == f"emotion2vec:{models['emotion2vec'].name}"


def test_emotion2vec_loads_a_hub_id_from_a_huggingface_cache_once_per_process(models, tmp_path):
    as_huggingface_cache(models["emotion2vec"], tmp_path, "tiny-org/emotion2vec-tiny")
    options = dict(model="tiny-org/emotion2vec-tiny", hub="hf", cache_dir=str(tmp_path), local_files_only=True)
    first, second = Emotion2vecEmotion(**options), Emotion2vecEmotion(**options)
    first.setup()
    second.setup()
    assert first._model is second._model  # one loaded copy per process
    (out,) = run_stage(first, *segment_records(1))
    assert out.get("emotion_model") in (None, "emotion2vec:tiny-org/emotion2vec-tiny")


def test_emotion2vec_without_a_classifier_is_refused(tmp_path):
    """The plain emotion2vec (no tokens.txt, so no class head) extracts features only."""
    config = {"model": "Emotion2vec", "model_conf": yaml_config(emotion2vec_dir(tmp_path / "plus"))["model_conf"]}
    (tmp_path / "plain").mkdir()
    save_model(tmp_path / "plain", config)
    stage = Emotion2vecEmotion(model=str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no emotion classes"):
        stage.setup()


def test_a_bad_record_fails_alone(models):
    stage = SenseVoiceASR(model=str(models["sensevoice_answer"]))
    good, bad, stereo = segment_records(3)
    bad["sampling_rate"] = 8000
    stereo["_waveform"] = np.zeros((2, SR), dtype=np.float32)
    out_good, reject_bad, reject_stereo = run_stage(stage, good, bad, stereo)
    assert out_good["transcript"] == "hello"
    assert reject_bad.reason == "stage_error" and "16000 Hz" in reject_bad.detail
    assert reject_stereo.reason == "stage_error" and "mono" in reject_stereo.detail


def test_generate_each_falls_back_to_one_waveform_at_a_time():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if any(w.size == 2 for w in batch):
            raise RuntimeError("bad waveform")
        return [{"text": str(w.size)} for w in batch][:1] if len(batch) == 3 else [{"text": str(w.size)} for w in batch]

    ones, twos, threes = np.zeros(1), np.zeros(2), np.zeros(3)
    results = funasr_models.generate_each(run, [ones, threes])
    assert results == [{"text": "1"}, {"text": "3"}] and calls == [2]
    results = funasr_models.generate_each(run, [ones, twos, threes])
    assert results[0] == {"text": "1"} and isinstance(results[1], RuntimeError) and results[2] == {"text": "3"}


# ---------------------------------------------------------------------------------------------
# configuration, registration, imports


def test_backends_are_one_profile_line_each():
    from echat.pipelines.backends import stage_class

    assert stage_class("vad", "fsmn-vad") is FsmnVAD
    assert stage_class("asr", "sensevoice") is SenseVoiceASR
    assert stage_class("asr", "paraformer") is ParaformerASR
    assert stage_class("emotion", "emotion2vec") is Emotion2vecEmotion


def test_local_profile_takes_the_funasr_backends(local_profile):
    # silero's own params (threshold...) are not FSMN's: the entry's params are replaced, not merged
    profile = local_profile("vad.backend=fsmn-vad", "vad.params={}", "vad.params.min_silence_s=0.5",
                            "asr.backend=sensevoice", "asr.params={}", "asr.params.device=cpu", "emotion.backend=emotion2vec",
                            "emotion.params.hub=hf")
    backends = {e.slot: e.backend for e in profile.enabled_stages()}
    assert (backends["vad"], backends["asr"], backends["emotion"]) == ("fsmn-vad", "sensevoice", "emotion2vec")
    paraformer_profile = local_profile("asr.backend=paraformer", "asr.params={}", "asr.params.punc_model=ct-punc")
    assert {e.slot: e.params for e in paraformer_profile.enabled_stages()}["asr"] == {"punc_model": "ct-punc"}


@pytest.mark.parametrize(
    "make, message",
    [(lambda: SenseVoiceASR(hub="github"), "hub must be one of"),
     (lambda: SenseVoiceASR(language="fr"), "language must be one of"),
     (lambda: ParaformerASR(languages=["klingon"]), "language 'klingon'"),
     (lambda: ParaformerASR(punc_model=""), "punc_model"),
     (lambda: Emotion2vecEmotion(model=""), "model must be"),
     (lambda: FsmnVAD(min_silence_s=-1), "min_silence_s"),
     (lambda: FsmnVAD(device="tpu"), "device must be"),
     (lambda: Emotion2vecEmotion(ncpu=0), "ncpu"),
     (lambda: FsmnVAD(max_segment_s=0.6), "max_segment_s")],
)
def test_bad_settings_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_stage_modules_do_not_import_funasr():
    code = (
        "import sys\n"
        "from echat.labelers import funasr_vad, sensevoice, paraformer, emotion2vec\n"
        "stages = [funasr_vad.FsmnVAD(), sensevoice.SenseVoiceASR(), paraformer.ParaformerASR(punc_model='ct-punc'),\n"
        "          emotion2vec.Emotion2vecEmotion()]\n"
        "print([s.describe() for s in stages])\n"
        "heavy = [m for m in ('funasr', 'modelscope', 'torch', 'torchaudio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert "paraformer:paraformer-zh+ct-punc" in done.stdout
