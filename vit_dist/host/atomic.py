"""The one way the project writes a file: an exclusive temporary file in the same folder (created
with O_EXCL, so no planted file or symlink is followed), optionally fsync'd, then renamed over the
target. A reader or a crash sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` for a writer that takes a file name (MindSpore,
    safetensors); on success the file is fsync'd (durable: it vouches for data, as a checkpoint does)
    and renamed to `path`, and the folder entry is fsync'd; on failure it is removed."""
    path = Path(path)
    # The temporary name keeps the target's suffix: MindSpore's writers append one to a name without it.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a fresh private folder beside `path` to fill; on success its files are fsync'd, it takes
    the user's permissions and is renamed to `path`, which must not exist (no folder replaces another
    in one step, so callers refuse an existing one first); on failure it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for written in tmp.iterdir():
            with open(written, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(written, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    """Writes text or bytes to `path` through atomic_path."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # mkstemp makes files 0600; a written file should be readable as the user's umask says.
    mask = os.umask(0)
    os.umask(mask)
    return mask
