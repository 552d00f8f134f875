"""The content-addressed cache: stable keys, layout, atomic writes shared by several processes."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from echat.synth.cache import ContentCache, cache_key


def test_key_is_stable_and_sensitive_to_every_part():
    a = cache_key(backend="espeak-ng 1.51", text="hello", params={"speed": 150, "pitch": 40})
    assert a == cache_key(params={"pitch": 40, "speed": 150}, text="hello", backend="espeak-ng 1.51")
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != cache_key(backend="espeak-ng 1.51", text="hello", params={"speed": 151, "pitch": 40})
    assert a != cache_key(backend="espeak-ng 1.52", text="hello", params={"speed": 150, "pitch": 40})
    assert a != cache_key(backend="espeak-ng 1.51", text="hello!", params={"speed": 150, "pitch": 40})


def test_layout_and_round_trips(tmp_path):
    cache = ContentCache(tmp_path, "tts-test")
    key = cache_key(text="x")
    assert cache.get_array(key) is None and cache.get_json(key) is None
    wave = np.linspace(-1, 1, 1000, dtype=np.float32)
    path = cache.put_array(key, wave)
    assert path == tmp_path / "tts-test" / key[:2] / f"{key}.npy"
    got = cache.get_array(key)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, wave)
    cache.put_json(key, {"reply": "你好", "n": 3})
    assert cache.get_json(key) == {"reply": "你好", "n": 3}
    assert not list(path.parent.glob("*.tmp"))  # no temporary files left behind


def test_damaged_entries_read_as_misses(tmp_path):
    cache = ContentCache(tmp_path, "t")
    key = cache_key(text="y")
    cache.put_bytes(key, "npy", b"not an array")
    cache.put_bytes(key, "json", b"{not json")
    assert cache.get_array(key) is None and cache.get_json(key) is None


def test_bad_namespace_or_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        ContentCache(tmp_path, "../escape")
    with pytest.raises(ValueError, match="hex digest"):
        ContentCache(tmp_path, "t").path("../../etc", "json")


def _writer(root: str, worker: int, rounds: int) -> None:
    cache = ContentCache(root, "race")
    key = cache_key(text="shared")
    for i in range(rounds):
        # each writer writes a different, self-describing array under the same key
        cache.put_array(key, np.full(50_000, worker * 1000 + i, dtype=np.float32))


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 30)) for w in range(3)]
    for p in procs:
        p.start()
    reader = ContentCache(tmp_path, "race")
    key = cache_key(text="shared")
    while any(p.is_alive() for p in procs):
        value = reader.get_array(key)
        if value is not None:
            assert value.shape == (50_000,) and np.all(value == value[0])  # one whole write, never a mix
    for p in procs:
        p.join()
        assert p.exitcode == 0
    final = reader.get_array(key)
    assert final is not None and np.all(final == final[0])
    assert not list((tmp_path / "race").rglob("*.tmp"))
