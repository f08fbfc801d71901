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

The upload side, as huggingface_hub's HfApi.create_repo / create_commit use it (LFS protocol; the
tests switch off Xet, which needs the hub's separate chunk store):
  POST /api/repos/create                        -> {"url"}; 409 when the repository exists
  GET  /api/models/<id>/tree/<rev>[/<path>]     -> [{"type", "path", "size", "oid" (git blob id), "lfs"}]
  POST /api/validate-yaml                       -> the card's front matter must be a YAML mapping
  POST /api/models/<id>/preupload/<rev>         -> per file "lfs" (binary, 10 MB or more, or named in
                                                   .gitattributes) or "regular", and the oid it has now
  POST /<id>.git/info/lfs/objects/batch         -> per object: no actions when stored already; else one
                                                   PUT (basic, then verify) or, above `part_size`, parts
                                                   of `part_size` and a completion URL (multipart)
  PUT  /lfs-upload/<upload>/<part>              -> the presigned URLs those actions name (no token)
  POST /api/models/<id>/commit/<rev>            -> NDJSON: header, file (base64), lfsFile (oid must be
                                                   stored), deletedFile/deletedFolder; 412 on a stale parentCommit
Repositories live in folders under `storage` (`<type>s/<owner>/<name>/`, served by the download
side too), LFS objects under `storage/lfs/`. With `token` set, every API call must carry it. A
(sha256, part) pair in `cut_uploads` has its first PUT cut off halfway (the server reads half the
body and closes the connection); with `fail_commit_once` the next commit gets a 500. `calls`
records every request with the number of body bytes the server read.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 10**6  # the hub stores files of 10 MB and more in LFS whatever they hold
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.gguf", "*.h5", "*.npz", "*.onnx", "*.pt", "*.safetensors", "*.zip"))


@dataclass
class Call:
    method: str
    path: str
    authorization: str | None
    received: int  # body bytes the server read


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class FakeHub:
    def __init__(self, storage: Path | None = None, token: str | None = None):
        self.repos: dict[tuple[str, str], tuple[Path, str]] = {}  # (type, id) -> (folder, commit)
        self.drop_once: set[str] = set()
        self.fail_once: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.authorizations: list[str | None] = []
        self._dropped: set[str] = set()
        # upload side
        self.storage = Path(storage) if storage else Path(tempfile.mkdtemp(prefix="fake-hub-"))
        self.token = token
        self.part_size = 5 * 2**20
        self.cut_uploads: set[tuple[str, int]] = set()
        self.fail_commit_once = False
        self.calls: list[Call] = []
        self.private: dict[tuple[str, str], bool] = {}
        self.lfs_paths: dict[tuple[str, str], dict[str, str]] = {}  # (type, id) -> {path: sha256}
        self._uploads: dict[str, dict] = {}  # upload id -> {"repo", "oid", "size", "parts"}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

            def do_POST(self):
                hub._write(self, "POST")

            def do_PUT(self):
                hub._write(self, "PUT")

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
        self.calls.append(Call("HEAD" if head else "GET", path, h.headers.get("Authorization"), 0))
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?", path)
        if m:
            query = parse_qs(urlsplit(h.path).query)
            return self._tree(h, m.group(1)[:-1], m.group(2), m.group(3), m.group(4) or "",
                              query.get("recursive", ["False"])[0].lower() == "true")
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
        if self.private.get((repo_type, repo_id)) and not self._authorized(h):
            self._error(h, 401, "RepoNotFound", "Repository not found")
            return None
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
        body = json.dumps({"id": repo_id, "sha": commit, "private": self.private.get((repo_type, repo_id), False),
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

    # ---- the upload side -----------------------------------------------------------------------
    def _authorized(self, h) -> bool:
        return self.token is None or h.headers.get("Authorization") == f"Bearer {self.token}"

    def _json(self, h, status: int, data, content_type: str = "application/json") -> None:
        body = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _read_body(self, h, call: Call, stop_after: int | None = None) -> bytes:
        """The request body (Content-Length or chunked); with `stop_after`, only that much is read."""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    h.rfile.readline()
                    break
                if stop_after is not None and len(data) + size >= stop_after:
                    data += h.rfile.read(stop_after - len(data))
                    break
                data += h.rfile.read(size)
                h.rfile.readline()
        else:
            length = int(h.headers.get("Content-Length") or 0)
            data = h.rfile.read(length if stop_after is None else min(length, stop_after))
        call.received += len(data)
        return data

    def _write(self, h: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        auth = h.headers.get("Authorization")
        self.requests.append((method, path, None))
        self.authorizations.append(auth)
        call = Call(method, path, auth, 0)
        self.calls.append(call)
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]+)/(\d+)", path)
        if method == "PUT" and m:  # presigned: the URL is the permission, as on S3
            return self._put_part(h, call, m.group(1), int(m.group(2)))
        m = re.fullmatch(r"/lfs-complete/([0-9a-f]+)", path)
        if method == "POST" and m:
            return self._complete(h, json.loads(self._read_body(h, call)), m.group(1))
        body = self._read_body(h, call)
        if not self._authorized(h):
            return self._error(h, 401, None, "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            return self._create(h, json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(h, json.loads(body))
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if m:
            key = (m.group(1)[:-1], m.group(2))
            if self._repo(h, *key, m.group(4)) is None:
                return
            if m.group(3) == "preupload":
                return self._preupload(h, key, json.loads(body))
            return self._commit(h, key, [json.loads(line) for line in body.splitlines() if line.strip()])
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if m:
            key = ("dataset" if m.group(1) else "model", m.group(2))
            if self._repo(h, *key, "main") is None:
                return
            if m.group(3) == "verify":
                req = json.loads(body)
                stored = self._object(key, req["oid"])
                ok = stored.is_file() and stored.stat().st_size == req["size"]
                return self._json(h, 200 if ok else 404, {"message": "ok" if ok else "object not found"})
            return self._batch(h, key, json.loads(body))
        self._error(h, 404, None, "Not found")

    def _object(self, key, oid: str) -> Path:
        return self.storage / "lfs" / f"{key[0]}s" / key[1] / oid

    def _create(self, h, req: dict) -> None:
        repo_type = req.get("type") or "model"
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        key = (repo_type, repo_id)
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self._lock:
            if key in self.repos:
                return self._json(h, 409, {"error": f"You already created this {repo_type} repo", "url": url})
            folder = self.storage / f"{repo_type}s" / repo_id
            folder.mkdir(parents=True)
            (folder / ".gitattributes").write_text(GITATTRIBUTES)
            self.repos[key] = (folder, hashlib.sha1(f"initial {repo_type}/{repo_id}".encode()).hexdigest())
            self.private[key] = req.get("visibility") == "private"
            self.lfs_paths[key] = {}
        self._json(h, 200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, h, req: dict) -> None:
        text = req.get("content", "")
        if text.startswith("---\n"):
            try:
                meta = yaml.safe_load(text[4:].split("\n---", 1)[0])
                if not isinstance(meta, dict):
                    raise ValueError("metadata must be a mapping")
            except (yaml.YAMLError, ValueError) as exc:
                return self._json(h, 400, {"errors": [{"message": str(exc)}], "warnings": []})
        self._json(h, 200, {"errors": [], "warnings": []})

    def _files(self, key) -> dict[str, dict]:
        """path -> tree entry, for every file of the repository's current commit."""
        folder = self.repos[key][0]
        lfs = self.lfs_paths.get(key, {})
        out = {}
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(folder).as_posix()
            size = p.stat().st_size
            entry = {"type": "file", "path": rel, "size": size}
            if rel in lfs:
                pointer = lfs_pointer(lfs[rel], size)
                entry.update(oid=git_blob_id(pointer), lfs={"oid": lfs[rel], "size": size, "pointerSize": len(pointer)})
            else:
                entry["oid"] = git_blob_id(p.read_bytes())
            out[rel] = entry
        return out

    def _tree(self, h, repo_type, repo_id, revision, under, recursive) -> None:
        if self._repo(h, repo_type, repo_id, revision) is None:
            return
        entries, folders = [], set()
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        for rel, entry in self._files((repo_type, repo_id)).items():
            if not rel.startswith(prefix):
                continue
            rest = rel[len(prefix):].split("/")
            if len(rest) > 1:
                depth = len(rest) - 1 if recursive else 1
                folders.update(prefix + "/".join(rest[:i]) for i in range(1, depth + 1))
                if not recursive:
                    continue
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                    for d in sorted(folders)]
        self._json(h, 200, entries)

    def _lfs_mode(self, key, path: str, size: int, sample: bytes) -> bool:
        attributes = (self.repos[key][0] / ".gitattributes")
        patterns = [line.split()[0] for line in (attributes.read_text().splitlines() if attributes.exists() else [])
                    if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in patterns)

    def _preupload(self, h, key, req: dict) -> None:
        files = self._files(key)
        out = []
        for f in req["files"]:
            lfs = f["size"] > 0 and self._lfs_mode(key, f["path"], f["size"], base64.b64decode(f["sample"]))
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            have = files.get(f["path"])
            if have:
                entry["oid"] = have["lfs"]["oid"] if "lfs" in have else have["oid"]
            out.append(entry)
        self._json(h, 200, {"files": out, "commitOid": self.repos[key][1]})

    def _batch(self, h, key, req: dict) -> None:
        objects, multipart = [], False
        for obj in req["objects"]:
            oid, size = obj["oid"], obj["size"]
            if self._object(key, oid).is_file():
                objects.append({"oid": oid, "size": size})  # stored already: nothing to send
                continue
            upload = uuid.uuid4().hex
            parts = max(1, -(-size // self.part_size))
            with self._lock:
                self._uploads[upload] = {"repo": key, "oid": oid, "size": size, "parts": parts if size > self.part_size else 0}
            if size > self.part_size:
                multipart = True
                header = {"chunk_size": str(self.part_size)}
                header.update({str(n): f"{self.url}/lfs-upload/{upload}/{n}" for n in range(1, parts + 1)})
                actions = {"upload": {"href": f"{self.url}/lfs-complete/{upload}", "header": header}}
            else:
                verify = f"{self.url}/{'' if key[0] == 'model' else key[0] + 's/'}{key[1]}.git/info/lfs/objects/verify"
                actions = {"upload": {"href": f"{self.url}/lfs-upload/{upload}/1"}, "verify": {"href": verify}}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._json(h, 200, {"transfer": "multipart" if multipart else "basic", "objects": objects},
                   "application/vnd.git-lfs+json")

    def _put_part(self, h, call: Call, upload: str, part: int) -> None:
        info = self._uploads.get(upload)
        if info is None or part < 1 or part > max(1, info["parts"]):
            self._read_body(h, call)
            return self._error(h, 404, None, "No such upload")
        start = (part - 1) * self.part_size if info["parts"] else 0
        expected = min(self.part_size, info["size"] - start) if info["parts"] else info["size"]
        cut = (info["oid"], part)
        with self._lock:
            cutting = cut in self.cut_uploads
            self.cut_uploads.discard(cut)
        if cutting:
            self._read_body(h, call, stop_after=expected // 2)
            h.close_connection = True
            h.connection.shutdown(2)  # no answer: the client sees the connection drop mid-request
            return
        data = self._read_body(h, call)
        if len(data) != expected:
            return self._error(h, 400, None, f"expected {expected} bytes, got {len(data)}")
        folder = self.storage / "parts" / upload
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(part)).write_bytes(data)
        if not info["parts"]:  # basic transfer: the object is complete
            if hashlib.sha256(data).hexdigest() != info["oid"]:
                return self._error(h, 400, None, "sha256 does not match the oid")
            self._store(info, data)
        h.send_response(200)
        h.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _complete(self, h, req: dict, upload: str) -> None:
        info = self._uploads.get(upload)
        if info is None or req.get("oid") != info["oid"]:
            return self._error(h, 404, None, "No such upload")
        folder = self.storage / "parts" / upload
        parts = sorted(req["parts"], key=lambda p: p["partNumber"])
        if [p["partNumber"] for p in parts] != list(range(1, info["parts"] + 1)):
            return self._error(h, 400, None, "parts missing")
        chunks = []
        for p in parts:
            f = folder / str(p["partNumber"])
            if not f.is_file() or p["etag"].strip('"') != hashlib.md5(f.read_bytes()).hexdigest():
                return self._error(h, 400, None, f"part {p['partNumber']} was not uploaded")
            chunks.append(f.read_bytes())
        data = b"".join(chunks)
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["oid"]:
            return self._error(h, 400, None, "assembled object does not match its oid")
        self._store(info, data)
        shutil.rmtree(folder, ignore_errors=True)
        self._json(h, 200, {"success": True})

    def _store(self, info: dict, data: bytes) -> None:
        target = self._object(info["repo"], info["oid"])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp-" + uuid.uuid4().hex)
        tmp.write_bytes(data)
        tmp.replace(target)

    def _commit(self, h, key, lines: list[dict]) -> None:
        header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
        if header is None or not header.get("summary"):
            return self._json(h, 400, {"error": "the commit needs a header with a summary"})
        with self._lock:
            if self.fail_commit_once:
                self.fail_commit_once = False
                return self._error(h, 500, None, "Internal Error")
            folder, commit = self.repos[key]
            if header.get("parentCommit") not in (None, commit):
                return self._json(h, 412, {"error": "A commit has happened since. Please refresh and try again."})
            writes, lfs, deletes = {}, {}, []
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    writes[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    stored = self._object(key, value["oid"])
                    if not stored.is_file():
                        return self._json(h, 422, {"error": f"Your push was rejected because an LFS pointer "
                                                            f"pointed to a file that does not exist ({value['path']})"})
                    writes[value["path"]] = stored
                    lfs[value["path"]] = value["oid"]
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    deletes.append(value["path"])
                else:
                    return self._json(h, 400, {"error": f"unknown operation {line['key']}"})
            for rel in deletes:
                target = folder / rel
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                self.lfs_paths[key] = {p: o for p, o in self.lfs_paths.get(key, {}).items()
                                       if p != rel and not p.startswith(rel.rstrip("/") + "/")}
            for rel, content in writes.items():
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
                self.lfs_paths.setdefault(key, {}).pop(rel, None)
            self.lfs_paths.setdefault(key, {}).update(lfs)
            new = hashlib.sha1(json.dumps([commit, lines], sort_keys=True).encode()).hexdigest()
            self.repos[key] = (folder, new)
        self._json(h, 200, {"success": True, "commitOid": new, "commitUrl": f"{self.url}/{key[1]}/commit/{new}",
                            "hookOutput": ""})
