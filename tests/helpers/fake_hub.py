"""A local HTTP server answering the few hub endpoints huggingface_hub's snapshot_download calls.

For download tests without the network: point HF_ENDPOINT (or huggingface_hub.constants.ENDPOINT) at
`FakeHub.url`. It serves model and dataset repositories from local folders, one commit each:

    GET  /api/{models|datasets}/{repo}/revision/{revision}      repository info (commit sha, file list)
    GET  /api/{models|datasets}/{repo}/tree/{commit}[/...]      recursive file listing
    HEAD/GET /[datasets/]{repo}/resolve/{commit}/{path}          file metadata and bytes

Gated repositories answer 403 with the hub's `X-Error-Code: GatedRepo` unless the request carries
`Authorization: Bearer <their token>`; unknown ones answer 404 with `RepoNotFound`. Every file path served
is recorded in `downloaded`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class _Repo:
    folder: Path
    commit: str
    token: str | None = None  # gated: only this bearer token gets the files

    def files(self) -> dict[str, Path]:
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


@dataclass
class FakeHub:
    repos: dict[tuple[str, str], _Repo] = field(default_factory=dict)  # (repo type, repo id) -> repo
    downloaded: list[str] = field(default_factory=list)
    url: str = ""

    def add(self, repo_id: str, folder: Path, *, repo_type: str = "model", token: str | None = None) -> str:
        """Serve `folder` as `repo_id` (one commit; gated behind `token` when given); return the commit hash."""
        commit = hashlib.sha1(f"{repo_type}/{repo_id}/{folder}".encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = _Repo(Path(folder), commit, token)
        return commit

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _find(self, repo_type: str, parts: list[str]) -> tuple[_Repo | None, str, list[str]]:
        """The repository named by the first one or two path parts, its ID, and the parts after it."""
        for size in (2, 1):
            repo_id = "/".join(parts[:size])
            if (repo_type, repo_id) in self.repos:
                return self.repos[(repo_type, repo_id)], repo_id, parts[size:]
        return None, "/".join(parts[:2]), parts[2:]

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        parts = [unquote(p) for p in urlparse(handler.path).path.strip("/").split("/")]
        api = parts[0] == "api"
        if api:
            repo_type = {"models": "model", "datasets": "dataset"}.get(parts[1], "")
            parts = parts[2:]
        else:
            repo_type = "dataset" if parts[0] == "datasets" else "model"
            parts = parts[1:] if parts[0] == "datasets" else parts
        repo, repo_id, rest = self._find(repo_type, parts)
        if repo is None:
            return _send(handler, 404, {"X-Error-Code": "RepoNotFound",
                                        "X-Error-Message": "Repository not found"}, b"", body)
        if repo.token is not None and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            return _send(handler, 403, {"X-Error-Code": "GatedRepo",
                                        "X-Error-Message": "Access to this model is restricted"}, b"", body)
        files = repo.files()
        if api and rest[:1] == ["revision"]:
            info = {"id": repo_id, "sha": repo.commit, "siblings": [{"rfilename": f} for f in files]}
            return _send(handler, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if api and rest[:1] == ["tree"]:
            tree = [{"type": "file", "path": name, "size": path.stat().st_size,
                     "oid": hashlib.sha1(path.read_bytes()).hexdigest()} for name, path in files.items()]
            return _send(handler, 200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            name = "/".join(rest[2:])
            if name not in files:
                return _send(handler, 404, {"X-Error-Code": "EntryNotFound"}, b"", body)
            data = files[name].read_bytes()
            if body:
                self.downloaded.append(name)
            return _send(handler, 200, {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                        "Content-Type": "application/octet-stream"}, data, body)
        return _send(handler, 404, {}, b"", body)


def _send(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
        handler.wfile.write(data)
