"""Files written whole or not at all: reports, figures, token files and logs are renamed into place once complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

# Marks of the folders the training scripts write, here so that the CLI, which must not import accelerate or the
# prior code, can tell a --model folder that is one of them. A complete training checkpoint (tools/checkpoints.py):
CHECKPOINT_MANIFEST = "cdb_vq_checkpoint.json"
# A saved prior (tools/priors/model.py):
PRIOR_CONFIG_NAME = "prior_config.json"


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 in hex, read in 1 MiB blocks (teacher and Inception checkpoints are up to ~1.7 GB; Python
    3.10 has no `hashlib.file_digest`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_location(target: str | Path, base: str | Path) -> str | None:
    """`target` as a path relative to the folder `base` ("../tok", "./tok": the leading dot keeps it from being read
    as a Hub id), or None where it would pass through / or a folder of home folders (/home, /Users): from there it
    would spell out the absolute path and a user name, which files that are shared must not carry."""
    target, base = Path(target).expanduser().resolve(), Path(base).expanduser().resolve()
    relative = os.path.relpath(target, base)
    common = Path(os.path.commonpath([target, base]))
    if common == Path(common.anchor) or common in _home_folders_parents():
        return None
    return relative if relative.startswith("..") else os.path.join(".", relative)


def _home_folders_parents() -> set[Path]:
    """Folders whose sub-folders are users' homes: /home, /Users, and the parents of this user's home."""
    folders = {Path("/home"), Path("/Users")}
    home = os.path.expanduser("~")  # left as "~" without HOME or a passwd entry
    if home != "~":
        folders |= set(Path(home).resolve().parents)
    return folders


def create_folders(path: str | Path) -> list[Path]:
    """Create the folder `path` and its missing parents as `mkdir -p` does, and return the folders this call
    created, outermost first (never one that existed, or that another process made meanwhile), so that a failed
    command can remove exactly those (for `ghost/../out`, `mkdir -p` makes `ghost` as well, and it is returned)."""
    path = Path(path)  # as given: its callers go on to use this path, not an expanded `~`
    created = []
    try:
        for depth in range(1, len(path.parts) + 1):
            folder = Path(*path.parts[:depth])
            if os.path.lexists(folder):
                continue
            try:
                folder.mkdir()
            except FileExistsError:  # made by another process meanwhile: not ours to remove
                continue
            created.append(folder)
        if not path.is_dir():  # a file (or a link to one) stands where the folder should be
            raise FileExistsError(errno.EEXIST, "exists and is not a folder", str(path))
    except OSError:  # a deeper folder could not be made (a name too long, no inodes): the caller never sees these
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return created


# The output folders this process writes into, each with its lock: held until the command or run ends
# (`output_dir_claims`) or the process does (the OS drops an flock then, also after a crash), so a second run cannot
# write there, or --overwrite_output_dir delete, meanwhile. Here, not in tools/runs.py, because the CLI (which must
# not import accelerate) locks `cdb-vq tokenize`'s --out with it too.
OUTPUT_DIR_LOCK = ".cdb-vq-run.lock"
_claimed_output_dirs: dict[Path, FileLock] = {}
# The folders each run created for its output folder (`create_folders`): removed when the run ends while they hold
# nothing but the lock (a refused or failed run leaves no folder behind that holds only a lock file).
_created_output_dirs: dict[Path, list[Path]] = {}


def claim_output_dir(output_dir: Path, created: list[Path] | None = None, flag: str = "--output_dir") -> str | None:
    """Lock `output_dir` (which must exist; `created`: the folders this run made for it; `flag`: how the user named
    it) for this process's run; returns None, or why another run holds it. Where no lock can be taken (a lock file
    another user left, a file system without locks), the run goes on unguarded, with a warning."""
    key = output_dir.resolve()
    if key in _claimed_output_dirs:
        return None
    lock = FileLock(output_dir / OUTPUT_DIR_LOCK, timeout=0, mode=0o666)  # 0o666: others sharing the folder
    try:
        lock.acquire()
    except Timeout:
        return (f"Another run is writing to {flag} {output_dir} now (it holds {OUTPUT_DIR_LOCK}); wait for it to end, "
                f"or choose another {flag}.")  # fmt: skip
    except (OSError, NotImplementedError) as error:
        logger.warning(f"Could not lock {flag} {output_dir} ({error}): a second run there at the same time would not "
                       "be refused.")  # fmt: skip
        return None
    _claimed_output_dirs[key] = lock
    if created:
        _created_output_dirs[key] = created
    return None


@contextlib.contextmanager
def output_dir_claims() -> Iterator[None]:
    """Release, on leaving, the output folders claimed inside (a notebook or a test session trains on afterwards);
    also a decorator."""
    before = set(_claimed_output_dirs)
    try:
        yield
    finally:
        for key in set(_claimed_output_dirs) - before:
            lock = _claimed_output_dirs.pop(key)
            # Removed while the lock is held: a run that claims the folder meanwhile finds it locked, or makes a new
            # lock file whose presence stops the removal (a run between making the folder and opening its lock can
            # still lose the folder: a narrow race, accepted).
            _remove_if_only_the_lock(key, _created_output_dirs.pop(key, []))
            lock.release()


def _remove_if_only_the_lock(output_dir: Path, created: list[Path]) -> None:
    """When `output_dir` holds nothing but its lock file, remove the lock file, then the folders in `created` (those
    this run made for it), deepest first; leave anything else as it is (a folder the user made stays, empty)."""
    try:
        if [path.name for path in output_dir.iterdir()] != [OUTPUT_DIR_LOCK]:
            return
        (output_dir / OUTPUT_DIR_LOCK).unlink()
        for folder in reversed(created):
            folder.rmdir()  # an OSError once a folder is not empty
    except OSError:  # gone already, or files arrived meanwhile
        pass


def replace_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a file through `write(temporary_path)`, then rename it over `path`: never half a file, never through a
    symlink or into a device (anything but a regular file at `path` raises `FileExistsError`). The temporary file
    sits beside `path` and keeps its suffix, so writers that infer the format from it (matplotlib) still can. The
    file gets the permissions a plain write would give it: those of the file it replaces, else 0o666 less the
    umask (safetensors alone would give 0o600). Returns `path`."""
    path = Path(path)
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a regular file (a link, folder or device); not replacing it.")
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else plain_file_mode()
    # A fresh name made with O_EXCL: a predictable one could be a link planted by another user of a shared folder.
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as error:  # named by the file asked for, not the hidden temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as error:  # a system error (a full disk) named no file, or the hidden temporary: name `path`
        if error.errno is None:  # a writer's own error (PIL: "cannot write mode RGBA as JPEG"): as it is
            raise
        raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`replace_file` for text (UTF-8); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def staged_files(folder: str | Path) -> Iterator[Callable[[Path], Path]]:
    """Write a set of files all or none. `stage(target)` gives the path to write `target`'s content to, in a hidden
    folder inside `folder`; when the block ends without an error every staged file is moved into place
    (`replace_file`), otherwise none is. The staging folder is removed either way. Targets must be on `folder`'s
    file system (in it or its sub-folders)."""
    staging = Path(tempfile.mkdtemp(prefix=".staged-", dir=folder))
    moves: list[tuple[Path, Path]] = []

    def stage(target: Path) -> Path:
        path = staging / f"{len(moves)}{Path(target).suffix}"
        moves.append((path, Path(target)))
        return path

    try:
        yield stage
        for path, target in moves:
            replace_file(target, lambda temporary, path=path: os.replace(path, temporary))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plain_file_mode() -> int:
    """The permissions a plain `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def share_safetensors(paths: Iterable[Path]) -> None:
    """Give safetensors files just written the permissions of any other file written beside them: safetensors
    creates them 0o600, so teammates on a shared cluster could read a run's configs but not its weights. Only the
    files given (`saved_weights` for what `save_pretrained` wrote): others in the folder may be the user's own."""
    mode = plain_file_mode()
    for path in paths:
        if path.suffix == ".safetensors" and not path.is_symlink() and path.is_file():
            os.chmod(path, mode)


def saved_weights(folder: str | Path) -> list[Path]:
    """The weight files transformers loads from `folder`, in its order: model.safetensors if there is one (a stale
    one beside newer shards still shadows them), else model.safetensors.index.json and the shards it lists, else
    none. Raises `FileNotFoundError` for a listed shard that is missing and `ValueError` for an index that is not
    JSON."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except json.JSONDecodeError as error:
        raise ValueError(f"{index} is not valid JSON: {error}") from None
    # Names only: a path in the index must not reach a file outside the folder.
    shards = [folder / Path(name).name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"{index.name} lists {missing[0]}, which is not in {folder}.")
    return [index, *shards]


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


__all__ = [
    "OUTPUT_DIR_LOCK",
    "claim_output_dir",
    "create_folders",
    "file_sha256",
    "output_dir_claims",
    "plain_file_mode",
    "replace_file",
    "saved_weights",
    "share_safetensors",
    "staged_files",
    "write_text",
]
