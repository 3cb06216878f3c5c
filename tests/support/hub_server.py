"""A local Hugging Face Hub on 127.0.0.1 for download tests: real HTTP, the Hub's URL layout, no mocks.

It serves repos made of local folders (``{"org/name": folder}``) at one fixed commit, answering the calls
``huggingface_hub`` (2.4) makes for ``snapshot_download`` and ``list_repo_files``:

* ``GET /api/models/{repo}/revision/{rev}``: model info with ``sha`` and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the recursive file listing (``path``, ``size``, ``oid``);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length``.

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown files ``EntryNotFound``, as the Hub does;
files put in :attr:`HubServer.unserved` are listed but answer ``EntryNotFound`` (a repo that lost a file).
Every request path is recorded in :attr:`HubServer.requests` so tests can see what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _files(folder: str) -> dict[str, str]:
    """Repo path → local file for every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder).replace(os.sep, "/")] = full
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class HubServer:
    """``with HubServer({"org/name": folder}) as hub: os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self, repos: dict[str, str]):
        self.repos = {repo: _files(folder) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self.unserved: set[str] = set()  # "org/name:path": listed, but its download answers 404
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str, body: bool) -> None:
                data = json.dumps({"error": f"{code} (local test hub)"}).encode()
                self._send(status, data, {"X-Error-Code": code, "X-Error-Message": code,
                                          "Content-Type": "application/json"}, body)

            def _json(self, obj, body: bool) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo, kind = "/".join(parts[2:4]), parts[4]
                    files = server.repos.get(repo)
                    if files is None:
                        return self._error(404, "RepoNotFound", body)
                    if kind == "revision":
                        return self._json({"id": repo, "sha": COMMIT, "private": False,
                                           "siblings": [{"rfilename": f} for f in sorted(files)]}, body)
                    prefix = "/".join(parts[6:])
                    return self._json([{"type": "file", "path": f, "size": os.path.getsize(p),
                                        "oid": hashlib.sha1(f.encode()).hexdigest()}
                                       for f, p in sorted(files.items()) if f.startswith(prefix)], body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, file = "/".join(parts[:2]), "/".join(parts[4:])
                    files = server.repos.get(repo)
                    if files is None:
                        return self._error(404, "RepoNotFound", body)
                    if file not in files or f"{repo}:{file}" in server.unserved:
                        return self._error(404, "EntryNotFound", body)
                    with open(files[file], "rb") as f:
                        data = f.read()
                    return self._send(200, data, {"ETag": f'"{_sha256(files[file])}"', "X-Repo-Commit": COMMIT,
                                                  "Content-Type": "application/octet-stream"}, body)
                return self._error(404, "RepoNotFound", body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def fetched(self) -> set[str]:
        """The repo files downloaded so far (``GET .../resolve/...``), as ``"org/name:path"``."""
        out = set()
        for method, path in self.requests:
            parts = path.strip("/").split("/")
            if method == "GET" and len(parts) >= 5 and parts[2] == "resolve":
                out.add("/".join(parts[:2]) + ":" + "/".join(parts[4:]))
        return out

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
