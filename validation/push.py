"""`echat push OUT --repo-id ORG/NAME`: publish a build on the Hugging Face Hub as a dataset repo.

Uploads the card (README.md), the shards (data/*.parquet) and the quality report (report/) with
huggingface_hub's `upload_folder`, which (with hf_xet, a dependency of huggingface_hub) streams the
files, commits a large folder in several commits and resumes an interrupted upload when run again:
files already committed are skipped. The card and the report are written first when the build has
none. Nothing else leaves the machine: summary.json, rejects/ and _work/ name local paths.

The token comes from the environment only (HF_TOKEN, or the variable `--token-env` names); it is
never printed. `--dry-run` lists what would go where and what the repo already holds (same bytes,
changed, new), without writing anything. `--endpoint` (default: $HF_ENDPOINT, else the Hub) points
the client at another server (a local stand-in in the tests).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import corpus

PATTERNS = ["README.md", f"{corpus.DATA_DIR}/*.parquet", "report/*", "report/**/*"]
NEW, SAME, CHANGED = "new", "unchanged", "changed"


class PushError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlannedFile:
    path: str  # in the repo, relative to OUT
    size: int
    state: str  # NEW, SAME or CHANGED


def local_files(out: Path) -> list[Path]:
    """The files of OUT that are published, in path order."""
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in PATTERNS):
            files.append(path)
    return files


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub reports as a regular file's oid)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remote_files(api, repo_id: str, revision: str | None) -> dict[str, object] | None:
    """path -> RepoFile of what the repo holds; None when the repo does not exist (or is not visible)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True, revision=revision)
                if isinstance(f, RepoFile)}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None


def _state(path: Path, remote) -> str:
    if remote is None:
        return NEW
    if remote.size != path.stat().st_size:
        return CHANGED
    if remote.lfs is not None:
        return SAME if remote.lfs.sha256 == sha256(path) else CHANGED
    return SAME if remote.blob_id == git_blob_sha1(path) else CHANGED


def plan(api, out: Path, repo_id: str, revision: str | None) -> tuple[list[PlannedFile], bool]:
    """(the files to publish with their state against the repo, whether the repo exists)."""
    remote = remote_files(api, repo_id, revision)
    files = [PlannedFile(p.relative_to(out).as_posix(), p.stat().st_size,
                         _state(p, (remote or {}).get(p.relative_to(out).as_posix()))) for p in local_files(out)]
    return files, remote is not None


def _ensure_card_and_report(out: Path, say) -> None:
    if not (out / "README.md").exists():
        from .card import write_card

        say(f"echat push: no dataset card yet; writing {write_card(out).name}")
    if not (out / "report" / "index.html").exists():
        from .report import write_report

        say(f"echat push: no quality report yet; writing report/{write_report(out).name}")


def push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
         endpoint: str | None = None, token: str | None = None, revision: str | None = None,
         message: str | None = None, say=print) -> list[PlannedFile]:
    """Publish OUT to the dataset repo `repo_id` (or, with `dry_run`, only say what would happen).

    Returns the plan (every file, with its state before the push).
    """
    from huggingface_hub import HfApi

    out = Path(out_dir)
    corpus.shard_files(out)  # a build, or CorpusError
    if not dry_run:
        _ensure_card_and_report(out, say)
        if not token:
            raise PushError("no Hub token: set HF_TOKEN (or the variable --token-env names) to a token with write access")
    api = HfApi(endpoint=endpoint, token=token or False)
    files, exists = plan(api, out, repo_id, revision)
    base = f"{api.endpoint.rstrip('/')}/datasets/{repo_id}"
    if dry_run:
        say(f"echat push --dry-run: {len(files)} file(s) from {out.name}/ to {base} "
            f"({'the repo exists' if exists else 'the repo does not exist yet: it would be created'}"
            f"{', private' if private and not exists else ''})")
        say(f"  {'state':<10} {'bytes':>12}  path in the repo (under {base}/blob/{revision or 'main'}/)")
        for f in files:
            say(f"  {f.state:<10} {f.size:>12,}  {f.path}")
        counts = {state: sum(1 for f in files if f.state == state) for state in (NEW, CHANGED, SAME)}
        say("  " + ", ".join(f"{n} {state}" for state, n in counts.items()))
        missing = [name for name in ("README.md", "report/index.html") if not (out / name).exists()]
        if missing:
            say(f"  (not written yet, made before a real push: {', '.join(missing)})")
        return files
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    todo = [f for f in files if f.state != SAME]
    say(f"echat push: {len(todo)} of {len(files)} file(s) to upload to {base} ({len(files) - len(todo)} already there)")
    if todo:
        api.upload_folder(
            repo_id=repo_id, repo_type="dataset", folder_path=str(out), allow_patterns=PATTERNS, revision=revision,
            commit_message=message or "Upload corpus with echat push",
        )
    say(f"echat push: done: {base}")
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="a build folder (the --output of `echat build`)")
    parser.add_argument("--repo-id", required=True, help="the dataset repo, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private (when it does not exist)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded where, and what is already there")
    parser.add_argument("--endpoint", default=None, help="the Hub's URL (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--token-env", default="HF_TOKEN", help="the environment variable holding the token (default HF_TOKEN)")
    parser.add_argument("--revision", default=None, help="the branch to commit to (default main)")
    parser.add_argument("--message", default=None, help="the commit message")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get(args.token_env) or None
    try:
        push(args.out, args.repo_id, private=args.private, dry_run=args.dry_run, endpoint=endpoint, token=token,
             revision=args.revision, message=args.message)
    except (corpus.CorpusError, PushError) as exc:
        print(f"echat push: {exc}", file=sys.stderr)
        return 2
    except HfHubHTTPError as exc:
        print(f"echat push: the Hub refused: {exc}", file=sys.stderr)
        return 1
    return 0
