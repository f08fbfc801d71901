"""A local HTTP server that answers the requests huggingface_hub makes, the way the hub does.

Serves repositories from local folders on 127.0.0.1 (point $HF_ENDPOINT at `server.url`):
  GET  /api/models/<id>[/revision/<rev>]        -> {"id", "sha", "siblings": [{"rfilename"}]}
  HEAD /[datasets/]<id>/resolve/<rev>/<file>    -> X-Repo-Commit, ETag, Content-Length
  GET  same                                     -> the bytes, honouring `Range: bytes=N-` (206)
Unknown repositories answer 404 with `X-Error-Code: RepoNotFound`, unknown revisions
`RevisionNotFound`, unknown files `EntryNotFound`, as the hub does. A file named in `drop_once`
is cut off halfway through the first time it is sent (the connection is closed), so a client
has to resume it. A file in `fail_once` gets a 500 the first time: the download fails, and a
later run has to pick up where it stopped. Every request is recorded in `server.requests` as (method, path, range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], tuple[Path, str]] = {}  # (type, id) -> (folder, commit)
        self.drop_once: set[str] = set()
        self.fail_once: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.authorizations: list[str | None] = []
        self._dropped: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path, repo_type: str = "model") -> str:
        commit = hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = (Path(folder), commit)
        return commit

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # ---- answering -------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        self.authorizations.append(h.headers.get("Authorization"))
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            return self._api(h, "dataset" if m.group(1) == "datasets" else "model", m.group(2), m.group(3) or "main")
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(h, "dataset" if m.group(1) else "model", m.group(2), m.group(3), m.group(4), head)
        self._error(h, 404, None, "Not found")

    def _repo(self, h, repo_type, repo_id, revision):
        entry = self.repos.get((repo_type, repo_id))
        if entry is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        folder, commit = entry
        if revision not in ("main", commit):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return folder, commit

    def _api(self, h, repo_type, repo_id, revision):
        found = self._repo(h, repo_type, repo_id, revision)
        if found is None:
            return
        folder, commit = found
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        body = json.dumps({"id": repo_id, "sha": commit, "private": False,
                           "siblings": [{"rfilename": f} for f in files]}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _resolve(self, h, repo_type, repo_id, revision, filename, head):
        found = self._repo(h, repo_type, repo_id, revision)
        if found is None:
            return
        folder, commit = found
        file = folder / filename
        if not file.is_file():
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist")
        data = file.read_bytes()
        if not head and filename in self.fail_once:
            self.fail_once.discard(filename)
            return self._error(h, 500, None, "Internal Error")
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng.strip()).group(1))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        if filename in self.drop_once and filename not in self._dropped:
            self._dropped.add(filename)
            h.wfile.write(data[start:len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the client sees the body end early, as on a dropped link
            return
        h.wfile.write(data[start:])

    def _error(self, h, status, code, message):
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
