"""Checkpoint file store: one folder of files per key, on a local disk or any fsspec URL.

A key is a relative path such as `"sess-1:train:0/weights/000020"`; its files live in the
folder `<root>/<key>/`. Writes are atomic from a reader's point of view:

1. on a local filesystem, every file is written (and fsynced) into a temporary sibling
   folder `<key>.tmp-<uuid>/` together with a manifest (`.tinsmith-manifest.json`: file
   names and sizes), then the folder is renamed to `<key>`. An existing `<key>` is first
   renamed aside to `<key>.old-<uuid>` and deleted once the new folder is in place.
2. object stores (s3://, gs://, memory://...) have no atomic folder rename, but a single
   object is replaced atomically: the files are written under a fresh version folder
   `<key>/v-<write id>/`, then the manifest (which names that folder) replaces the old one,
   then the old version's objects are deleted. A crash before the manifest leaves the old
   checkpoint in place (plus unreferenced objects, which are never read).

Readers only see a key whose manifest exists, and only the files it lists (in the folder it
names, if any), so a crash at any point leaves either the old checkpoint or the new one,
never a partial one. Leftover `.tmp-*` / `.old-*` folders are never keys: key segments may not
contain those markers. `recover()`, run once at server start-up, deletes the `.tmp-*`
folders a crash left (unpublished writes) and moves an `.old-*` folder back to its key when
a crash came between moving it aside and publishing its replacement.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Mapping

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

MANIFEST = ".tinsmith-manifest.json"
VERSION_PREFIX = "v-"  # object stores: `<key>/v-<write id>/` holds one version's files
_RESERVED = (".tmp-", ".old-")
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # rename: target exists


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"bad checkpoint key {key!r}: must be a non-empty relative path")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"bad checkpoint key {key!r}: empty, '.' or '..' path segment")
        if any(marker in part for marker in _RESERVED):
            raise ValueError(f"bad checkpoint key {key!r}: segments may not contain {_RESERVED}")
    return "/".join(parts)


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST:
        raise ValueError(f"bad checkpoint file name {name!r}")


class CheckpointStore:
    """Folders of checkpoint files under one root (a local path or an fsspec URL)."""

    def __init__(self, root_url: str, *, slow_write_s: float = 0.0) -> None:
        self.root_url = root_url
        self.slow_write_s = slow_write_s  # test-only: a pause after each file written
        self.fs, root = url_to_fs(root_url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:  # object stores have no folders to create (nor buckets to make here)
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, _check_key(key))

    # ----- writing ----------------------------------------------------------------------
    def put(self, key: str, files: Mapping[str, bytes]) -> int:
        """Write `files` under `key`, replacing what was there; returns the payload bytes."""
        path = self._path(key)
        for name in files:
            _check_name(name)
        sizes = {n: len(b) for n, b in files.items()}
        write_id = uuid.uuid4().hex
        record: dict[str, object] = {"id": write_id, "files": sizes}
        if not self.local:
            record["dir"] = f"{VERSION_PREFIX}{write_id}"
        manifest = json.dumps(record, sort_keys=True)
        entries = [*files.items(), (MANIFEST, manifest.encode())]  # manifest last
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            os.makedirs(tmp)
            try:
                for name, data in entries:
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    if self.slow_write_s:
                        time.sleep(self.slow_write_s)
                self._publish_local(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already unless publishing failed
            _fsync_dir(parent)
        else:
            before = set(self._objects(path))
            version = posixpath.join(path, str(record["dir"]))
            for name, data in entries:
                target = path if name == MANIFEST else version  # the manifest publishes
                self.fs.pipe_file(posixpath.join(target, name), bytes(data))
                if self.slow_write_s:
                    time.sleep(self.slow_write_s)
            stale = before - {posixpath.join(path, MANIFEST)}
            if stale:  # the previous version, unreferenced now
                self.fs.rm(sorted(stale))
        return sum(len(b) for b in files.values())

    def _objects(self, path: str) -> list[str]:
        """Every object under `path` (object stores), fresh from the store."""
        self.fs.invalidate_cache(path)
        try:
            return [p for p in self.fs.find(path) if p != path]
        except FileNotFoundError:
            return []

    def _publish_local(self, tmp: str, path: str) -> None:
        olds: list[str] = []
        try:
            for _ in range(10):  # loops again only if another writer publishes meanwhile
                try:
                    os.rename(tmp, path)  # fails if `path` exists and is not empty
                    return
                except OSError as e:
                    if e.errno not in _TAKEN:
                        raise
                old = f"{path}.old-{uuid.uuid4().hex}"
                try:
                    os.rename(path, old)
                    olds.append(old)
                except FileNotFoundError:
                    pass  # another writer moved it aside meanwhile: try again
            raise OSError(f"could not publish checkpoint {path!r}: concurrent writers")
        except BaseException:
            if olds and not os.path.lexists(path):
                os.rename(olds.pop(), path)  # put the previous checkpoint back
            raise
        finally:
            for old in olds:
                shutil.rmtree(old, ignore_errors=True)

    def recover(self) -> list[str]:
        """Clean up after a crash (local stores; object stores leave nothing to clean): delete
        `.tmp-*` folders, put an `.old-*` folder back where its key is missing, delete the
        other `.old-*` ones. Returns what it did, one line each. Run it only while no write
        is in progress (at start-up)."""
        done: list[str] = []
        if not self.local:
            return done
        for parent, dirs, _ in os.walk(self.root):
            changed = False
            for d in sorted(dirs):
                tmp, old = d.rpartition(".tmp-"), d.rpartition(".old-")
                if not (tmp[1] or old[1]):
                    continue
                dirs.remove(d)  # never walk into a leftover
                changed = True
                leftover = os.path.join(parent, d)
                key_path = os.path.join(parent, old[0])
                if old[1] and old[0] and not os.path.lexists(key_path) \
                        and os.path.isfile(os.path.join(leftover, MANIFEST)):
                    os.rename(leftover, key_path)
                    done.append(f"restored {key_path} from {d} (overwrite interrupted)")
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
                    why = "unpublished write" if tmp[1] else "replaced checkpoint"
                    done.append(f"removed {leftover} ({why})")
            if changed:
                _fsync_dir(parent)
        return done

    def delete(self, key: str) -> None:
        """Remove `key` (manifest first, so a crash mid-delete leaves no visible key)."""
        path = self._path(key)
        manifest = posixpath.join(path, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ----- reading ----------------------------------------------------------------------
    def _manifest(self, key: str) -> tuple[str, dict[str, int], str]:
        """(write id, {file name: size}, folder holding the files) of the checkpoint now at
        `key`; the folder is `<key>/` or, on object stores, its version folder."""
        path = self._path(key)
        try:
            raw = self.fs.cat_file(posixpath.join(path, MANIFEST))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise FileNotFoundError(f"no checkpoint at {key!r}") from e
        try:
            manifest = json.loads(raw)
            sizes = {str(n): int(s) for n, s in manifest["files"].items()}
            folder = manifest.get("dir")
            if folder is not None and not str(folder).startswith(VERSION_PREFIX):
                raise ValueError(f"bad version folder {folder!r}")
            return str(manifest["id"]), sizes, posixpath.join(path, folder) if folder else path
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OSError(f"checkpoint {key!r} has a corrupt manifest: {e}") from e

    def exists(self, key: str) -> bool:
        return self.fs.isfile(posixpath.join(self._path(key), MANIFEST))

    def get(self, key: str) -> dict[str, bytes]:
        """All files of `key`; FileNotFoundError if there is no (complete) checkpoint."""
        for attempt in range(20):
            # A concurrent overwrite may replace files mid-read: the read counts only if the
            # manifest (with its unique write id) is the same after it as before it.
            if attempt:
                time.sleep(0.001 * attempt)  # let a writer that keeps overwriting finish one
            write_id, sizes, folder = self._manifest(key)
            try:
                out = {name: self.fs.cat_file(posixpath.join(folder, name)) for name in sizes}
                if self._manifest(key)[0] != write_id:
                    continue
            except FileNotFoundError:
                continue
            bad = [n for n, size in sizes.items() if len(out[n]) != size]
            if bad:
                raise OSError(f"checkpoint {key!r}: files {bad} do not have the sizes recorded")
            return out
        raise OSError(f"checkpoint {key!r} kept changing while being read")

    def size(self, key: str) -> int:
        """Total bytes of the files of `key` (manifest excluded); FileNotFoundError if absent."""
        return sum(self._manifest(key)[1].values())

    def sizes(self, key: str) -> dict[str, int]:
        """{file name: size} of `key` (manifest excluded); FileNotFoundError if absent."""
        return self._manifest(key)[1]

    def read(self, key: str, name: str) -> bytes:
        """One file of `key`; FileNotFoundError if the checkpoint (or that file) is absent."""
        _, sizes, folder = self._manifest(key)
        if name not in sizes:
            raise FileNotFoundError(f"checkpoint {key!r} has no file {name!r}")
        try:
            data = self.fs.cat_file(posixpath.join(folder, name))
        except FileNotFoundError:  # its version was replaced meanwhile
            data = b""
        if len(data) != sizes[name]:  # replaced meanwhile: read it consistently
            data = self.get(key)[name]
        return data


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
