"""Folders whose contents the process loads and runs (compiled graphs, kernel libraries) must be the
user's own: owned by them and writable by no one else, or another user could plant what is loaded."""
from __future__ import annotations

import os
from pathlib import Path

from vit_dist.host.errors import ConfigError


def is_private(path: Path) -> bool:
    """Owned by this user and not writable by group or others (the path itself, not followed)."""
    info = path.lstat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def private_folder(path: str | Path, key: str) -> Path:
    """The folder `path` (config key `key`), made 0700 if missing; refused in one line if it is a
    symlink, not owned by this user, or writable by others."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        private = path.is_dir() and not path.is_symlink() and is_private(path)
    except OSError as err:
        raise ConfigError(f"cannot make {key} folder {path}: {err.strerror}; choose a folder of your own") from None
    if not private:
        raise ConfigError(f"{key} folder {path} is not yours alone (a symlink, another owner, or writable by "
                          f"others), and what it holds would be loaded and run; use a folder of your own, e.g. "
                          f"~/.cache/vit-dist/compile, or chmod go-w it")
    return path
