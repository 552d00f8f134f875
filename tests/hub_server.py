"""A local stand-in for the Hugging Face Hub's upload endpoints, for tests of `echat push`.

It speaks what the real `huggingface_hub` client calls to create a dataset repo and upload a folder
(ENVIRONMENT.md, "Local stand-ins"): POST /api/repos/create, POST /api/validate-yaml,
POST /api/datasets/ORG/NAME/preupload/REV (every file answered `uploadMode: regular`, so contents
travel base64 in the commit and no Xet or LFS storage is involved), POST .../commit/REV (NDJSON), and
GET .../tree/REV for listing what a repo holds (`--dry-run`). Files are kept in memory.

It also speaks the read side that huggingface_hub's `HfFileSystem` (`hf://datasets/ORG/NAME`) uses:
GET /api/datasets/ORG/NAME/revision/REV (does the repo exist), GET .../tree/REV/PATH (the listing,
with folder entries and a 404 EntryNotFound for a path that holds nothing, as the Hub answers),
POST .../paths-info/REV, and GET or HEAD /datasets/ORG/NAME/resolve/REV/PATH with `Range` requests
answered 206. `add_dataset` fills a repo without an upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of `prefix`: its files and folders (all below it when `recursive`)."""
    entries, folders = [], set()
    for p, data in sorted(files.items()):
        if prefix and not p.startswith(prefix + "/"):
            continue
        rest = p[len(prefix) + 1:] if prefix else p
        parts = rest.split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
        if not recursive and len(parts) > 1:
            continue
        entries.append({"type": "file", "path": p, "size": len(data), "oid": blob_oid(data)})
    entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
    return entries


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a `Range: bytes=a-b` header (`a-` and `-n` too); None without one."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # "ORG/NAME" -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.validated_yaml: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add_dataset(self, repo: str, files: dict[str, bytes], private: bool = False) -> None:
        """Make (or extend) dataset repo `repo` ("ORG/NAME") holding `files` (path in repo -> bytes)."""
        entry = self.repos.setdefault(repo, {"private": private, "files": {}, "type": "dataset"})
        entry["files"].update(files)


    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _not_found(self):
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def _resolve(self, repo: str, path: str, head: bool):
                """A file's bytes, or the `Range` of them asked for (206), as the Hub's resolve URL serves them."""
                if repo not in hub.repos:
                    return self._not_found()
                data = hub.repos[repo]["files"].get(path)
                if data is None:
                    return self._send(404, {"error": f"{path} not found"}, {"X-Error-Code": "EntryNotFound"})
                span = byte_range(self.headers.get("Range"), len(data))
                start, end = span or (0, len(data))
                if span and start >= len(data):
                    return self._send(416, {"error": "range not satisfiable"}, {"Content-Range": f"bytes */{len(data)}"})
                part = data[start:end]
                self.send_response(206 if span else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{blob_oid(data)}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                if span:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if not head:
                    self.wfile.write(part)

            def do_HEAD(self):
                parsed = urlparse(self.path)
                hub.requests.append(("HEAD", parsed.path))
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", parsed.path)
                if m:
                    return self._resolve(m.group(1), unquote(m.group(3)), head=True)
                return self._send(404, {"error": f"unknown endpoint {parsed.path}"})

            def do_POST(self):
                path = urlparse(self.path).path
                hub.requests.append(("POST", path))
                body = self._body()
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    hub.repos.setdefault(repo, {"private": private, "files": {}, "type": req.get("type")})
                    return self._send(200, {"url": f"{hub.url}/datasets/{repo}"})
                if path == "/api/validate-yaml":
                    hub.validated_yaml.append(json.loads(body).get("content", ""))
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
                if m:  # what HfFileSystem.info asks when its listing cache cannot answer
                    if m.group(1) not in hub.repos:
                        return self._not_found()
                    files = hub.repos[m.group(1)]["files"]
                    asked = parse_qs(body.decode()).get("paths", [])
                    answer = []
                    for p in asked:
                        p = p.strip("/")
                        if p in files:
                            answer.append({"type": "file", "path": p, "size": len(files[p]), "oid": blob_oid(files[p])})
                        elif any(f.startswith(p + "/") for f in files):
                            answer.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
                    return self._send(200, answer)
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
                if not m:
                    return self._send(404, {"error": f"unknown endpoint {path}"})
                repo, action = m.group(1), m.group(2)
                if repo not in hub.repos:
                    return self._not_found()
                files = hub.repos[repo]["files"]
                if action == "preupload":
                    req = json.loads(body)
                    answer = []
                    for f in req.get("files", []):
                        item = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        if f["path"] in files:
                            item["oid"] = blob_oid(files[f["path"]])
                        answer.append(item)
                    return self._send(200, {"files": answer, "commitOid": "0" * 40})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next((x["value"] for x in lines if x["key"] == "header"), {})
                changed = []
                for item in lines:
                    if item["key"] == "file":
                        value = item["value"]
                        data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                        files[value["path"]] = data
                        changed.append(value["path"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        files.pop(item["value"]["path"], None)
                    elif item["key"] == "lfsFile":
                        return self._send(400, {"error": "this stand-in answers uploadMode regular only"})
                oid = hashlib.sha1(json.dumps(changed).encode()).hexdigest()
                hub.commits.append({"repo": repo, "summary": header.get("summary"), "files": changed})
                return self._send(200, {"commitUrl": f"{hub.url}/datasets/{repo}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})

            def do_GET(self):
                parsed = urlparse(self.path)
                hub.requests.append(("GET", parsed.path))
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", parsed.path)
                if m:
                    repo = m.group(1)
                    if repo not in hub.repos:
                        return self._not_found()
                    prefix = unquote(m.group(3) or "").strip("/")  # the client sends the path %-encoded
                    recursive = parse_qs(parsed.query).get("recursive", ["false"])[0].lower() == "true"
                    entries = tree_entries(hub.repos[repo]["files"], prefix, recursive)
                    if prefix and not entries:
                        return self._send(404, {"error": f"{prefix} does not exist"}, {"X-Error-Code": "EntryNotFound"})
                    return self._send(200, entries)
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", parsed.path)
                if m:
                    return self._resolve(m.group(1), unquote(m.group(3)), head=False)
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/.+)?", parsed.path)
                if m:
                    repo = m.group(1)
                    if repo not in hub.repos:
                        return self._not_found()
                    return self._send(200, {"id": repo, "sha": "0" * 40, "private": hub.repos[repo]["private"],
                                            "siblings": [{"rfilename": p} for p in hub.repos[repo]["files"]]})
                return self._send(404, {"error": f"unknown endpoint {parsed.path}"})

        return Handler
