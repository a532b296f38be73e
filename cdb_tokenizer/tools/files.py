"""Files written whole or not at all: reports, figures, token files and logs are renamed into place once complete."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


def replace_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a file through `write(temporary_path)`, then rename it over `path`: never half a file, never through a
    symlink or into a device (anything but a regular file at `path` raises `FileExistsError`). The temporary file
    sits beside `path` and keeps its suffix, so writers that infer the format from it (matplotlib) still can. The
    file gets the permissions a plain write would give it: those of the file it replaces, else 0o666 less the
    umask (safetensors alone would give 0o600). Returns `path`."""
    path = Path(path)
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a regular file (a link, folder or device); not replacing it.")
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o666 & ~_umask()
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`replace_file` for text (UTF-8); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


__all__ = ["replace_file", "write_text"]
