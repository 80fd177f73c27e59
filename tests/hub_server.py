"""A small in-memory server speaking enough of the Hugging Face Hub HTTP API for `huggingface_hub` and
`transformers` (push a folder, then download / `from_pretrained` it by repo id), plus pytest fixtures and helpers.

Endpoints (model repos, repo ids `namespace/name`):
- POST /api/repos/create                          create a repo (409 if it exists), initial commit with .gitattributes
- GET  /api/models/{repo}[/revision/{rev}]        model info (sha, siblings, private)
- POST /api/models/{repo}/preupload/{rev}         always answers uploadMode "regular" (no LFS / Xet needed)
- POST /api/models/{repo}/commit/{rev}            NDJSON commit: header, file (base64), deletedFile, deletedFolder
- POST /api/models/{repo}/branch/{branch}         create a branch (optionally from `startingPoint`)
- GET  /api/models/{repo}/refs                    branches
- GET  /api/models/{repo}/tree/{rev}[/{path}]     tree listing (recursive or not)
- POST /api/validate-yaml                         parses README front matter; checks `model-index` structure
- GET  /api/whoami-v2                             the user of a valid token
- HEAD/GET /{repo}/resolve/{rev}/{path}           file content with ETag, X-Repo-Commit, Content-Length
Errors carry the `X-Error-Code` header (RepoNotFound / RevisionNotFound / EntryNotFound) that huggingface_hub maps
to its exception classes. Writes need `Authorization: Bearer <server.token>`; private repos need it for reads too.
The server never records request headers, so tests can check that a token does not leak into its log.

`huggingface_hub` reads `HF_ENDPOINT` once at import time: in-process code must pass `endpoint=server.endpoint`
(`HfApi(endpoint=...)`, `hf_hub_download(..., endpoint=...)`); code that relies on the environment variable (e.g.
`transformers.AutoModel.from_pretrained(repo_id)`) runs in a subprocess started with `hub_subprocess_env`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)  # commit sha -> summary


class HubServer:
    """In-memory Hub on 127.0.0.1 (random free port), served from a background thread."""

    def __init__(self, token: str = "hf_loopback_test_write_token", user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) only; never headers
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        server = self

        class Handler(_HubHandler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Files of a repo at a branch or commit."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)])

    # ------------------------------------------------------------------ state changes
    def _new_commit(self, repo: _Repo, files: dict[str, bytes], message: str) -> str:
        payload = json.dumps({k: git_blob_oid(v) for k, v in sorted(files.items())}).encode()
        sha = hashlib.sha1(payload + message.encode() + str(time.time_ns()).encode()).hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = message
        return sha


def _json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, _json_bytes({"error": message}), headers, head=head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if not head else 401, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
            return None
        return repo

    def _commit_of(self, repo: _Repo, revision: str, head: bool = False) -> str | None:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        return None

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.hub.requests.append((method, path))
        parts = [p for p in path.split("/") if p]
        body = self._body() if method == "POST" else b""
        try:
            with self.hub._lock:
                self._route(method, parts, query, body)
        except Exception as err:  # surface server bugs as 500 with the message
            self._error(500, None, f"{type(err).__name__}: {err}")

    def _route(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        head = method == "HEAD"
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if parts[:2] == ["api", "whoami-v2"]:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._send(
                200, _json_bytes({"type": "user", "name": self.hub.user, "auth": {"type": "access_token"}})
            )
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main")
            if rest[:1] == ["revision"] and method == "GET":
                return self._model_info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["preupload"] and method == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"))
            if rest[:1] == ["commit"] and method == "POST":
                return self._commit(repo_id, "/".join(rest[1:]), body)
            if rest[:1] == ["branch"] and method == "POST":
                return self._create_branch(repo_id, unquote("/".join(rest[1:])), json.loads(body or b"{}"))
            if rest[:1] == ["refs"] and method == "GET":
                return self._refs(repo_id)
            if rest[:1] == ["tree"] and method == "GET" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], unquote("/".join(parts[4:])), head)
        return self._error(404, None, f"Unknown endpoint {method} /{'/'.join(parts)}", head=head)

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        if payload.get("type", "model") not in (None, "model"):
            return self._error(400, None, "only model repos are supported by this test server")
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.hub.repos:
            # Like the Hub, the conflict answer still carries the url (create_repo(exist_ok=True) reads it).
            message = "You already created this model repo"
            body = _json_bytes({"error": message, "url": f"{self.hub.endpoint}/{repo_id}"})
            return self._send(409, body, {"X-Error-Message": message})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(private=private)
        sha = self.hub._new_commit(
            repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit"
        )
        repo.branches["main"] = sha
        self.hub.repos[repo_id] = repo
        self._send(200, _json_bytes({"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}))

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit_of(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha]
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(files)],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        self._send(200, _json_bytes(info))

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        sha = repo.branches.get(unquote(revision))
        existing = repo.commits[sha] if sha else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # everything inline: no LFS or Xet round trips needed
                "shouldIgnore": False,
                "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in payload.get("files", [])
        ]
        self._send(200, _json_bytes({"files": files, "commitOid": sha}))

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        branch = unquote(revision)
        if branch not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        files = dict(repo.commits[repo.branches[branch]])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[branch]:
                    return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile / copies are never requested because preupload answers "regular"
                return self._error(400, None, f"unsupported commit operation {key!r}")
        sha = self.hub._new_commit(repo, files, summary)
        repo.branches[branch] = sha
        self._send(
            200,
            _json_bytes(
                {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            ),
        )

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        if branch in repo.branches:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        if start is None:
            return
        repo.branches[branch] = start
        self._send(200, _json_bytes({}))

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(repo.branches.items())]
        self._send(200, _json_bytes({"branches": branches, "converts": [], "tags": []}))

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit_of(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha]
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        if prefix and not any(p.startswith(base) for p in files):
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
        entries, folders = [], set()
        for path, content in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base) :].split("/")
            for depth in range(1, len(rel)):
                folder = base + "/".join(rel[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if recursive or len(rel) == 1:
                entries.append({"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path})
        self._send(200, _json_bytes(entries))

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(404 if not head else 401, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
        sha = self._commit_of(repo, revision, head=head)
        if sha is None:
            return
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", f"Entry not found: {filename}", head=head)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        self._send(200, content, headers, head=head)

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        errors = []
        metadata = {}
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append("unterminated YAML front matter")
            else:
                try:
                    metadata = yaml.safe_load(content[3:end]) or {}
                except yaml.YAMLError as err:
                    errors.append(f"invalid YAML: {err}")
        if not errors and not isinstance(metadata, dict):
            errors.append("YAML front matter must be a mapping")
        if not errors:
            errors.extend(_model_index_errors(metadata.get("model-index")))
        if errors:
            return self._send(400, _json_bytes({"errors": [{"message": e} for e in errors], "warnings": []}))
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        self._send(200, _json_bytes({"errors": [], "warnings": warnings}))


def _model_index_errors(model_index) -> list[str]:
    # The structural rules of the Hub's model-index schema that matter for our cards.
    if model_index is None:
        return []
    errors = []
    if not isinstance(model_index, list):
        return ["model-index must be a list"]
    for entry in model_index:
        if not isinstance(entry, dict) or "name" not in entry:
            errors.append("model-index entries need a name")
            continue
        for result in entry.get("results", []):
            if not isinstance(result.get("task"), dict) or "type" not in result["task"]:
                errors.append("model-index result needs task.type")
            if not isinstance(result.get("dataset"), dict) or not {"name", "type"} <= set(result["dataset"]):
                errors.append("model-index result needs dataset.name and dataset.type")
            for metric in result.get("metrics", []):
                if "type" not in metric or "value" not in metric:
                    errors.append("model-index metrics need type and value")
    return errors


# ---------------------------------------------------------------------- pytest fixtures and helpers


@pytest.fixture(name="hub_server")
def hub_server_fixture():
    """A started `HubServer`; stopped after the test."""
    with HubServer() as server:
        yield server


def hub_subprocess_env(endpoint: str, hf_home: os.PathLike | str, token: str | None = None) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub / transformers talk to the loopback server only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_ETAG_TIMEOUT="30",
        PYTHONDONTWRITEBYTECODE="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


_BLOCKER = """
import sys
for _name in {blocked!r}:
    sys.modules[_name] = None  # `import {first}` now raises ImportError, as on a machine without the package
"""


def run_hub_subprocess(
    script: str,
    endpoint: str,
    workdir: os.PathLike | str,
    blocked_packages: tuple[str, ...] = ("clusterstm",),
    token: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `script` in a fresh python with `HF_ENDPOINT` pointing at the server and `blocked_packages` unimportable.

    The script runs in `workdir` (a tmp dir, so nothing is imported from the repository root); `HF_HOME` is
    `workdir/hf_home`, so every download really goes through the server. Raises with the output on failure.
    """
    workdir = Path(workdir)
    prelude = _BLOCKER.format(blocked=tuple(blocked_packages), first=blocked_packages[0] if blocked_packages else "")
    path = workdir / "hub_subprocess_script.py"
    path.write_text(prelude + textwrap.dedent(script))
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=workdir,
        env=hub_subprocess_env(endpoint, workdir / "hf_home", token=token),
        stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
