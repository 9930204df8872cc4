"""Writing files so that nothing is ever half-written: atomic files and folders (a temporary
name in the same folder, fsync, rename; a folder swap that a later call finishes if it was
killed between its renames), normal permissions (0o666/0o777 minus the umask), and SHA-256
checksums of a folder's files in ``checksums.json``, verified when it is read back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from destatic.io.errors import CheckpointError

__all__ = [
    "CHECKSUMS_NAME",
    "atomic_file",
    "atomic_files",
    "atomic_folder",
    "file_sha256",
    "fsync_dir",
    "fsync_file",
    "probe_writable",
    "verify_checksums",
    "write_atomic",
    "write_checksums",
    "write_error_reason",
]

CHECKSUMS_NAME = "checksums.json"  # {"sha256": {file name: hex digest}} beside the files


def write_error_reason(e: BaseException) -> str:
    """The one-line reason of a failed write: ``No space left on device`` for an OSError and
    for safetensors' ``IoError(Os { …, message: "No space left on device" })`` alike."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    found = re.search(r'message: "([^"]*)"', text)
    return found.group(1) if found else (text.splitlines() or [type(e).__name__])[0]


def probe_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` (and its parents) if needed and write, fsync and remove one byte
    there, so a read-only or full disk shows before any work; raises the OSError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = _temp_name(folder, "write-test")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to the disk, where the platform allows."""
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


def _umask() -> int:
    """The process's umask (set back at once: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_file(path: Path, mask: int) -> None:
    """Give a written file the normal mode (0o666 & ~umask; safetensors' writer makes 0o600
    files) and flush it to the disk."""
    os.chmod(path, 0o666 & ~mask)
    fsync_file(path)


def _temp_name(folder: Path, name: str) -> Path:
    """A fresh hidden name in ``folder`` for a file or folder that will become ``name``."""
    return folder / f".tmp-{name}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_files(
    folder: str | os.PathLike, names: Iterable[str], *, checksums: bool = False
) -> Iterator[dict[str, Path]]:
    """Temporary paths (not yet created) in ``folder`` for the files ``names``; once the block
    has written them all they are fsynced and renamed over ``folder/name`` (with ``checksums``:
    ``checksums.json`` too, last). On an error nothing is replaced and the temporaries go.

    Files get the normal umask mode (0o666 & ~umask), not ``mkstemp``'s (or safetensors') 0o600.
    """
    folder = Path(folder)
    names = list(names)
    tmp = {name: _temp_name(folder, name) for name in names}
    try:
        yield tmp
        mask = _umask()
        for path in tmp.values():
            _finish_file(path, mask)
        if checksums:
            tmp[CHECKSUMS_NAME] = _temp_name(folder, CHECKSUMS_NAME)
            _write_checksum_file(tmp[CHECKSUMS_NAME], {n: tmp[n] for n in names})
        for name, path in tmp.items():
            os.replace(path, folder / name)
        fsync_dir(folder)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; it replaces ``path`` (fsynced) when the block
    ends without an error (:func:`atomic_files` for one file)."""
    path = Path(path)
    with atomic_files(path.parent, [path.name]) as tmp:
        yield tmp[path.name]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` (its folder made if needed)
    only once it is whole and on disk (:func:`atomic_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder beside ``dest`` to fill; when the block ends without an error its
    files are fsynced and it takes ``dest``'s place whole. On an error it is removed and
    ``dest`` is untouched.

    An older ``dest`` is first renamed to ``.old-<name>``, removed once the new one is in place.
    A process killed in between leaves the old or the new ``dest`` (at worst only its
    ``.old-<name>``, which the next call puts back) and a hidden temporary folder that the next
    call removes. The folder gets the normal umask mode (0o777 & ~umask), not ``mkdtemp``'s 0o700,
    and its files 0o666 & ~umask.
    """
    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = parent / f".old-{dest.name}"
    _tidy(dest, old)
    tmp = _temp_name(parent, dest.name)
    tmp.mkdir()
    try:
        yield tmp
        mask = _umask()
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _finish_file(path, mask)
        fsync_dir(tmp)
        _swap_in(tmp, dest, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tidy(dest: Path, old: Path) -> None:
    """Undo what a write killed half-way left: put ``old`` back when ``dest`` is gone (killed
    between the two renames), else drop it; remove leftover temporary folders."""
    if old.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dest)
    for stale in dest.parent.glob(f".tmp-{dest.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(new: Path, dest: Path, old: Path) -> None:
    """Rename folder ``new`` to ``dest``, moving an existing ``dest`` aside to ``old`` first
    and back if the second rename fails."""
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksum_file(target: Path, files: dict[str, Path]) -> None:
    """Write ``{"sha256": {name: digest of files[name]}}`` to ``target`` and fsync it."""
    digests = {name: file_sha256(path) for name, path in sorted(files.items())}
    target.write_text(json.dumps({"sha256": digests}, indent=1) + "\n", encoding="utf-8")
    fsync_file(target)


def write_checksums(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Record the SHA-256 of ``folder/name`` for each of ``names`` in ``folder/checksums.json``
    (for a folder being filled before :func:`atomic_folder` moves it into place)."""
    folder = Path(folder)
    _write_checksum_file(folder / CHECKSUMS_NAME, {n: folder / n for n in names})


def verify_checksums(
    folder: str | os.PathLike, *, required: bool = False, fix: str | None = None
) -> None:
    """Check every file ``folder/checksums.json`` lists against its SHA-256.

    safetensors files carry no checksum of their own: a flipped bit in a tensor loads without a
    word. A mismatch, a listed file that is gone, or (``required``) no ``checksums.json`` at all
    is a CheckpointError ending in ``fix`` (None: re-save or re-download the folder; "": no
    advice). A folder without the file (diffusers' own, or saved by an older destatic) passes
    when not required.
    """
    folder = Path(folder)
    if fix is None:
        fix = (
            f"re-save or re-download {folder} (if you edited a file on purpose, delete "
            f"{CHECKSUMS_NAME})"
        )
    tail = f"; {fix}" if fix else ""
    path = folder / CHECKSUMS_NAME
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing, so the files cannot be verified{tail}")
        return
    try:
        digests = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise TypeError("not a {name: digest} object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}){tail}") from e
    for name, digest in sorted(digests.items()):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {CHECKSUMS_NAME}){tail}")
        try:
            actual = file_sha256(file)
        except OSError as e:
            raise CheckpointError(f"{file} is unreadable ({e.strerror or e}){tail}") from e
        if actual != digest:
            raise CheckpointError(
                f"{file} does not match its SHA-256 in {CHECKSUMS_NAME}: it changed after it "
                f"was saved (a damaged disk or copy){tail}"
            )
