"""A fake Hugging Face Hub on 127.0.0.1 for offline tests of ``eqat pull``.

It speaks the parts of the Hub API that ``huggingface_hub`` 2.4's ``snapshot_download`` uses
(read from huggingface_hub/_snapshot_download.py, file_download.py, hf_api.py, utils/_http.py):

* ``GET /api/models/{repo}/revision/{rev}`` -> ``{"id", "sha", "siblings"}`` (``repo_info``;
  with ``?blobs=true``, ``model_info(files_metadata=True)``, each sibling has ``size``,
  ``blobId`` and, for LFS files, ``lfs.sha256``);
* ``GET /api/models/{repo}/tree/{rev}?recursive=...`` -> ``[{"type": "file", "path", "size",
  "oid", "lfs"}]`` (``list_repo_tree``; one page, so no ``Link`` header);
* ``HEAD /{repo}/resolve/{rev}/{file}`` -> ``ETag`` (git blob sha1, or sha256 for LFS files, with
  ``X-Linked-Etag``/``X-Linked-Size``), ``X-Repo-Commit`` and ``Content-Length``;
* ``GET`` of the same URL, honouring ``Range: bytes=N-`` with ``206`` + ``Content-Range``;
* errors with the ``X-Error-Code`` header ``hf_raise_for_status`` maps: ``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``.

Fault injection: ``Repo.recorded[file] = bytes`` makes the Hub's records (hashes, ETag) describe
other bytes than the ones served (a damaged mirror); ``drop_after[file] = n`` makes the first GET of ``file`` announce the full
length, send ``n`` bytes and close the connection; ``fail_next[file] = [status, ...]`` answers
the next GETs of ``file`` with those statuses. ``log`` records ``(method, path, range)``.

Use as a context manager; the server thread stops itself on exit.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, files: dict[str, bytes], sha: str | None = None):
        self.files = dict(files)
        # What the Hub's records say a file holds, where that differs from what it serves (a
        # damaged mirror): ``recorded[name] = original bytes`` while ``files[name]`` is served.
        self.recorded: dict[str, bytes] = {}
        if sha is None:
            h = hashlib.sha1()
            for name in sorted(self.files):
                h.update(name.encode() + b"\0" + self.files[name])
            sha = h.hexdigest()
        self.sha = sha

    @classmethod
    def from_dir(cls, path: str | Path, sha: str | None = None) -> "Repo":
        root = Path(path)
        files = {
            str(f.relative_to(root)): f.read_bytes()
            for f in sorted(root.rglob("*"))
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts)
        }
        return cls(files, sha)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def etag(self, name: str) -> str:
        data = self.recorded.get(name, self.files[name])
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else git_blob_sha1(data)


class FakeHub:
    def __init__(self, repos: dict[str, Repo] | None = None):
        self.repos: dict[str, Repo] = dict(repos or {})
        self.drop_after: dict[str, int] = {}
        self.fail_next: dict[str, list[int]] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, str | None]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]


def unused_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (the port was just released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        self._send(status, json.dumps(obj).encode(), h, head)

    def _error(self, status: int, code: str, message: str, extra: dict | None = None, head: bool = False) -> None:
        h = {"X-Error-Code": code, "X-Error-Message": message}
        h.update(extra or {})
        self._json(status, {"error": message}, h, head)

    def _repo_rev(self, repo_id: str, rev: str, head: bool = False) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return None
        if rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head=head)
            return None
        return repo

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.fake._lock:
            self.fake.log.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        m = _API.match(path)
        if m:
            return self._api(m, head)
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m, head)
        self._error(404, "EntryNotFound", f"no route for {path}", head=head)

    def _api(self, m: re.Match, head: bool) -> None:
        query = parse_qs(urlsplit(self.path).query)
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        rev = unquote(m["rev"]) if m["rev"] else "main"
        repo = self._repo_rev(m["repo"], rev, head)
        if repo is None:
            return
        if m["kind"] == "tree":
            entries = []
            for name in sorted(repo.files):
                data = repo.recorded.get(name, repo.files[name])
                e = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if repo.is_lfs(name):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._json(200, entries, head=head)
        siblings = []
        for n in sorted(repo.files):
            sib = {"rfilename": n}
            if blobs:  # model_info(files_metadata=True): sizes, git blob ids, LFS sha256
                data = repo.recorded.get(n, repo.files[n])
                sib.update(size=len(data), blobId=git_blob_sha1(data))
                if repo.is_lfs(n):
                    sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
        info = {
            "id": m["repo"],
            "modelId": m["repo"],
            "sha": repo.sha,
            "private": False,
            "siblings": siblings,
        }
        self._json(200, info, head=head)

    def _resolve(self, m: re.Match, head: bool) -> None:
        repo = self._repo_rev(m["repo"], unquote(m["rev"]), head)
        if repo is None:
            return
        name = m["file"]
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.sha}, head)
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes"}
        if repo.is_lfs(name):
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(len(data))
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        with self.fake._lock:
            fails = self.fake.fail_next.get(name)
            status = fails.pop(0) if fails else None
            drop = self.fake.drop_after.pop(name, None)
        if status is not None:
            return self._error(status, "ServerError", f"injected {status}", {"X-Repo-Commit": repo.sha})
        start = 0
        rng = self.headers.get("Range")
        if rng:
            mr = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
            if mr:
                start = int(mr[1])
        body = data[start:]
        if start:
            self.send_response(206)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        else:
            self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop is not None and drop < len(body):
            # Announce everything, deliver part, hang up: the client sees an incomplete body.
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)
