"""A local, in-memory stand-in for the lakeFS REST API — exactly the operations our ``lakefs`` store uses.

No lakeFS server can run on our CI machines (it ships as a Go binary / container), so
``tests/test_store_lakefs.py`` drives the real ``lakefs`` SDK (0.16 over lakefs-sdk 1.88) against this server.
Request bodies are parsed with the SDK's own request models (``BranchCreation``, ``CommitCreation``, ``Merge``,
``TagCreation``, ``RevertCreation``, ``PathList``, ``RepositoryCreation``) and every JSON response is built and
validated through the SDK's response models (``Repository``, ``Ref``, ``RefList``, ``Commit``, ``CommitList``,
``ObjectStats``, ``ObjectStatsList``, ``MergeResult``, ``ObjectErrorList``, ``Error``), so a shape mismatch fails
here rather than in production. Paths follow ``lakefs_sdk/api/*``.

Implemented (under ``/api/v1``, HTTP basic auth checked):
  POST/GET  /repositories, /repositories/{repo}
  POST/GET  /repositories/{repo}/branches                     GET /repositories/{repo}/branches/{branch}
  POST      /repositories/{repo}/branches/{branch}/objects     (raw upload, chunked or sized body)
  POST      /repositories/{repo}/branches/{branch}/objects/delete
  GET/HEAD  /repositories/{repo}/refs/{ref}/objects            (Range: bytes=a-b / a-, 206 / 416)
  GET       /repositories/{repo}/refs/{ref}/objects/ls         (prefix, after, amount)
  POST      /repositories/{repo}/branches/{branch}/commits     GET /repositories/{repo}/commits/{ref}
  GET       /repositories/{repo}/refs/{ref}/commits            (first_parent)
  POST      /repositories/{repo}/refs/{src}/merge/{dest}       (three-way, strategy source-wins/dest-wins)
  POST/GET  /repositories/{repo}/tags
  POST      /repositories/{repo}/branches/{branch}/revert      (parent_number for merge commits)
Not implemented: pre-signed URLs / staging API, auth API, garbage collection, branch protection, imports.
Semantics are simplified: commits are full snapshots, a branch's uncommitted changes are an overlay.

Also holds :func:`make_release`, the release-directory fixture shared by the store and flow tests.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import lakefs_sdk as m


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Repo:
    """Commits are snapshots {path: stat dict}; blobs are content-addressed; branches hold an uncommitted overlay."""

    def __init__(self, creation: m.RepositoryCreation):
        self.info = m.Repository(id=creation.name, creation_date=int(time.time()),
                                 default_branch=creation.default_branch or "main",
                                 storage_namespace=creation.storage_namespace)
        self.blobs: dict[str, bytes] = {}
        self.commits: dict[str, dict] = {}
        self.tags: dict[str, str] = {}
        root = self._new_commit([], {}, "Repository created", {})
        self.branches: dict[str, dict] = {self.info.default_branch: {"head": root, "staged": {}}}

    # ------------------------------------------------------------------ refs and trees
    def _new_commit(self, parents, tree, message, metadata) -> str:
        body = json.dumps([parents, sorted((k, v["checksum"]) for k, v in tree.items()), message, metadata,
                           time.time_ns()])
        cid = hashlib.sha256(body.encode()).hexdigest()
        self.commits[cid] = {"parents": list(parents), "tree": dict(tree), "message": message,
                             "metadata": dict(metadata), "creation_date": int(time.time()),
                             "generation": 1 + max((self.commits[p]["generation"] for p in parents), default=0)}
        return cid

    def resolve(self, ref: str) -> str:
        if ref in self.branches:
            return self.branches[ref]["head"]
        if ref in self.tags:
            return self.tags[ref]
        if ref in self.commits:
            return ref
        raise ApiError(404, f"ref {ref!r} not found")

    def tree(self, ref: str) -> dict:
        """A branch reads its uncommitted changes too; tags and commits read the committed snapshot."""
        tree = dict(self.commits[self.resolve(ref)]["tree"])
        if ref in self.branches:
            for path, stat in self.branches[ref]["staged"].items():
                if stat is None:
                    tree.pop(path, None)
                else:
                    tree[path] = stat
        return tree

    def branch(self, name: str) -> dict:
        if name not in self.branches:
            raise ApiError(404, f"branch {name!r} not found")
        return self.branches[name]

    def commit_model(self, cid: str) -> m.Commit:
        c = self.commits[cid]
        return m.Commit(id=cid, parents=c["parents"], committer="fake", message=c["message"],
                        creation_date=c["creation_date"], meta_range_id=hashlib.md5(cid.encode()).hexdigest(),
                        metadata=c["metadata"], generation=c["generation"], version=1)

    def ancestors(self, cid: str) -> list[str]:
        """Breadth-first, nearest first."""
        out, queue, seen = [], [cid], set()
        while queue:
            c = queue.pop(0)
            if c in seen:
                continue
            seen.add(c)
            out.append(c)
            queue.extend(self.commits[c]["parents"])
        return out

    # ------------------------------------------------------------------ operations
    def merge(self, source: str, dest: str, merge: m.Merge) -> str:
        src = self.resolve(source)
        dst_branch = self.branch(dest)
        dst = dst_branch["head"]
        src_anc = set(self.ancestors(src))
        base = next(c for c in self.ancestors(dst) if c in src_anc)
        s_tree, d_tree, b_tree = self.commits[src]["tree"], self.commits[dst]["tree"], self.commits[base]["tree"]
        merged: dict = {}
        for path in sorted(set(s_tree) | set(d_tree) | set(b_tree)):
            s, d, b = (t.get(path) for t in (s_tree, d_tree, b_tree))
            key = lambda x: None if x is None else x["checksum"]  # noqa: E731
            if key(s) == key(d) or key(s) == key(b):
                pick = d
            elif key(d) == key(b):
                pick = s
            elif merge.strategy == "source-wins":
                pick = s
            elif merge.strategy == "dest-wins":
                pick = d
            else:
                raise ApiError(409, f"merge conflict at {path}")
            if pick is not None:
                merged[path] = pick
        if merged == d_tree and not (merge.allow_empty or merge.force):
            raise ApiError(400, "no changes to merge")
        cid = self._new_commit([dst, src], merged, merge.message or f"Merge '{source}' into '{dest}'",
                               merge.metadata or {})
        dst_branch["head"] = cid
        return cid

    def revert(self, branch_name: str, rc: m.RevertCreation) -> str:
        branch = self.branch(branch_name)
        if branch["staged"]:
            raise ApiError(400, "branch has uncommitted changes")
        cid = self.resolve(rc.ref)
        parents = self.commits[cid]["parents"]
        if len(parents) > 1:
            if not 1 <= rc.parent_number <= len(parents):
                raise ApiError(400, "parent_number required for a merge commit")
            parent = parents[rc.parent_number - 1]
        else:
            if rc.parent_number > 1 or not parents:
                raise ApiError(400, "bad parent_number for a non-merge commit")
            parent = parents[0]
        c_tree, p_tree = self.commits[cid]["tree"], self.commits[parent]["tree"]
        head_tree = dict(self.commits[branch["head"]]["tree"])
        for path in set(c_tree) | set(p_tree):
            key = lambda x: None if x is None else x["checksum"]  # noqa: E731
            if key(c_tree.get(path)) == key(p_tree.get(path)):
                continue
            if key(head_tree.get(path)) != key(c_tree.get(path)):
                raise ApiError(409, f"revert conflict at {path}")
            if p_tree.get(path) is None:
                head_tree.pop(path, None)
            else:
                head_tree[path] = p_tree[path]
        branch["head"] = self._new_commit([branch["head"]], head_tree, f"Revert {cid}", {})
        return branch["head"]


class FakeLakeFS:
    """In-memory state plus request routing; one lock serialises every request."""

    def __init__(self, access_key_id: str, secret_access_key: str):
        token = base64.b64encode(f"{access_key_id}:{secret_access_key}".encode()).decode()
        self.auth = f"Basic {token}"
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []  # (method, route) for assertions

    def repo(self, name: str) -> Repo:
        if name not in self.repos:
            raise ApiError(404, f"repository {name!r} not found")
        return self.repos[name]

    @staticmethod
    def _page(items: list, query: dict, key) -> tuple[list, m.Pagination]:
        after = query.get("after", [""])[0]
        amount = int(query.get("amount", ["1000"])[0])
        items = [i for i in items if key(i) > after] if after else items
        page, more = items[:amount], len(items) > amount
        return page, m.Pagination(has_more=more, next_offset=key(page[-1]) if more and page else "",
                                  results=len(page), max_per_page=amount)

    def handle(self, method: str, path: str, query: dict, headers, body: bytes):
        """Returns (status, content-type, bytes, extra headers)."""
        if headers.get("Authorization") != self.auth:
            raise ApiError(401, "authentication required")
        if not path.startswith("/api/v1/"):
            raise ApiError(404, f"no route {path}")
        parts = [unquote(p) for p in path[len("/api/v1/"):].split("/")]
        ids = {1, 3} | ({5} if len(parts) > 5 and parts[4] == "merge" else set())  # ids, not route words
        route = "/".join("{}" if i in ids else p for i, p in enumerate(parts))
        self.calls.append((method, route))
        q = lambda k, d=None: query.get(k, [d])[0]  # noqa: E731

        if (method, route) == ("POST", "repositories"):
            rc = m.RepositoryCreation.from_json(body.decode())
            if rc.name in self.repos:
                raise ApiError(409, "repository exists")
            self.repos[rc.name] = Repo(rc)
            return _json(201, self.repos[rc.name].info)
        repo = self.repo(parts[1])
        if (method, route) == ("GET", "repositories/{}"):
            return _json(200, repo.info)
        if (method, route) == ("POST", "repositories/{}/branches"):
            bc = m.BranchCreation.from_json(body.decode())
            if bc.name in repo.branches:
                raise ApiError(409, f"branch {bc.name!r} exists")
            if not re.match(r"^\w[-\w]*$", bc.name):
                raise ApiError(400, f"invalid branch name {bc.name!r}")
            head = repo.resolve(bc.source)
            repo.branches[bc.name] = {"head": head, "staged": {}}
            return 201, "text/html", head.encode(), {}
        if (method, route) == ("GET", "repositories/{}/branches"):
            page, pag = self._page(sorted(repo.branches), query, key=lambda b: b)
            refs = [m.Ref(id=b, commit_id=repo.branches[b]["head"]) for b in page]
            return _json(200, m.RefList(pagination=pag, results=refs))
        if (method, route) == ("GET", "repositories/{}/branches/{}"):
            return _json(200, m.Ref(id=parts[3], commit_id=repo.branch(parts[3])["head"]))
        if (method, route) == ("POST", "repositories/{}/branches/{}/objects"):
            branch, obj_path = repo.branch(parts[3]), q("path")
            digest = hashlib.sha256(body).hexdigest()
            repo.blobs[digest] = body
            stat = {"checksum": digest, "size_bytes": len(body), "mtime": int(time.time()),
                    "content_type": headers.get("Content-Type", "application/octet-stream")}
            branch["staged"][obj_path] = stat
            return _json(201, _stat(obj_path, stat))
        if (method, route) == ("POST", "repositories/{}/branches/{}/objects/delete"):
            branch = repo.branch(parts[3])
            for p in m.PathList.from_json(body.decode()).paths:
                branch["staged"][p] = None
            return _json(200, m.ObjectErrorList(errors=[]))
        if route == "repositories/{}/refs/{}/objects" and method in ("GET", "HEAD"):
            stat = repo.tree(parts[3]).get(q("path"))
            if stat is None:
                raise ApiError(404, f"object {q('path')!r} not found")
            data = repo.blobs[stat["checksum"]]
            rng = headers.get("Range")
            if method == "HEAD":
                return 200, "application/octet-stream", b"", {"Content-Length": str(len(data))}
            if rng:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return 416, "application/json", b"", {"Content-Range": f"bytes */{len(data)}"}
                return 206, "application/octet-stream", data[start:end + 1], {
                    "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return 200, "application/octet-stream", data, {}
        if (method, route) == ("GET", "repositories/{}/refs/{}/objects/ls"):
            tree = repo.tree(parts[3])
            prefix = q("prefix", "") or ""
            items = sorted(p for p in tree if p.startswith(prefix))
            page, pag = self._page(items, query, key=lambda p: p)
            return _json(200, m.ObjectStatsList(pagination=pag, results=[_stat(p, tree[p]) for p in page]))
        if (method, route) == ("POST", "repositories/{}/branches/{}/commits"):
            cc = m.CommitCreation.from_json(body.decode())
            branch = repo.branch(parts[3])
            if not branch["staged"] and not cc.allow_empty:
                raise ApiError(400, "commit: no changes")
            tree = repo.tree(parts[3])
            branch["head"] = repo._new_commit([branch["head"]], tree, cc.message, cc.metadata or {})
            branch["staged"] = {}
            return _json(201, repo.commit_model(branch["head"]))
        if (method, route) == ("GET", "repositories/{}/commits/{}"):
            return _json(200, repo.commit_model(repo.resolve(parts[3])))
        if (method, route) == ("GET", "repositories/{}/refs/{}/commits"):
            cid = repo.resolve(parts[3])
            if str(q("first_parent")).lower() == "true":  # the SDK sends "True" (bool is an int in its encoder)
                chain = []
                while cid:
                    chain.append(cid)
                    ps = repo.commits[cid]["parents"]
                    cid = ps[0] if ps else None
            else:
                chain = sorted(repo.ancestors(cid), key=lambda c: -repo.commits[c]["generation"])
            amount = int(q("amount", "1000"))
            start = chain.index(q("after")) + 1 if q("after") in chain else 0
            page = chain[start:start + amount]
            more = start + amount < len(chain)
            pag = m.Pagination(has_more=more, next_offset=page[-1] if more else "", results=len(page),
                               max_per_page=amount)
            return _json(200, m.CommitList(pagination=pag, results=[repo.commit_model(c) for c in page]))
        if (method, route) == ("POST", "repositories/{}/refs/{}/merge/{}"):
            merge = m.Merge.from_json(body.decode() or "{}")
            return _json(200, m.MergeResult(reference=repo.merge(parts[3], parts[5], merge)))
        if (method, route) == ("POST", "repositories/{}/tags"):
            tc = m.TagCreation.from_json(body.decode())
            if tc.id in repo.tags and not tc.force:
                raise ApiError(409, f"tag {tc.id!r} exists")
            repo.tags[tc.id] = repo.resolve(tc.ref)
            return _json(201, m.Ref(id=tc.id, commit_id=repo.tags[tc.id]))
        if (method, route) == ("GET", "repositories/{}/tags"):
            page, pag = self._page(sorted(repo.tags), query, key=lambda t: t)
            return _json(200, m.RefList(pagination=pag, results=[m.Ref(id=t, commit_id=repo.tags[t]) for t in page]))
        if (method, route) == ("POST", "repositories/{}/branches/{}/revert"):
            repo.revert(parts[3], m.RevertCreation.from_json(body.decode()))
            return 204, "application/json", b"", {}
        raise ApiError(404, f"not implemented in the fake: {method} {path}")


def _json(status: int, model) -> tuple:
    return status, "application/json", model.to_json().encode(), {}


def _stat(path: str, stat: dict) -> m.ObjectStats:
    return m.ObjectStats(path=path, path_type="object", physical_address=f"mem://{stat['checksum']}",
                         checksum=stat["checksum"], size_bytes=stat["size_bytes"], mtime=stat["mtime"],
                         content_type=stat["content_type"])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeLakeFS

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        url = urlparse(self.path)
        body = self._body()
        try:
            with self.fake.lock:
                status, ctype, data, extra = self.fake.handle(self.command, url.path, parse_qs(url.query),
                                                              self.headers, body)
        except ApiError as err:
            status, ctype, data, extra = err.status, "application/json", \
                m.Error(message=err.message).to_json().encode(), {}
        except Exception as err:  # a bug in the fake or a request the SDK models reject: surface it
            status, ctype, data, extra = 400, "application/json", \
                m.Error(message=f"{type(err).__name__}: {err}").to_json().encode(), {}
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        length = extra.pop("Content-Length", str(len(data)))
        self.send_header("Content-Length", length)
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


class FakeLakeFSServer:
    """``with FakeLakeFSServer(key, secret) as srv:`` — serves on 127.0.0.1, a free port, in a daemon thread."""

    def __init__(self, access_key_id: str = "AKIAFAKE", secret_access_key: str = "fake-secret"):
        self.fake = FakeLakeFS(access_key_id, secret_access_key)
        handler = type("Handler", (_Handler,), {"fake": self.fake})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "FakeLakeFSServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------- release fixtures
_counter = itertools.count()


def make_release(root: Path, passed: bool = True, payload: bytes | None = None, git_sha: str = "0123456789abcdef",
                 files: dict[str, bytes] | None = None) -> Path:
    """A release directory in the ``anyflow export`` format: files + manifest.json (sha256, size, gate)."""
    root = Path(root)
    files = files or {"transformer/model.onnx": payload or f"weights-{next(_counter)}".encode() * 1000,
                      "model_index.json": b'{"_class_name": "AnyFlowPipeline"}'}
    entries = []
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    manifest = {"files": entries, "git_sha": git_sha, "dvc_lock_digest": "d" * 64,
                "gate": {"passed": passed, "total_at_4": 0.81 if passed else 0.42, "teacher_total": 0.8,
                         "failed": [] if passed else ["total_at_4"]}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
