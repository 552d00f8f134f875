"""A content-addressed cache for slow or paid calls (TTS, LLM replies).

The key is the sha256 of a canonical JSON of everything that decides the output (backend and
model, input text, parameters), so a rerun after a crash pays nothing twice and a change of any
parameter misses the cache instead of returning a stale answer. Values are files under
`<root>/<namespace>/<key[:2]>/<key>.<suffix>`. Writes go to a temporary file in the same folder
and are renamed into place (`os.replace` is atomic on POSIX), so several processes can share a
cache: a reader sees either nothing or a whole file, and two writers of the same key write the
same content.

The root may be any Beam filesystem path (`gs://bucket/cache`, `s3://...`): such a root goes
through `apache_beam.io.filesystems.FileSystems`, so workers on Dataflow share one cache. There a
value is written to a temporary object next to its target and renamed into place; an object store
makes an object visible only once it is whole, so a reader there too sees nothing or all of it.
Local paths (and `file://`) keep the plain, faster os calls.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.cache/echat-forge"


def is_remote(root: str) -> bool:
    """Whether `root` is a URL for a Beam filesystem (gs://, s3://...) rather than a local path."""
    return "://" in root and not root.startswith("file://")


def cache_key(**parts: Any) -> str:
    """sha256 hex digest of the canonical JSON of `parts` (sorted keys, no whitespace)."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ContentCache:
    """Files keyed by content hash under `<root>/<namespace>/`.

    `namespace` separates kinds of value (`tts-espeak`, `llm-openai`...), so one cache root
    serves every backend.
    """

    def __init__(self, root: str | os.PathLike[str] | None, namespace: str):
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"cache namespace must be a plain folder name, got {namespace!r}")
        root = str(root or DEFAULT_ROOT)
        self.remote = is_remote(root)
        if self.remote:
            self.dir: Path | str = f"{root.rstrip('/')}/{namespace}"
        else:
            root = root[len("file://"):] if root.startswith("file://") else root
            self.dir = Path(os.path.expanduser(root)) / namespace

    def path(self, key: str, suffix: str) -> Path | str:
        """Where the value of `key` lives: a Path, or for a remote root a URL string."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a lowercase hex digest, got {key!r}")
        if self.remote:
            return f"{self.dir}/{key[:2]}/{key}.{suffix}"
        return self.dir / key[:2] / f"{key}.{suffix}"

    # bytes: the primitive every other kind goes through

    def get_bytes(self, key: str, suffix: str) -> bytes | None:
        if self.remote:
            return self._get_remote(str(self.path(key, suffix)))
        try:
            return self.path(key, suffix).read_bytes()
        except FileNotFoundError:
            return None

    def put_bytes(self, key: str, suffix: str, data: bytes) -> Path | str:
        if self.remote:
            return self._put_remote(str(self.path(key, suffix)), key, data)
        target = self.path(key, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in the target's folder so the rename never crosses filesystems.
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target

    # any Beam filesystem

    @staticmethod
    def _get_remote(path: str) -> bytes | None:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        try:
            if not FileSystems.exists(path):
                return None
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                return handle.read()
        except FileNotFoundError:
            return None  # deleted between the two calls

    @staticmethod
    def _put_remote(target: str, key: str, data: bytes) -> str:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        folder = target.rsplit("/", 1)[0]
        tmp = f"{folder}/.{key[:16]}.{uuid.uuid4().hex}.tmp"
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        try:
            FileSystems.rename([tmp], [target])
        except BaseException:
            # A filesystem that will not rename onto an existing object (HDFS): another writer of
            # the same key got there first with the same content, which is as good as ours.
            raced = isinstance(sys.exc_info()[1], Exception) and FileSystems.exists(target)
            try:
                FileSystems.delete([tmp])
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not remove the temporary cache object %s", tmp)
            if not raced:
                raise
        return target

    # typed helpers

    def get_json(self, key: str) -> Any | None:
        data = self.get_bytes(key, "json")
        if data is None:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # A damaged entry (edited by hand, disk trouble) is a miss, not a crash; it is rewritten.
            log.warning("ignoring unreadable cache entry %s: %s", self.path(key, "json"), exc)
            return None

    def put_json(self, key: str, value: Any) -> Path | str:
        return self.put_bytes(key, "json", json.dumps(value, ensure_ascii=False).encode("utf-8"))

    def get_array(self, key: str) -> np.ndarray | None:
        data = self.get_bytes(key, "npy")
        if data is None:
            return None
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            log.warning("ignoring unreadable cache entry %s: %s", self.path(key, "npy"), exc)
            return None

    def put_array(self, key: str, array: np.ndarray) -> Path | str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return self.put_bytes(key, "npy", buffer.getvalue())
