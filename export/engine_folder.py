"""Replacing an engine folder: whole or not at all, and never a folder that is not an engine.

A build writes into a hidden staging folder beside the target, `.NAME.building.XXXXXXXX`. When it is
complete, its files and the folder itself are fsynced, then swapped in by two renames in the parent
folder: the old engine goes aside (`.NAME.old.XXXXXXXX`), the new one takes NAME, and the old one is
removed last. Renames within one folder are atomic, so NAME is always the whole old engine or the whole
new one; between the two renames any failure renames the old one back, and once the new engine has its
name nothing deletes it.

Two builds of one target would swap each other's folders, so a build holds an advisory lock
(`fcntl.flock` on `.NAME.lock` beside the target) from before its staging folder exists until the swap is
done; a second build fails at once. The lock file is removed on release; a killed build leaves it empty
and unlocked, and the next build reuses and removes it. A killed build can also leave its staging folder
(gigabytes for a real model) or, killed between the two renames, the old engine aside: the next build of
the same target, once it holds the lock, puts such an old engine back if NAME is missing and removes the
rest.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.engine_manifest import FORMAT, MANIFEST
from runtime.errors import Qwen3VLError

STAGING, ASIDE = "building", "old"
MANIFEST_READ_LIMIT = 1 << 24  # a real manifest is a few KB; a bigger file is not one


def check_target(out: str | Path, checkpoint_dir: str | Path) -> None:
    """Refuses an `--out` whose replacement could destroy something a build does not own.

    Symlinks resolved, the target must not be the current directory or the checkpoint folder, nor hold
    either (a folder inside the checkpoint is fine: replacing it never touches the checkpoint's files).
    If it exists it must be an empty folder or an engine: a folder whose manifest.json parses and says
    `"format": "qwen3vl-engine"`."""
    out = Path(out)
    try:
        target, cwd, checkpoint = out.resolve(), Path.cwd().resolve(), Path(checkpoint_dir).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise Qwen3VLError(f"{out}: cannot resolve the path ({exc})") from None
    if _holds(target, cwd):
        raise Qwen3VLError(f"{out}: holds the current directory; refusing to replace it")
    if _holds(target, checkpoint):
        raise Qwen3VLError(f"{out}: holds the checkpoint folder {checkpoint_dir}; refusing to replace it")
    if os.path.lexists(target) and not (target.is_dir() and (is_engine(target) or _is_empty(target))):
        raise Qwen3VLError(f"{out}: exists and is not an engine folder; refusing to replace it")


def is_engine(folder: Path) -> bool:
    """Whether `folder` holds a manifest.json this project wrote (its format field, not just the name)."""
    try:
        with open(folder / MANIFEST, "rb") as f:
            manifest = json.loads(f.read(MANIFEST_READ_LIMIT))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


class EngineReplacement:
    """One build's staging folder and lock: `commit()` swaps the staging folder in for `out`, `abort()`
    throws it away. Either releases the lock; calling `abort()` after `commit()` is harmless."""

    def __init__(self, out: str | Path, checkpoint_dir: str | Path,
                 progress: Callable[[str], None] = lambda message: None):
        self.out = Path(out)
        self.target = self.out.resolve()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Qwen3VLError(f"{self.target.parent}: cannot create the folder ({exc.strerror})") from None
        self._lock_path = self.target.parent / f".{self.target.name}.lock"
        self._lock_fd = _take_lock(self._lock_path, self.out)
        try:
            for message in _sweep(self.target):
                progress(message)
            check_target(self.out, checkpoint_dir)  # again, now that no other build can change it
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.{STAGING}.", dir=self.target.parent))
        except BaseException:
            self._unlock()
            raise

    def commit(self) -> None:
        try:
            self.staging.chmod(0o755)  # mkdtemp made it private
            _sync_tree(self.staging)
            self._swap()
        finally:
            self._unlock()

    def abort(self) -> None:
        # After a swap the staging path no longer exists, so this never touches the new engine.
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._unlock()

    def _swap(self) -> None:
        target, aside = self.target, None
        try:
            if os.path.lexists(target):
                # mkdtemp reserves a unique name; renaming a folder onto an empty one replaces it.
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{ASIDE}.", dir=target.parent))
                os.rename(target, aside)
            os.rename(self.staging, target)
        except BaseException as exc:
            if aside is not None:
                if not os.path.lexists(target):
                    os.rename(aside, target)  # the old engine back
                _remove_if_empty(aside)  # the reserved name, if the old engine never moved
            if isinstance(exc, OSError):
                raise Qwen3VLError(f"{self.out}: cannot put the new engine in place ({exc.strerror or exc}); "
                                   "the old one is unchanged") from None
            raise
        _fsync_dir(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # what remains is swept by the next build

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            os.unlink(self._lock_path)  # while still locked: see _take_lock
        except OSError:
            pass
        os.close(fd)


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:  # unreadable: not known to be empty
        return False


def _holds(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def _take_lock(path: Path, out: Path) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise Qwen3VLError(f"{path}: cannot create the build lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Qwen3VLError(f"{out}: another build is writing this engine folder; "
                                   "wait for it to finish") from None
            raise Qwen3VLError(f"{path}: cannot lock the build lock ({exc.strerror})") from None
        # A finishing build unlinks the lock file before unlocking it: a lock won on that unlinked file
        # guards nothing, so it counts only if the name still leads to the locked file.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise Qwen3VLError(f"{out}: could not take the build lock {path}")


def _sweep(target: Path) -> list[str]:
    """Leftovers of killed builds of `target` (call with the lock held): an old engine left aside goes
    back if `target` is missing; staging folders and other aside folders are removed."""
    name = re.compile(rf"\.{re.escape(target.name)}\.({STAGING}|{ASIDE})\.[a-z0-9_]{{8}}")
    leftovers = [p for p in target.parent.iterdir() if name.fullmatch(p.name) and not p.is_symlink() and p.is_dir()]
    messages = []
    if not os.path.lexists(target):
        old = [p for p in leftovers if name.fullmatch(p.name)[1] == ASIDE and is_engine(p)]
        if old:
            newest = max(old, key=lambda p: p.stat().st_mtime)
            os.rename(newest, target)
            leftovers.remove(newest)
            messages.append(f"put back {newest.name} (an engine left aside by an interrupted build) as {target.name}")
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
        messages.append(f"removed {leftover.name} (left by an interrupted build)")
    return messages


def _sync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for file in files:
            fd = os.open(os.path.join(root, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
