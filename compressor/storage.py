"""Where things live on disk and how they get there safely.

Every artifact is written into a temporary sibling folder, fsynced and renamed into place,
so a crash never leaves a half-written artifact under its final name. `stage.json` records
the sha256 of every file, so a corrupted artifact is detected on use and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import platformdirs

from . import UserError
from .progress import say

MANIFEST = "stage.json"


def home() -> Path:
    """The cache root: `$COMPRESSOR_HOME` if set, else the platform's user cache dir."""
    root = os.environ.get("COMPRESSOR_HOME") or platformdirs.user_cache_dir("compressor")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(obj: Any) -> str:
    """A stable short hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in exclude
    }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on `path`. With wait=False a held lock is a UserError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise UserError(f"{what} is in use by {holder}; wait for it or use another --out") from None
            say(f"waiting for {what} (locked by another process) ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """A run's output folder, held by one process at a time (a second is refused). When the
    work fails before writing anything and the folder was made for it, it goes again: a failed
    command leaves nothing behind."""
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with locked(out / ".lock", f"output folder {out}", wait=False):
            yield out
    except BaseException:
        if fresh and {p.name for p in out.iterdir()} <= {".lock"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


class Store:
    """Content-addressed artifacts: `root/<key>/` holds an HF model folder plus stage.json.

    Keys hash everything that determines an artifact, so two recipes with a common prefix of
    stages share those artifacts and a rerun finds them.
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else home() / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def scratch(self, key: str) -> Path:
        """A folder that survives a crash, for a stage's in-progress checkpoints."""
        path = self.root / ".partial" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, key: str):
        return locked(self.root / ".locks" / f"{key}.lock", f"artifact {key}")

    def get(self, key: str, verify: bool = True) -> dict | None:
        """The manifest of a finished artifact, or None. A corrupt one is removed."""
        folder = self.path(key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = read_json(manifest_path)
        if verify:
            actual = file_hashes(folder)
            if actual != manifest.get("files"):
                bad = sorted(set(actual.items()) ^ set(manifest.get("files", {}).items()))
                names = sorted({name for name, _ in bad})
                say(f"artifact {key} is corrupt ({', '.join(names)} changed): rebuilding")
                shutil.rmtree(folder, ignore_errors=True)
                return None
        return manifest

    @contextlib.contextmanager
    def build(self, key: str, manifest: dict) -> Iterator[Path]:
        """Yield a temp folder to write the artifact into; on success, hash, record, rename."""
        start = time.time()
        with atomic_dir(self.path(key)) as tmp:
            yield tmp
            manifest = dict(manifest, key=key, files=file_hashes(tmp))
            manifest.setdefault("seconds", round(time.time() - start, 3))
            write_json(tmp / MANIFEST, manifest)
        shutil.rmtree(self.root / ".partial" / key, ignore_errors=True)


def recipe_path(path: str, info) -> str:
    """A path from a recipe, made absolute against the recipe's folder (pydantic context
    `base`); absolute paths and `~` are kept, and so is everything when there is no context."""
    base = (info.context or {}).get("base") if info is not None else None
    expanded = Path(os.path.expandvars(path)).expanduser()
    if base is None or expanded.is_absolute():
        return str(expanded)
    return str((Path(base) / expanded).resolve())
