"""Folders whose contents the process trusts (compiled graphs it loads and runs, kernel libraries,
the image check's answers) must be the user's own: owned by them and writable by no one else, or
another user could plant what is loaded or believed."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from vit_dist.host.errors import ConfigError


def is_private(path: Path) -> bool:
    """Owned by this user and not writable by group or others (the path itself, not followed)."""
    info = path.lstat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def private_folder(path: str | Path, what: str, fix: str = "use a folder of your own, or chmod go-w it") -> Path:
    """The folder `path` (`what`, as the error names it), made 0700 if missing; refused in one line if
    it is a symlink, not owned by this user, or writable by others."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.is_dir() and not path.is_symlink() and is_private(path):
            return path
        info = path.lstat()
    except OSError as err:
        raise ConfigError(f"cannot make {what} folder {path}: {err.strerror}; {fix}") from None
    raise ConfigError(f"{what} folder {path} is not yours alone (a symlink, another owner, or writable by others: "
                      f"uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); {fix}")
