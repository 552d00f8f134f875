"""OSUM-format test data for tests/test_osum_format.py and tests/test_source_osum.py: raw-list
entries and the WeNet tar shards OSUM's `do_make_shard_from_raw.py` makes of them (its member
order: .txt, .wav, .txt_N/.wav_N, .task .lang .speaker .emotion .gender, .duration, .extra without
`duration`; `none` for an unknown value). Imported as a module; not a test file itself.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

OSUM_MIRROR = Path("/work/.mirror/ASLP-lab+OSUM/repo")
FAKE_DATA = "OSUM-EChat/common_utils/fake_data"


def tone(seconds: float, freq: float) -> np.ndarray:
    """A 16 kHz tone, distinct per frequency, so each utterance's audio can be told apart."""
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, wave: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, 16000, subtype="PCM_16", format="WAV")
    return path


def entries(folder: Path) -> list[dict]:
    """Raw-list entries covering OSUM's task names, a leading reply tag, history and unknown values;
    their audio is written under folder/wav/."""
    wav = lambda name, freq: str(write_wav(folder / "wav" / f"{name}.wav", tone(0.5, freq)).relative_to(folder))  # noqa: E731
    return [
        {"key": "s2s_think", "txt": "<安慰鼓励>Take it easy,\nrest a little.", "wav": wav("a", 220),
         "task": "<S2TCHAT> <TEXT2TOKEN> <THINK>", "lang": "en", "speaker": "spk1", "gender": "<FEMALE>",
         "extra": {"dataset": "demo", "age": "<ADULT>", "gender": "<FEMALE>", "think_str": "She sounds tired.",
                   "question": "I feel so tired", "speech_token": [5, 6, 7], "duration": 0.5}},
        {"key": "legacy_s2s", "txt": "<SAD>I am sorry to hear that.", "wav": wav("b", 330),
         "task": "<Speech2TEXTandTOKEN>", "lang": "en",
         "extra": {"question": "my cat is ill", "speech_token": [1, 2], "age": "<OLD>", "q_emotion": "<SAD>"}},
        {"key": "tts", "txt": "Hello there.", "wav": wav("c", 440), "task": "TEXT2TOKEN",
         "extra": {"speech_token": [9, 9, 9]}},
        {"key": "multi", "txt": "<开心>Glad it helped.", "wav": wav("d", 550), "task": "<S2TCHAT> <TEXT2TOKEN>", "lang": "en",
         "txt_1": "Have you tried a walk?", "wav_1": wav("d1", 660),
         "extra": {"question": "thanks, it worked", "speech_token": [3, 4]}},
        {"key": "asr", "txt": "good morning<HAPPY>", "wav": wav("e", 770), "task": "<TRANSCRIBE> <EMOTION>",
         "extra": {"dataset": "demo", "gender": "none"}},
        {"key": "thinker", "txt": "<中立>Let us see.", "wav": wav("f", 880), "task": "<S2TCHAT> <THINKER>",
         "extra": {"question": "what now", "think_str": "A calm voice.", "caption": "<COUGH>"}},
    ]


def write_raw_list(folder: Path, items: list[dict], name: str = "data.list") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    return path


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(items: list[dict], folder: Path, *, drop_wav: set[str] = frozenset(),
                extra_text: dict[str, bytes] | None = None) -> bytes:
    """A WeNet tar of `items` (raw-list entries, audio paths relative to `folder`) in the member
    layout of OSUM's raw-to-shard script; keys in `drop_wav` get no audio member, keys in
    `extra_text` that `.extra` content as it is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in items:
            key = item["key"]
            _member(tar, f"{key}.txt", item.get("txt", "none").encode("utf-8"))
            if key not in drop_wav:
                _member(tar, f"{key}.wav", (folder / item["wav"]).read_bytes())
            for name, value in item.items():
                if name.startswith("txt_"):
                    _member(tar, f"{key}.{name}", value.encode("utf-8"))
                elif name.startswith("wav_"):
                    _member(tar, f"{key}.{name}", (folder / value).read_bytes())
            for name in ("task", "lang", "speaker", "emotion", "gender"):
                _member(tar, f"{key}.{name}", str(item.get(name, "none")).encode("utf-8"))
            extra = item.get("extra", {})
            _member(tar, f"{key}.duration", str(extra.get("duration", 0)).encode("utf-8"))
            rest = {k: v for k, v in extra.items() if k != "duration"}
            text = (extra_text or {}).get(key, json.dumps(rest, ensure_ascii=False).encode("utf-8"))
            _member(tar, f"{key}.extra", text)
    return buf.getvalue()


def real_fake_data(path: str) -> bytes | None:
    """A file of OSUM-EChat's own fake_data from the mirror, or None when the mirror is absent."""
    if not OSUM_MIRROR.exists():
        return None
    done = subprocess.run(["git", "-C", str(OSUM_MIRROR), "show", f"HEAD:{FAKE_DATA}/{path}"], capture_output=True)
    return done.stdout if done.returncode == 0 else None
