"""The `cdb-vq` command line: images to tokens and back, reconstruction, evaluation, inspection, tokenised data sets.

```bash
cdb-vq encode photos/*.jpg --model org/cdb-vq --out tokens.safetensors
cdb-vq decode tokens.safetensors --out decoded/
cdb-vq reconstruct photos/*.jpg --model org/cdb-vq --out reconstructions/ [--role-map]
cdb-vq restore blurred/*.jpg --model org/cdb-vq-deblur --out restored/
cdb-vq eval --model org/cdb-vq --data held_out_photos/ [--fid]
cdb-vq inspect --model org/cdb-vq [--codes codes.csv]
cdb-vq tokenize --model org/cdb-vq --data photos/ --out tokenized/
```

Every command takes `--model` as a Hub repo id or a local folder written by `save_pretrained`, and `--device` /
`--dtype`. Errors are one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import stat
import sys
import traceback
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..configuration_cdb_vq import expand_home
from . import files
from .downloads import hub_offline
from .loading import (
    COMMIT_HASH,
    held_library_logs,
    is_local_path,
    locate,
    processor_image_size,
    show_log_records,
    snapshot_commit,
)
from .messages import (
    TRAIN_EXTRAS,
    OneLineErrorParser,
    counted,
    first_line,
    interruption_status,
    listed,
    sigterm_as_interruption,
)


TOKEN_FILE_FORMAT = "cdb-vq-tokens"
TOKEN_FILE_VERSION = "1"
_NUMBER = re.compile(r"[-+]?(\d[\d.,]*|inf|nan)%?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Images larger than this many pixels are refused before they are decoded (--max_image_pixels; 0: no limit).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class CLIError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit."""


class LoadedModel(NamedTuple):
    """What `load_model` returns: the tokenizer, where it came from and which codebook it has."""

    model: Any
    processor: Any
    model_id: str  # the Hub id, or the folder's absolute path
    fingerprint: str  # `codebook_fingerprint` of the model as saved (before any dtype cast)
    revision: str | None  # the Hub commit the files came from; None for a local folder


# ----------------------------------------------------------------------------------------------------------------
# Loading models and images
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """`device` as a torch.device; CUDA when available if not given."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a device torch knows (try cpu, cuda or cuda:0).") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} asked for CUDA, but no CUDA GPU is available; use --device cpu.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():  # it failed only after the model loaded
        raise CLIError(f"--device {device} asked for Apple's MPS, which is not available here; use --device cpu.")
    return resolved


def codebook_fingerprint(model) -> str:
    """A short hash of the codebook: tokens are only meaningful to a model with the same codes."""
    codes = model.quantizer.codes().detach().float().cpu().contiguous()
    return hashlib.sha256(codes.numpy().tobytes()).hexdigest()[:16]


def load_model(
    name_or_path: str,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a cdb-vq tokenizer from a local folder or a Hub repo id, in eval mode on `device` in `dtype`.

    The folder's `config.json` is read as plain JSON first, so a model of another kind is refused before anything of
    it is loaded. Without `trust_remote_code` the classes of this package load the weights: code shipped with the
    folder or repository (`auto_map`) never runs. `revision` (a branch, tag or commit) applies to Hub ids only; the
    commit it resolves to when config.json is fetched is the one every other file is loaded from, so a repository
    updated meanwhile cannot mix two versions.
    """
    from .loading import load_tokenizer

    device = resolve_device(device)
    try:
        folder = locate(name_or_path, "--model")
    except FileNotFoundError as error:
        raise CLIError(str(error)) from None
    if revision is not None and folder is not None:
        raise CLIError(f"--revision {revision} applies to Hub models; {name_or_path} is a local folder.")
    # Before config.json, which a prior has too (its language model's).
    if folder is not None and (folder / files.PRIOR_CONFIG_NAME).is_file():
        raise CLIError(f"--model {name_or_path} is a prior (train_prior.py), not a tokenizer; sample it with "
                       f"training/sample_prior.py --prior.")  # fmt: skip
    if folder is not None and not (folder / "config.json").is_file():
        raise CLIError(f"--model {name_or_path} has no config.json: {_what_the_folder_is(folder)}")
    model_id = name_or_path if folder is None else str(folder.resolve())
    # The config first, as data (one small file): a model of another kind is refused before its weights or code load.
    config, revision = _read_model_config(name_or_path, model_id, revision)
    model_type = config.get("model_type")
    if model_type is None:
        raise CLIError(f"--model {name_or_path}: its config.json has no model_type, so it is no saved cdb-vq tokenizer.")
    if model_type != "cdb_vq":
        raise CLIError(f"--model {name_or_path} is a {model_type!r} model, not a cdb-vq tokenizer.")
    try:
        with held_library_logs() as records, warnings.catch_warnings():
            # torch's warning about a pickle's protocol is several lines, and the error below says what matters.
            warnings.filterwarnings("ignore", message=".*weights_only", category=UserWarning)
            hub_options = {} if revision is None else {"revision": revision}
            model, processor = load_tokenizer(model_id, trust_remote_code=trust_remote_code, **hub_options)
    except Exception as error:  # noqa: BLE001 - missing, corrupt or mismatched weights, bad config values, Hub errors
        if any(words in str(error) for words in ("ignore_mismatched_sizes", "size mismatch", "do not fit the config")):
            # transformers' message points at its LOAD REPORT table (held back): name the weights that do not fit.
            raise CLIError(_misfit_message(name_or_path, model_id)) from None
        if "deserializing header" in str(error):  # safetensors' own words for a cut or damaged file
            raise CLIError(
                f"could not load model {name_or_path!r}: its weights file (model.safetensors) is damaged or incomplete "
                f"({first_line(error)}); download or save it again."
            ) from None
        show_log_records(records)
        raise CLIError(f"could not load model {name_or_path!r}: {first_line(error)}") from None
    show_log_records(records)  # e.g. the table of weights missing from the file: the model loads, the warning stays
    fingerprint = codebook_fingerprint(model)
    model.to(device=device, dtype=DTYPES[dtype])
    return LoadedModel(model, processor, model_id, fingerprint, revision)


def _what_the_folder_is(folder: Path) -> str:
    """The end of the refusal of a --model folder without config.json: a training checkpoint or a run's folder of
    them, each said with what to give instead; else that it is no saved model."""
    run_advice = ("a run saves its model in its --output_dir when it ends; one that stopped early saves it when run "
                  "again with its flags, --resume_from_checkpoint latest and --max_train_steps at its last "
                  "checkpoint's step")
    if (folder / files.CHECKPOINT_MANIFEST).is_file():
        return f"it is a training checkpoint, not a saved model ({run_advice})."
    # The run's checkpoints folder, or the run's own folder before its model is saved.
    found = [path for pattern in ("checkpoint-*", "checkpoints/checkpoint-*") for path in folder.glob(pattern)]
    complete = [path for path in found if (path / files.CHECKPOINT_MANIFEST).is_file()]
    checkpoints = sorted(str(path.relative_to(folder)) for path in complete)
    if checkpoints:
        return f"it holds training checkpoints ({listed(checkpoints, 3)}), not a saved model ({run_advice})."
    return "it is not a saved model folder."


def load_model_of(args: argparse.Namespace) -> LoadedModel:
    """`load_model` with a command's --model, --device, --dtype, --trust-remote-code and --revision; in commands that
    read images, its image processor's output size is held to --max_image_pixels, as the input images are."""
    loaded = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.revision)
    if hasattr(args, "max_image_pixels"):
        check_processor_size(loaded.processor, args.max_image_pixels, args.model)
    return loaded


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it): a broken pipe elsewhere (a
    socket during a download) is a failure to report, not a reader that had enough."""
    import select

    try:
        stdout = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (captured): the pipe was another
        return False
    if not hasattr(select, "poll"):  # Windows: take it for stdout's, as before this check
        return True
    poller = select.poll()
    poller.register(stdout, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _size_text(height: int, width: int) -> str:
    """`HxW pixels`, with megapixels from one megapixel on."""
    pixels = height * width
    return f"{height}x{width} pixels" + (f" ({pixels / 1e6:.1f} megapixels)" if pixels >= 1e6 else "")


def _budget(max_pixels: int) -> str:
    """The pixel budget for a message (a 10-pixel budget read "the 1e-05-megapixel budget")."""
    amount = f"{max_pixels / 1e6:g} megapixel{'s' * (max_pixels != 1e6)}" if max_pixels >= 1e6 else f"{max_pixels:,} pixels"
    return f"the budget of {amount} (--max_image_pixels)"


def check_processor_size(processor, max_pixels: int, name: str) -> None:
    """Refuse an image processor that resizes every image past the pixel budget (a mistyped size in a shared
    preprocessor_config.json): small input images pass the budget, and the resize then ran out of memory."""
    if processor is None or not getattr(processor, "do_resize", True):  # its `size` is then unused
        return
    size = processor_image_size(processor)
    shortest = (getattr(processor, "size", None) or {}).get("shortest_edge")
    height, width = size or ((shortest, shortest) if isinstance(shortest, int) else (0, 0))
    if max_pixels and height * width > max_pixels:
        raise CLIError(
            f"--model {name}: its image processor makes images of {'at least ' if size is None else ''}"
            f"{_size_text(height, width)}, over {_budget(max_pixels)}; fix `size` in its preprocessor_config.json, or "
            f"raise --max_image_pixels (0: no limit)."
        )


def _misfit_message(name: str, model_id: str) -> str:
    """One line for weights whose shapes do not fit the config (`from_pretrained`'s size-mismatch error)."""
    misfits = _weight_misfits(model_id)
    more = f"and {len(misfits) - 1} more; " if len(misfits) > 1 else ""
    detail = f": {misfits[0]} ({more}" if misfits else " ("
    return f"the weights in {name} do not fit its config.json{detail}a changed size such as codebook_size?)"


def _weight_misfits(model_id: str) -> list[str]:
    """The weights of a local model folder whose shapes in its safetensors files differ from those its config.json
    gives, as "name is (a, b) in the file but (c, d) for the config", parameters first. Empty when they cannot be
    compared (a Hub id, no safetensors files, a config this package's classes cannot build)."""
    from safetensors import safe_open

    from ..configuration_cdb_vq import CDBVQConfig
    from ..modeling_cdb_vq import CDBVQModel

    folder = Path(model_id)
    if not folder.is_dir():
        return []
    try:
        # The files transformers loads (a model.safetensors before the shards of an index), the index left out.
        weights = [path for path in files.saved_weights(folder) if path.suffix == ".safetensors"]
        stored = {}
        for path in weights:
            with safe_open(str(path), framework="pt") as handle:
                stored |= {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        with torch.device("meta"):  # shapes only: no memory, no initialisation work
            model = CDBVQModel(CDBVQConfig.from_pretrained(folder))
    except Exception:  # noqa: BLE001 - only a diagnosis: the caller falls back to a general message
        return []
    return [
        f"{name} is {stored[name]} in the file but {tuple(tensor.shape)} for the config"
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
        if name in stored and stored[name] != tuple(tensor.shape)
    ]


def _read_model_config(name: str, model_id: str, revision: str | None = None) -> tuple[dict, str | None]:
    """The model's config.json as plain JSON (never through a config class, which may be remote code), and for a Hub
    id the commit it came from (the cache keeps each commit's files in a folder named by its hash)."""
    try:
        if Path(model_id).is_dir():
            config_file = Path(model_id) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            with held_library_logs() as records:  # its retries: the error below says what matters
                config_file = Path(hf_hub_download(model_id, "config.json", revision=revision))
            show_log_records(records)
            revision = snapshot_commit(config_file) or revision
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CLIError(f"--model {name}: config.json is not valid JSON ({first_line(error)}).") from None
    except Exception as error:  # noqa: BLE001 - Hub errors (not found, offline, gated) have no common base class
        not_cached = type(error).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
        if hub_offline() and not_cached:  # huggingface_hub asks to check the connection, which the user turned off
            what = f"its revision {revision!r}" if revision else "it"
            raise CLIError(f"could not load model {name!r}: {what} is not in the Hugging Face cache, and "
                           f"HF_HUB_OFFLINE is set.") from None  # fmt: skip
        raise CLIError(f"could not load model {name!r}: {first_line(error)}") from None
    if not isinstance(config, dict):
        raise CLIError(f"--model {name}: config.json does not hold a JSON object.")
    return config, revision


def check_image_files(paths: Sequence[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[Path]:
    """Check that every path is a file PIL can open as an image within the pixel budget (header only: quick)."""
    checked = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            # exists() is False for a link that leads nowhere, which is no missing file
            problem = "a broken symbolic link (or a link loop)" if path.is_symlink() else "no such file"
            raise CLIError(f"{name}: {problem}.")
        if not path.is_file():
            kind = "is a directory, not an image file" if path.is_dir() else "not a regular file"
            raise CLIError(f"{name}: {kind}.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    size = image.size
        except Image.DecompressionBombError:
            raise CLIError(f"{name}: the image is too large to decode safely (a decompression bomb?).") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise CLIError(f"{name}: not an image file (PIL cannot read it).") from None
        if max_pixels and size[0] * size[1] > max_pixels:
            raise CLIError(
                f"{name}: {_size_text(size[1], size[0])} is over {_budget(max_pixels)}; shrink it first or raise "
                f"--max_image_pixels."
            )
        checked.append(path)
    if not checked:
        raise CLIError("no images given.")
    return checked


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as RGB, upright (EXIF orientation applied; transparent images on white), or a one-line error."""
    from .data import decode_image

    errors: list[Exception] = []
    image = decode_image(path, max_pixels=max_pixels, errors=errors)
    if image is None:
        # PIL fails with OSError on a damaged file; anything else (NaN in a float TIFF, ...) says what is wrong.
        if errors and not isinstance(errors[0], OSError):
            raise CLIError(f"{path}: the image cannot be used: {first_line(errors[0])}")
        raise CLIError(f"{path}: the image file is broken or truncated (PIL cannot decode it).")
    return image


def _unsafe_in_names(character: str) -> bool:
    """Not a letter, mark or digit of any script (写真, фото and किताब's vowel signs stay), nor one of `._+=@-`."""
    return character not in "._+=@-" and unicodedata.category(character)[0] not in "LMN"


def safe_name(name: str, fallback: str) -> str:
    """A file stem that stays inside the output folder on any system: no separators, no leading dots, not empty,
    at most 200 bytes of UTF-8 (file systems limit names to 255 bytes). Each run of other characters becomes `_`."""
    stem = Path(unicodedata.normalize("NFC", str(name)).replace("\\", "/")).name
    parts = itertools.groupby(stem, _unsafe_in_names)
    cleaned = "".join("_" if unsafe else "".join(run) for unsafe, run in parts).lstrip(".")
    return cleaned.encode()[:200].decode(errors="ignore") or fallback


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with a numeric suffix (photos/a.jpg and other/a.png -> a, a-1).

    Unique also without regard to case (a.png and A.png would be one file on macOS and Windows) and against the
    suffixed names themselves (a.png, a.jpg and a-1.png give a, a-2 and a-1).
    """
    stems = [safe_name(path.stem, f"image-{index:05d}") for index, path in enumerate(paths)]
    reserved = {stem.casefold() for stem in stems}
    used: set[str] = set()
    names = []
    for stem in stems:
        name, count = stem, 0
        while name.casefold() in used or (count and name.casefold() in reserved):
            count += 1
            name = f"{stem}-{count}"
        used.add(name.casefold())
        names.append(name)
    return names


# What a file name's suffix says it holds, for names of another kind than a command writes.
FILE_KINDS = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"), "an image"),
    ".safetensors": "a safetensors", ".json": "a JSON", ".csv": "a CSV", ".txt": "a text", ".npy": "a NumPy",
    ".npz": "a NumPy", **dict.fromkeys((".pt", ".pth", ".bin", ".ckpt", ".pkl"), "a pickle"),
}  # fmt: skip


def check_output_file(
    out: str, example: str = "tokens.safetensors", option: str = "--out", overwrite: bool = False
) -> Path:
    """--out (or `option`) for a file: a new path, or with `overwrite` a regular file to replace (never a folder, a
    name ending in a separator, a device, FIFO or symlink, or a name whose suffix says another kind of file than
    `example`'s), in a folder this process may write. `example` is the file name the messages suggest."""
    if not out:  # Path("") is the current folder
        raise CLIError(f"{option} is empty; give a file name such as {example}.")
    path = Path(out)
    if out.endswith(("/", os.sep)) or (os.altsep and out.endswith(os.altsep)):
        raise CLIError(f"{option} {out} names a folder; give a file name such as {path / example}.")
    given, written = (FILE_KINDS.get(Path(name).suffix.lower()) for name in (out, example))
    if given and written and given != written:  # `encode --out tokens.png` wrote safetensors under an image's name
        raise CLIError(f"{option} {out} names {given} file, but this writes {written} file; give a name such as "
                       f"{example}.")  # fmt: skip
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise CLIError(f"{option} {out} is a symbolic link; give a new path or a regular file to replace.")
        if stat.S_ISDIR(mode):
            raise CLIError(f"{option} {out} is a folder; give a file name such as {path / example}.")
        if not stat.S_ISREG(mode):
            raise CLIError(f"{option} {out} is not a regular file (a device, FIFO or socket); give a new path.")
        if not overwrite:
            raise CLIError(f"{option} {out} exists; pass --overwrite to replace it, or give a new path.")
    parent = next((folder for folder in path.parents if os.path.lexists(folder)), Path("."))
    if not parent.is_dir():
        raise CLIError(f"{option} {out}: {parent} is a file, not a folder.")
    try:
        make_folder(path.parent)
    except OSError as error:
        raise CLIError(f"{option} {out}: cannot create its folder ({first_line(error)}).") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):  # found now, not after the work
        raise CLIError(f"{option} {out}: its folder is not writable.")
    return path


def check_output_folder(out: str) -> Path:
    """--out for a folder: a new path or an existing folder, which may be a link to one (the user named it); never
    a file, device or FIFO."""
    if not out:  # Path("") is the current folder
        raise CLIError("--out is empty; give a folder such as out/.")
    return _check_folder(Path(out), f"--out {out}", allow_link=True)


def check_output_subfolder(out: Path, name: str) -> Path:
    """A folder the command makes inside --out (`out/name`): as --out, but never a link, which would send the
    command's writes wherever whoever placed it chose."""
    return _check_folder(out / name, str(out / name), allow_link=False)


def _check_folder(path: Path, label: str, allow_link: bool) -> Path:
    """Create `path` (and its parents) if it is new; refuse a file, device or FIFO, a folder that is not writable,
    and unless `allow_link`, a link (`is_dir` follows it). `label` names it in messages."""
    if os.path.islink(path) and not allow_link:
        raise CLIError(f"{label} is a symbolic link; give a new path or a folder that is not a link.")
    if os.path.lexists(path) and not path.is_dir():
        raise CLIError(f"{label} exists and is not a folder; give a new path or a folder.")
    try:
        make_folder(path)
    except OSError as error:
        raise CLIError(f"{label}: cannot create the folder ({first_line(error)}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CLIError(f"{label}: the folder is not writable.")
    return path


def _file_id(path: Path) -> tuple[int, int] | None:
    """What makes a file the same file under any name (hard links, `..`, links to it); None when there is none."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def refuse_overwriting_inputs(outputs: Sequence[Path], inputs: Iterable[Path], option: str = "--out") -> None:
    """Refuse up front an output file (of the flag `option`) that is one of the inputs (by any name): it would be
    replaced by what was made from it. Only outputs that exist can be; `inputs` (which may be long: a data set's
    files) is read only then."""
    existing = {file_id: path for path in outputs if (file_id := _file_id(path)) is not None}
    if not existing:
        return
    for source in inputs:
        output = existing.get(_file_id(source))
        if output is not None:
            raise CLIError(f"{output} would replace the input {source} (the same file); give another {option}.")


def local_model_files(name: str | None) -> list[Path]:
    """The files of a local `--model` folder: inputs too, which an output must never replace (`--overwrite`
    included: the weights being read). Empty for a Hub id, or for a name `load_model` will refuse anyway."""
    try:
        folder = locate(name, "--model") if name else None
    except FileNotFoundError:
        return []
    return [path for path in folder.iterdir() if path.is_file()] if folder is not None else []


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file in `folder` and its sub-folders (an image folder data set's inputs)."""
    for parent, _, names in os.walk(folder):
        yield from (Path(parent) / name for name in names)


# The folders this command created, parents first: `main` removes those still empty when the command fails.
_created_folders: list[Path] = []


def make_folder(path: Path) -> None:
    """Create `path` and its parents, remembering the folders it creates (`files.create_folders`)."""
    _created_folders.extend(files.create_folders(path))


def remove_created_folders() -> None:
    """Remove the folders `make_folder` created that are still empty (after a refusal), deepest first."""
    while _created_folders:
        with contextlib.suppress(OSError):  # not empty (outputs written before the failure), or already gone
            _created_folders.pop().rmdir()


def check_targets(paths: Sequence[Path], overwrite: bool = False) -> None:
    """Refuse up front (before any work) output files that exist and are not regular files, and without `overwrite`
    any that exist: a folder given as --out may hold files of the user's that only share a name."""
    existing = [path for path in paths if os.path.lexists(path)]
    for path in existing:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise CLIError(f"{path} exists and is not a regular file (a link, folder or device); not replacing it.")
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise CLIError(
            f"{', '.join(map(str, existing[:3]))}{more} {'exists' if len(existing) == 1 else 'exist'} already and would be "
            f"replaced; pass --overwrite to replace {'it' if len(existing) == 1 else 'them'}, or give another --out."
        )


def replace_file(path: Path, write) -> None:
    """`files.replace_file` with its failures as one-line CLI errors."""
    try:
        files.replace_file(path, write)
    except FileExistsError as error:  # something other than a regular file is in the way
        raise CLIError(str(error)) from None
    except OSError as error:
        raise CLIError(f"cannot write {path}: {first_line(error)}") from None


def pixel_values_of(
    images: list[Image.Image], processor, model, names: Sequence[str] | None = None, one_size: bool = False
) -> torch.Tensor:
    """One batch of images through the model's processor, checked and on the model's device and dtype. `names`
    (the images' files) name the culprits in errors; `one_size`: every image must come out at one size (a token
    file holds one grid), so `--batch_size 1` is no way out of a batch of several sizes."""
    parameter = next(model.parameters())
    try:
        pixel_values = processor(images, return_tensors="pt").pixel_values
    except ValueError as error:
        if "Cannot batch images of different shapes" not in str(error):
            raise
        # The processor's advice (return_tensors=None) is for Python callers.
        if names is not None:
            sizes = ", ".join(f"{name} {image.height}x{image.width}" for name, image in zip(names, images))
        else:
            sizes = str(error).split("shapes ")[1].split(":")[0]
        advice = "give images of one size" if one_size else "pass --batch_size 1, or give images of one size"
        raise CLIError(
            f"the model's image processor does not resize, and one batch holds images of different sizes "
            f"({sizes}); {advice}."
        ) from None
    check_processed_size(pixel_values, processor, model.config.downsampling_factor, names)
    return pixel_values.to(device=parameter.device, dtype=parameter.dtype)


def check_processed_size(
    pixel_values: torch.Tensor, processor, factor: int, names: Sequence[str] | None = None
) -> None:
    """Refuse images the processor leaves at a size the model cannot take, saying what the processor does (the
    model's own message assumes a processor that resizes to a size that fits)."""
    height, width = pixel_values.shape[-2:]
    if height % factor == 0 and width % factor == 0:
        return
    size = getattr(processor, "size", None) or {}
    shortest_edge = size.get("shortest_edge") if hasattr(size, "get") else None
    if getattr(processor, "do_resize", False) and shortest_edge and not getattr(processor, "do_center_crop", False):
        raise CLIError(
            f"the model's image processor resizes the shortest side to {shortest_edge} and keeps the aspect ratio, "
            f"which made a {height}x{width} image, not divisible by the model's downsampling factor {factor}; give "
            f"the processor a height/width size, or do_center_crop, in its preprocessor_config.json."
        )
    if getattr(processor, "do_resize", False) or getattr(processor, "do_center_crop", False):
        raise CLIError(
            f"the model's image processor makes {height}x{width} images, not divisible by the model's downsampling "
            f"factor {factor}; set a size divisible by {factor} in its preprocessor_config.json."
        )
    which = f"{', '.join(names[:3])}{' and more' if len(names) > 3 else ''} is" if names else "an image is"
    raise CLIError(
        f"{which} {height}x{width} pixels, not divisible by the model's downsampling factor {factor}, and the model's "
        f"image processor does not resize or crop (do_resize and do_center_crop are false in its "
        f"preprocessor_config.json); give images whose sides are multiples of {factor}."
    )


def image_batches(
    paths: Sequence[Path], args: argparse.Namespace, processor, model, one_size: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first image, pixel values) of the images, `args.batch_size` at a time, ready for the model;
    with `one_size`, every batch at the size of the first (checked batch by batch, before the model runs)."""
    first = None
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        images = [load_image(path, args.max_image_pixels) for path in batch]
        pixel_values = pixel_values_of(images, processor, model, [str(path) for path in batch], one_size)
        if one_size:
            first = first or (str(batch[0]), tuple(pixel_values.shape[-2:]))
            if tuple(pixel_values.shape[-2:]) != first[1]:
                raise CLIError(
                    f"{batch[0]} is {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels after the model's image "
                    f"processor, {first[0]} {first[1][0]}x{first[1][1]}: a token file holds one grid size, so give "
                    f"images of one size (or encode each size into its own file)."
                )
        yield start, pixel_values


def to_unit_images(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """Model-range pixels -> float (B, 3, H, W) in [0, 1], inverting the processor's own normalisation."""
    return processor.postprocess(pixel_values.float(), return_tensors="pt").pixel_values


def printable(text: str) -> str:
    """`text` with its unprintable characters escaped (`\\x1b`, `\\n`): labels and role names come from a downloaded
    config, and printed as they are they could drive the terminal (escape sequences) or fake a line of output."""
    escaped = (character.encode("unicode_escape").decode() for character in text)
    return "".join(character if character.isprintable() else escape for character, escape in zip(text, escaped))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table of printable cells; columns of numbers are right-aligned, others left-aligned."""
    cells = [[printable(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_NUMBER.fullmatch(row[i]) for row in cells[1:]) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        parts = [cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def open_dataset(data: str, image_column: str, split: str):
    """A local image folder or a Hub data set, with undecoded images (see `cdb_tokenizer.tools.data.load_image_dataset`)."""
    try:
        from .data import load_image_dataset
    except ImportError as error:
        raise CLIError(
            f"reading data sets needs {TRAIN_EXTRAS} ({error})."
        ) from None
    path = Path(data).expanduser()
    try:
        if path.exists() or is_local_path(data):
            if not path.is_dir():
                what = "is a file; give the folder of images (or a Hub data set)" if path.exists() else "no such folder"
                raise CLIError(f"--data {data}: {what}.")
            return load_image_dataset(train_data_dir=str(path), split=split, image_column=image_column)
        with held_library_logs() as records:  # huggingface_hub's retries offline: the error below says what matters
            dataset = load_image_dataset(dataset_name=data, split=split, image_column=image_column)
        show_log_records(records)
        return dataset
    except ImportError as error:
        raise CLIError(
            f"reading data sets needs {TRAIN_EXTRAS} ({error})."
        ) from None
    except (OSError, ValueError, ConnectionError) as error:
        raise CLIError(f"could not open --data {data}: {first_line(error)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_command(args: argparse.Namespace) -> None:
    """Images -> a safetensors file of token grids with the model's identity in its metadata."""
    paths = check_image_files(args.images, args.max_image_pixels)
    refuse_overwriting_inputs([Path(args.out)], [*paths, *local_model_files(args.model)])  # --overwrite cannot help
    out = check_output_file(args.out, overwrite=args.overwrite)
    model, processor, model_id, fingerprint, revision = load_model_of(args)
    grids = []
    with tqdm(total=len(paths), desc="encoding", unit="image") as progress:
        for _, pixel_values in image_batches(paths, args, processor, model, one_size=True):
            grids.append(model.encode(pixel_values, return_dict=True).image_tokens.cpu())
            progress.update(len(pixel_values))
    tokens = torch.cat(grids)
    write_token_file(out, tokens, model, model_id, fingerprint, pixel_values.shape[-2:], unique_names(paths), revision)
    print(f"wrote {counted(tokens.shape[0], 'image')} x {tokens.shape[1]}x{tokens.shape[2]} tokens to {out}")


def write_token_file(
    out: Path,
    tokens: torch.Tensor,
    model,
    model_id: str,
    fingerprint: str,
    image_size: Sequence[int],
    names: Sequence[str],
    revision: str | None = None,
) -> None:
    """Write (N, h, w) `tokens` of `model` (loaded as `model_id`, at the Hub commit `revision`) as a token file that
    `cdb-vq decode` and `read_token_file` read: int32 ids, with the model's identity, the grid, the (height, width)
    image size and one name per image in its metadata. `out` is replaced whole or left as it was."""
    from safetensors.torch import save_file

    local = Path(model_id).is_absolute()
    # A local model is recorded relative to the token file (token files are shared: no absolute path), or, far from
    # it, by name only; decode then needs --model.
    recorded_model = files.relative_location(model_id, out.parent) if local else model_id
    height, width = image_size
    metadata = {
        "format": TOKEN_FILE_FORMAT,
        "format_version": TOKEN_FILE_VERSION,
        **({"model": recorded_model} if recorded_model else {}),
        "model_name": Path(model_id).name if local else model_id,
        "codebook_size": str(model.config.codebook_size),
        "codebook_fingerprint": fingerprint,
        "grid_height": str(tokens.shape[1]),
        "grid_width": str(tokens.shape[2]),
        "image_height": str(height),
        "image_width": str(width),
        "images": json.dumps(list(names)),
        **({"model_revision": revision} if revision else {}),
    }
    ids = tokens.to(torch.int32).contiguous()
    replace_file(out, lambda path: save_file({"image_tokens": ids}, str(path), metadata=metadata))


# What `encode` records beside the tokens as whole numbers, with the words messages use for them.
TOKEN_FILE_NUMBERS = {
    "codebook_size": "codebook size",
    "grid_height": "token grid height",
    "grid_width": "token grid width",
    "image_height": "image height",
    "image_width": "image width",
}


def read_token_file(
    path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, dict[str, str], dict[str, int]]:
    """The (N, h, w) tokens, metadata and its numbers (`TOKEN_FILE_NUMBERS`) of a file written by `cdb-vq encode`,
    checked before any model is loaded: the format version, the numbers, the grid against the tokens, and the image
    size against the pixel budget (the model later checks that its downsampling factor gives that size)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise CLIError(f"{path}: {'is a folder, not a token file' if Path(path).is_dir() else 'no such file'}.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # safe_open has no `in`
            if metadata.get("format") != TOKEN_FILE_FORMAT or "image_tokens" not in names:
                raise CLIError(f"{path} is not a cdb-vq token file (write one with `cdb-vq encode`).")
            tokens = handle.get_tensor("image_tokens")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise CLIError(
            f"{path} is not a safetensors file, or it is truncated (write one with `cdb-vq encode`)."
        ) from None
    version = metadata.get("format_version")
    if version is None:
        raise CLIError(
            f"{path} does not record its format version (format_version); it was not written by `cdb-vq encode`."
        )
    if version != TOKEN_FILE_VERSION:
        raise CLIError(
            f"{path} is a token file of format version {version!r}; this cdb-vq reads version {TOKEN_FILE_VERSION!r}."
        )
    if tokens.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise CLIError(
            f"{path} holds {tokens.dtype} tokens, not integer code ids; it was not written by `cdb-vq encode`."
        )
    if tokens.ndim != 3:
        raise CLIError(f"{path} holds tokens of shape {tuple(tokens.shape)}, expected (images, height, width).")
    if tokens.numel() == 0:
        raise CLIError(f"{path} holds no tokens (shape {tuple(tokens.shape)}).")
    numbers = _token_file_numbers(path, metadata)
    grid = (numbers["grid_height"], numbers["grid_width"])
    if tuple(tokens.shape[1:]) != grid:
        raise CLIError(
            f"{path} holds {tokens.shape[1]}x{tokens.shape[2]} token grids but its metadata says {grid[0]}x{grid[1]}; "
            f"the file was modified after `cdb-vq encode`."
        )
    height, width = numbers["image_height"], numbers["image_width"]
    if max_pixels and height * width > max_pixels:
        raise CLIError(
            f"{path} decodes to {_size_text(height, width)} per image, over {_budget(max_pixels)}; raise "
            f"--max_image_pixels (0: no limit) if that is meant."
        )
    return tokens.long(), metadata, numbers


def _token_file_numbers(path: str, metadata: dict[str, str]) -> dict[str, int]:
    """The `TOKEN_FILE_NUMBERS` of a token file's metadata as ints: each must be there and a positive whole number."""
    numbers = {}
    for key, words in TOKEN_FILE_NUMBERS.items():
        value = metadata.get(key)
        if value is None:
            raise CLIError(f"{path} does not record its {words} ({key}); it was not written by `cdb-vq encode`.")
        if not (value.isascii() and value.isdigit() and int(value) > 0):
            raise CLIError(f"{path} records {key} {value!r}, not a positive whole number; the file was modified.")
        numbers[key] = int(value)
    return numbers


@torch.inference_mode()
def decode_command(args: argparse.Namespace) -> None:
    """A token file -> one PNG per image, with the model recorded in the file unless --model is given."""
    tokens, metadata, numbers = read_token_file(args.tokens, args.max_image_pixels)
    model_name = args.model or _recorded_model(args.tokens, metadata)
    if not model_name:
        local = f" (it was encoded with a local model named {metadata['model_name']!r})" if "model_name" in metadata else ""
        raise CLIError(f"{args.tokens} does not name its model{local}; pass --model.")
    if not args.model and "codebook_fingerprint" not in metadata:
        # Without it nothing shows that the tokens index the named model's codebook: the user must choose the model.
        raise CLIError(
            f"{args.tokens} records no codebook fingerprint, so its tokens cannot be checked against {model_name}; "
            f"pass --model to decode them with a model you choose."
        )
    out = check_output_folder(args.out)
    names = _image_names(metadata, len(tokens))
    targets = [out / f"{name}.png" for name in names]
    refuse_overwriting_inputs(targets, [Path(args.tokens), *local_model_files(model_name)])
    check_targets(targets, args.overwrite)
    # A Hub model is loaded at the commit that encoded the tokens, unless --model or --revision says otherwise.
    revision = args.revision or (None if args.model else _recorded_revision(args.tokens, metadata))
    if not args.model:
        # The file's word is followed only as far as load_model goes for --model: a folder or Hub id whose
        # config.json says cdb_vq, loaded by this package's classes (its code never runs: see --trust-remote-code).
        at = f" at {revision}" if revision else ""
        print(f"decoding with the model recorded in {args.tokens}: {model_name}{at}", file=sys.stderr)
    resolve_device(args.device)  # a bad --device is not the recorded model's fault
    try:
        loaded = load_model(model_name, args.device, args.dtype, args.trust_remote_code, revision)
    except CLIError as error:
        if args.model:
            raise
        raise CLIError(f"the model recorded in {args.tokens} cannot be loaded ({error}); pass --model.") from None
    model, processor = loaded.model, loaded.processor
    _check_token_source(args.tokens, tokens, metadata, numbers, loaded, model_name)
    device = next(model.parameters()).device
    # All or none, as reconstruct and restore: a failure half-way (a full disk) leaves no half set of images.
    with files.staged_files(out) as stage, tqdm(total=len(tokens), desc="decoding", unit="image") as progress:
        for start in range(0, len(tokens), args.batch_size):
            grids = tokens[start : start + args.batch_size].to(device)
            images = processor.postprocess(model.decode_image_tokens(grids).float()).pixel_values
            for target, image in zip(targets[start : start + args.batch_size], images):
                image.save(stage(target), format="PNG")
            progress.update(len(grids))
    print(f"wrote {counted(len(tokens), 'image')} to {out}")


def _recorded_model(tokens_file: str, metadata: dict[str, str]) -> str | None:
    """The model `encode` recorded: a Hub id, a folder relative to the token file ("../tok"), or an absolute path
    (files written before 2026-11-30)."""
    model = metadata.get("model")
    if model and model.startswith("."):
        return str((Path(tokens_file).parent / model).resolve())
    return model


def _recorded_revision(tokens_file: str, metadata: dict[str, str]) -> str | None:
    """The Hub commit `encode` recorded for its model: a 40-digit hash (a file that says anything else was edited)."""
    revision = metadata.get("model_revision")
    if revision is not None and not COMMIT_HASH.fullmatch(revision):
        raise CLIError(f"{tokens_file} records model_revision {revision!r}, not a commit hash; the file was modified.")
    return revision


def _check_token_source(
    tokens_file: str, tokens: torch.Tensor, metadata: dict[str, str], numbers: dict[str, int], loaded: LoadedModel,
    model_name: str,
) -> None:
    """Refuse tokens that the loaded model did not make: another codebook size or fingerprint, an image size its
    downsampling factor does not give, ids outside its codebook. A file without a fingerprint (only decoded with a
    --model the user chose) gets a warning instead of the fingerprint check."""
    model, fingerprint = loaded.model, loaded.fingerprint
    size, recorded = model.config.codebook_size, metadata.get("codebook_fingerprint")
    differs = f"{numbers['codebook_size']} codes" if numbers["codebook_size"] != size else None
    if differs is None and recorded not in (None, fingerprint):
        differs = f"codebook fingerprint {recorded}"
    if differs:
        source, encoded_at = _recorded_model(tokens_file, metadata), metadata.get("model_revision")
        if source == loaded.model_id and encoded_at not in (None, loaded.revision):
            raise CLIError(
                f"{tokens_file} was encoded by {source} at commit {encoded_at}, and its revision {loaded.revision} "
                f"has another codebook ({size} codes, fingerprint {fingerprint}); decode with --revision {encoded_at}."
            )
        if source == loaded.model_id:  # the very folder (or Hub id) that encoded them, edited or retrained since
            raise CLIError(
                f"the model at {source} has changed since {tokens_file} was encoded (the file records {differs}, "
                f"the model has {size} codes and fingerprint {fingerprint}); re-encode the images."
            )
        raise CLIError(
            f"{tokens_file} was encoded with a different codebook ({differs}, {source or 'model not recorded'}) than "
            f"{model_name}'s ({size} codes, fingerprint {fingerprint})"
            f"{f'; decode with --model {source}' if source else ''}."
        )
    if recorded is None:
        print(
            f"warning: {tokens_file} records no codebook fingerprint: nothing shows that its tokens are of "
            f"{model_name}'s codebook.", file=sys.stderr,
        )  # fmt: skip
    factor = model.config.downsampling_factor
    grid = numbers["grid_height"], numbers["grid_width"]
    image = numbers["image_height"], numbers["image_width"]
    if (grid[0] * factor, grid[1] * factor) != image:
        raise CLIError(
            f"{tokens_file} records {image[0]}x{image[1]} images from {grid[0]}x{grid[1]} token grids, but "
            f"{model_name} (downsampling factor {factor}) makes {grid[0] * factor}x{grid[1] * factor} from them; "
            f"the file was modified."
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= size:
        raise CLIError(
            f"{tokens_file} holds code ids in [{low}, {high}], outside the model's [0, {size}); "
            f"the file is damaged or was modified."
        )


def _image_names(metadata: dict[str, str], count: int) -> list[str]:
    """The source image names recorded by `encode`, or image-00000, image-00001, ... when they are missing."""
    try:
        names = json.loads(metadata.get("images", "null"))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or len(names) != count:
        return [f"image-{index:05d}" for index in range(count)]
    # Never a path outside --out, and never two images on one file.
    safe = [Path(safe_name(str(name), f"image-{index:05d}") + ".png") for index, name in enumerate(names)]
    return unique_names(safe)


@torch.inference_mode()
def reconstruct_command(args: argparse.Namespace) -> None:
    """Images -> tokens -> images: originals beside reconstructions, and the PSNR of each."""
    paths = check_image_files(args.images, args.max_image_pixels)
    out = check_output_folder(args.out)
    folders = [out, check_output_subfolder(out, "reconstructions")]
    if args.role_map:
        folders.append(check_output_subfolder(out, "role_maps"))
    names = unique_names(paths)
    targets = [folder / f"{name}.png" for name in names for folder in folders] + [out / "psnr.json"]
    refuse_overwriting_inputs(targets, [*paths, *local_model_files(args.model)])
    check_targets(targets, args.overwrite)
    model, processor, *_ = load_model_of(args)
    if args.role_map and not model.config.code_roles:
        raise CLIError(
            f"--role-map: {args.model} has no code roles (config.code_roles is empty), so there is no role map."
        )
    from .scores import psnr_from_mse  # not .evaluation: reconstruct needs only the base install

    scores, squared_errors, pixels = {}, [], []
    # All outputs or none: a bad image stops the command before any file is in place (and each is read once).
    with files.staged_files(out) as stage, tqdm(total=len(paths), desc="reconstructing", unit="image") as progress:
        for start, pixel_values in image_batches(paths, args, processor, model):
            # Through the tokens, as a prior's samples would be: the same images `encode` + `decode` give.
            reconstruction = model.decode(model.encode(pixel_values, return_dict=True).image_tokens).float()
            originals = to_unit_images(pixel_values, processor)
            reconstructions = to_unit_images(reconstruction, processor)
            pairs = processor.postprocess(torch.cat([pixel_values.float(), reconstruction], dim=-1)).pixel_values
            singles = processor.postprocess(reconstruction).pixel_values
            batch_names = names[start : start + args.batch_size]
            if args.role_map:
                _write_role_maps(model, pixel_values, originals, out / "role_maps", batch_names, stage)
            for index, name in enumerate(batch_names):
                squared_errors.append(float(((originals[index].double() - reconstructions[index].double()) ** 2).mean()))
                pixels.append(originals[index].numel())
                scores[name] = psnr_from_mse(squared_errors[-1])
                pairs[index].save(stage(out / f"{name}.png"), format="PNG")  # original left, reconstruction right
                singles[index].save(stage(out / "reconstructions" / f"{name}.png"), format="PNG")
            progress.update(len(pixel_values))
        # Pooled over every pixel (images of several sizes weigh by their size): `cdb-vq eval`'s definition for a
        # set. `mean`, the mean of the per-image dBs, stays in psnr.json for scripts that read it.
        pooled = psnr_from_mse(sum(e * n for e, n in zip(squared_errors, pixels)) / sum(pixels))
        summary = {"images": scores, "all": pooled, "mean": sum(scores.values()) / len(scores)}
        stage(out / "psnr.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [(name, f"{value:.2f}") for name, value in scores.items()] + [("all", f"{pooled:.2f}")]
    print(format_table(["image", "PSNR (dB)"], rows))
    print(f"originals beside reconstructions in {out}, reconstructions alone in {out / 'reconstructions'}")
    if args.role_map:
        from .roles import role_legend

        legend = printable(role_legend(model.config.role_names))
        print(f"role maps (each token's role as a translucent colour; {legend}) in {out / 'role_maps'}")


def _write_role_maps(
    model, pixel_values: torch.Tensor, originals: torch.Tensor, folder: Path, names: list[str], stage
) -> None:
    """Each image beside its role overlay, as `folder/<name>.png` (written where `stage` says)."""
    from .roles import role_map_figure

    role_map = model.role_map(pixel_values).cpu()
    for index, name in enumerate(names):
        figure = role_map_figure(originals[index : index + 1] * 2 - 1, role_map[index : index + 1], model.config.role_names)
        array = (figure.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
        Image.fromarray(array).save(stage(folder / f"{name}.png"), format="PNG")


@torch.inference_mode()
def restore_command(args: argparse.Namespace) -> None:
    """Degraded photos in, restored photos out, with a model trained for restoration (`train.py --degradation`)."""
    from .degradations import canonical_spec, degrades_nothing

    paths = check_image_files(args.images, args.max_image_pixels)
    out = check_output_folder(args.out)
    targets = [out / f"{name}.png" for name in unique_names(paths)]
    refuse_overwriting_inputs(targets, [*paths, *local_model_files(args.model)])
    check_targets(targets, args.overwrite)
    model, processor, *_ = load_model_of(args)
    trained_on = getattr(model.config, "restoration_degradation", None)
    if not trained_on:
        raise CLIError(
            f"{args.model} was not trained for restoration (its config records no restoration_degradation); "
            f"train one with `train.py --degradation gaussian_blur:0.5-2`, or use `cdb-vq reconstruct`."
        )
    try:
        trained_on = canonical_spec(trained_on)
    except ValueError as error:
        raise CLIError(f"{args.model}'s config records restoration_degradation {trained_on!r}, which is no "
                       f"degradation this version knows: {error}") from None  # fmt: skip
    if degrades_nothing(trained_on):  # train.py never writes one: an edited or foreign config
        raise CLIError(f"{args.model}'s config records restoration_degradation {trained_on!r}, which degrades "
                       f"nothing: the model was not trained to restore.")  # fmt: skip
    # All outputs or none: a bad image stops the command before any file is in place (and each is read once).
    sizes = set()  # what the processor made of the photos (resized and cropped to its size, by default)
    with files.staged_files(out) as stage, tqdm(total=len(paths), desc="restoring", unit="image") as progress:
        for start, pixel_values in image_batches(paths, args, processor, model):
            sizes.add(tuple(pixel_values.shape[-2:]))
            restored = model.decode(model.encode(pixel_values, return_dict=True).image_tokens).float()
            for index, target in enumerate(targets[start : start + args.batch_size]):
                processor.postprocess(restored[index : index + 1]).pixel_values[0].save(stage(target), format="PNG")
            progress.update(len(pixel_values))
    shown = ", ".join(f"{height}x{width}" for height, width in sorted(sizes)[:3])
    shown += " and other sizes" if len(sizes) > 3 else ""
    print(f"restored {counted(len(paths), 'image')} into {out} at {shown} pixels, as the model's image processor prepared them "
          f"(the model was trained to undo {trained_on})")


def _readable_images(
    dataset, image_column: str, counter: dict[str, int], limit: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[Image.Image]:
    """Decoded images of a data set, row by row; unreadable (or over-budget) ones are skipped, counted, and the first
    few named on stderr."""
    from .data import MAX_REPORTED_UNREADABLE, decode_image, skipped_image_message

    for row in itertools.islice(dataset, limit):
        errors: list[Exception] = []
        image = decode_image(row[image_column], max_pixels=max_pixels, errors=errors)
        if image is None:
            counter["unreadable"] += 1
            if counter["unreadable"] <= MAX_REPORTED_UNREADABLE:
                print(f"skipping unreadable image {skipped_image_message(row[image_column], errors)}", file=sys.stderr)
            continue
        yield image


# The standard rFID protocol (LlamaGen, OptVQ, ...): ImageNet val, all 50,000 images, shorter side resized to 256 and
# centre-cropped to 256x256; the reference statistics come from those same crops. See docs/evaluation.md.
PROTOCOLS = {"imagenet": {"split": "validation", "max_images": 50_000, "resolution": 256, "fid": True}}


def _apply_protocol(args: argparse.Namespace) -> None:
    """Fill the flags a `--protocol` implies and that were not given (a local folder keeps its own split); --split
    is otherwise `train`."""
    protocol = PROTOCOLS[args.protocol] if args.protocol is not None else None
    if args.split is None:
        # A local folder has the protocol's split only as a subfolder of that name beside train/ (datasets'
        # imagefolder reads split folders only then).
        local = Path(args.data).expanduser()
        if protocol and local.is_dir() and (local / "train").is_dir() and not (local / protocol["split"]).is_dir():
            raise CLIError(f"--protocol {args.protocol}: {args.data} has a train/ folder but no {protocol['split']}/ one; "
                           f"pass --split to say which split to evaluate.")  # fmt: skip
        has_split = bool(protocol) and (not local.exists() or (local / "train").is_dir())
        args.split = protocol["split"] if has_split else "train"
    if protocol is None:
        return
    if args.max_images is None:
        args.max_images = protocol["max_images"]
    if args.resolution is None:
        args.resolution = protocol["resolution"]
    args.fid = args.fid or protocol["fid"]


def _refuse_other_normalisation(processor, model: str) -> None:
    """`evaluate` scores pixels in [-1, 1] (the image processor's default: rescale by 1/255, mean = std = 0.5); a
    processor that normalises otherwise would get its PSNR, SSIM and rFID on the wrong scale, without a word."""
    import numpy as np

    def setting(name: str):
        return getattr(processor, name, None)

    def all_half(values) -> bool:
        return values is not None and bool(np.allclose(np.asarray(values, dtype=float), 0.5, atol=1e-6))

    rescaled = setting("do_rescale") and abs(float(setting("rescale_factor") or 0) - 1 / 255) < 1e-9
    if not (rescaled and setting("do_normalize") and all_half(setting("image_mean")) and all_half(setting("image_std"))):
        raise CLIError(
            f"{model}'s image processor does not map pixels to [-1, 1] (do_rescale {setting('do_rescale')}, "
            f"rescale_factor {setting('rescale_factor')}, do_normalize {setting('do_normalize')}, image_mean "
            f"{setting('image_mean')}, image_std {setting('image_std')}); eval scores in that range only "
            f"(`cdb-vq reconstruct` undoes any normalisation, for pictures)."
        )


def _check_fid_options(args: argparse.Namespace) -> None:
    """rFID options are refused without --fid (they would do nothing), and --fid_reference may not be --out (the
    metrics would replace the statistics just saved)."""
    given = [name for name, value in (("--fid_reference", args.fid_reference), ("--fid_weights", args.fid_weights),
             ("--fid_feature_extractor random", args.fid_feature_extractor == "random")) if value]  # fmt: skip
    if given and not args.fid:
        raise CLIError(f"{', '.join(given)} without --fid: no rFID would be computed; add --fid.")
    if args.fid_reference and args.out and Path(args.fid_reference).resolve() == Path(args.out).resolve():
        raise CLIError(f"--fid_reference and --out are the same file ({args.out}); give each its own.")


def _fid_reference_facts(args: argparse.Namespace, processor) -> dict[str, str]:
    """What makes reference statistics comparable with this run's (computed otherwise, the rFID means nothing): the
    crop size, how the crops are made (filter, centre crop), the feature extractor and, for Inception, its weights
    by content."""
    size = processor_image_size(processor)
    facts = {"resolution": f"{size[0]}x{size[1]}" if size else "as processed", "resize": _resize_text(processor),
             "features": args.fid_feature_extractor}  # fmt: skip
    if args.fid_feature_extractor == "inception":
        from .evaluation import inception_weights

        facts["weights"] = files.file_sha256(inception_weights(args.fid_weights, allow_download=False))[:16]
    return facts


def _resample_name(processor) -> str:
    """The processor's resize filter by name (`bicubic`)."""
    resample = getattr(processor, "resample", None)
    return Image.Resampling(int(resample)).name.lower() if resample is not None else "unknown"


def _resize_text(processor) -> str:
    """How the processor makes its crops (`bicubic + centre crop`): another filter, or no crop, gives other crops."""
    resize = _resample_name(processor) if processor.do_resize else "no resize"
    return f"{resize} + {'centre crop' if processor.do_center_crop else 'no crop'}"


def _check_fid_reference_facts(path: str, recorded: dict[str, str], facts: dict[str, str]) -> None:
    """Refuse reference statistics computed at another resolution, resize or with another feature extractor."""
    for key, value in facts.items():
        if recorded.get(key, value) != value:  # files written before these were recorded are taken as they are
            raise CLIError(
                f"--fid_reference {path} was computed with {key} {recorded[key]}, this run uses {value}: its rFID "
                f"would not be comparable; give a reference of the same setting or a new path to compute one."
            )


def _eval_fid(args: argparse.Namespace, device):
    """The FID metric `cdb-vq eval --fid` asks for, or None after one line saying why it is left out."""
    from .evaluation import FIDUnavailableError, RandomFeatureExtractor, fid_metric

    if not args.fid:
        return None
    if args.fid_feature_extractor == "random":
        print(
            "rFID with a small random feature extractor: a smoke test of the path, not comparable to Inception FIDs.",
            file=sys.stderr,
        )
        return fid_metric(RandomFeatureExtractor(), device=device)
    try:
        return fid_metric(weights_path=args.fid_weights, device=device)
    except FIDUnavailableError as error:
        if args.fid_weights is not None:  # a file the user named: a mistake to fix, not a run without rFID
            raise CLIError(f"--fid_weights: {error}") from None
        print(f"rFID left out: {error}", file=sys.stderr)
        return None


def _eval_lpips(device):
    """LPIPS when its backbone weights are in the torch hub cache (never downloads), else None and one line."""
    from .losses import LPIPSUnavailableError, cached_lpips, lpips_backbone_file

    try:
        module = cached_lpips("vgg")
    except LPIPSUnavailableError as error:  # a damaged or foreign file at the cache path
        print(f"LPIPS left out: {error}", file=sys.stderr)
        return None
    if module is None:
        print(f"LPIPS left out: its VGG weights are not in the torch hub cache ({lpips_backbone_file('vgg')[0]}).",
              file=sys.stderr)  # fmt: skip
        return None
    return module.to(device)


def eval_command(args: argparse.Namespace) -> None:
    """PSNR, SSIM, LPIPS, rFID, utilization and perplexity over a folder or Hub data set, as a table and JSON."""
    try:
        from .evaluation import evaluate, fid_reference_facts, load_fid_reference, save_fid_reference
    except ImportError as error:
        raise CLIError(
            f"cdb-vq eval needs {TRAIN_EXTRAS} ({error})."
        ) from None
    _apply_protocol(args)
    _check_fid_options(args)
    if args.out is not None:  # before --out's own checks
        data = Path(args.data).expanduser()
        inputs = itertools.chain(_files_under(data) if data.is_dir() else [], local_model_files(args.model))
        refuse_overwriting_inputs([Path(args.out)], inputs)
    out = check_output_file(args.out, "metrics.json", overwrite=args.overwrite) if args.out is not None else None
    if args.fid and args.fid_reference is not None and not Path(args.fid_reference).is_file():  # written at the end
        check_output_file(args.fid_reference, "reference.safetensors", "--fid_reference")
    dataset = open_dataset(args.data, args.image_column, args.split)  # after the cheap checks: a Hub set downloads
    model, processor, *_ = load_model_of(args)
    _refuse_other_normalisation(processor, args.model)
    device = next(model.parameters()).device
    if args.resolution is not None:  # shorter side to N, then the centre N x N crop
        factor = model.config.downsampling_factor
        if args.resolution % factor:
            raise CLIError(
                f"--resolution {args.resolution} is not divisible by the model's downsampling factor ({factor})."
            )
        if args.max_image_pixels and args.resolution**2 > args.max_image_pixels:  # the saved size was checked, not this
            raise CLIError(f"--resolution {args.resolution} makes images of {_size_text(args.resolution, args.resolution)}, "
                           f"over {_budget(args.max_image_pixels)}; raise --max_image_pixels (0: no limit) if that is "
                           f"meant.")  # fmt: skip
        processor.size = {"height": args.resolution, "width": args.resolution}
        processor.do_resize, processor.do_center_crop = True, True
        processor.resample = Image.Resampling.BICUBIC  # as documented, whatever filter the model's processor saved
    counter = {"unreadable": 0}
    fid = _eval_fid(args, device)
    lpips = _eval_lpips(device) if args.lpips else None
    reference = None
    facts = _fid_reference_facts(args, processor) if fid is not None and args.fid_reference else {}
    if fid is not None and args.fid_reference and Path(args.fid_reference).is_file():
        try:
            reference = load_fid_reference(args.fid_reference)
            recorded = fid_reference_facts(args.fid_reference)
        except ValueError as error:  # statistics that would give a wrong rFID
            raise CLIError(f"--fid_reference {args.fid_reference}: {first_line(error)}") from None
        except Exception as error:  # noqa: BLE001 - not safetensors, truncated, unreadable
            raise CLIError(
                f"--fid_reference {args.fid_reference} cannot be read as safetensors ({first_line(error)})."
            ) from None
        _check_fid_reference_facts(args.fid_reference, recorded, facts)

    def batches() -> Iterator[torch.Tensor]:
        images = []
        for image in _readable_images(dataset, args.image_column, counter, args.max_images, args.max_image_pixels):
            images.append(image)
            if len(images) == args.batch_size:
                yield pixel_values_of(images, processor, model)
                images = []
        if images:
            yield pixel_values_of(images, processor, model)

    try:
        total = min(len(dataset), args.max_images or len(dataset)) if hasattr(dataset, "__len__") else args.max_images
        metrics = evaluate(model, batches(), lpips=lpips, fid=fid, fid_reference=reference, total_images=total)
    except ValueError as error:
        skipped = counted(counter["unreadable"], "unreadable image")
        raise CLIError(f"{str(error).rstrip('.')} ({skipped} skipped).") from None
    if fid is not None and args.fid_reference and reference is None:
        # Reference files are shared and reused as token files are: a local --data by its last part only.
        data = Path(args.data).expanduser().resolve().name if Path(args.data).expanduser().exists() else args.data
        description = f"{data} {args.split} {metrics['num_images']} images"
        save_fid_reference(fid, args.fid_reference, description=description, **facts)
        print(f"Saved the rFID reference statistics to {args.fid_reference}.", file=sys.stderr)
    metrics["unreadable_images"] = counter["unreadable"]
    random_features = args.fid_feature_extractor == "random"
    if fid is not None:
        metrics["fid_feature_extractor"] = "random" if random_features else "inception-v3-compat"
    # What was measured, to report beside the numbers (evaluation.md: data and split, N, resize and crop).
    size = processor_image_size(processor) or {"shortest_edge": getattr(processor.size, "shortest_edge", None)}
    metrics["setting"] = {"model": args.model, "data": args.data, "split": args.split, "max_images": args.max_images,
                          "protocol": args.protocol, "size": size, "resize": bool(processor.do_resize),
                          "resample": _resample_name(processor),
                          "center_crop": bool(processor.do_center_crop)}  # fmt: skip
    rows = [
        ("PSNR (dB)", f"{metrics['psnr']:.2f}"),
        ("SSIM", f"{metrics['ssim']:.4f}"),
        *([("LPIPS", f"{metrics['lpips']:.4f}")] if "lpips" in metrics else []),
        *([("rFID (random features)" if random_features else "rFID", f"{metrics['rfid']:.3f}")]
          if "rfid" in metrics else []),  # fmt: skip
        ("utilization", f"{metrics['utilization']:.1%}"),
        ("perplexity", f"{metrics['perplexity']:.1f}"),
        ("images", metrics["num_images"]),
        ("unreadable (skipped)", counter["unreadable"]),
    ]
    print(format_table(["metric", "value"], rows))
    print(json.dumps(metrics))
    if out is not None:
        replace_file(out, lambda path: path.write_text(json.dumps(metrics, indent=2) + "\n"))


def inspect_command(args: argparse.Namespace) -> None:
    """Codebook size, assignment rule, role ranges with their usage, and the labels of the most used codes."""
    from .publishing import code_report_summary, codebook_summary

    if args.codes is not None:
        refuse_overwriting_inputs([Path(args.codes)], local_model_files(args.model), option="--codes")
    codes = _check_codes_file(args.codes, args.overwrite) if args.codes is not None else None
    model, _, model_id, fingerprint, revision = load_model_of(args)
    summary = codebook_summary(model, top_k=args.top)
    report = model.code_report()
    code_summary = code_report_summary(report)
    if codes is not None:
        _write_code_report(report, codes)
    if args.json:
        print(json.dumps({"model": model_id, "revision": revision, "codebook_fingerprint": fingerprint, **summary, "code_report_summary": code_summary}, indent=2))
        return
    grid_height, grid_width = summary["token_grid"]
    size, factor = summary["resolution"], summary["downsampling_factor"]
    print(
        format_table(
            ["model", model_id],
            [
                ("codebook", f"{summary['codebook_size']} codes x {summary['codebook_dim']} dims"),
                ("assignment rule", summary["assignment"]),
                ("image -> tokens", f"{size}x{size} -> {grid_height}x{grid_width} (x{factor})"),
                ("dead codes", f"{summary['dead_codes']} of {summary['codebook_size']}"),
                ("codebook fingerprint", fingerprint),
                *([("revision", revision)] if revision else []),
            ],
        )
    )
    if model.config.code_roles:
        print("\ncode roles (usage: running share of tokens, from training)")
        print(
            format_table(
                ["role", "codes", "size", "usage"],
                [
                    (role["name"], f"[{role['start']}, {role['end']})", role["size"], f"{role['usage']:.1%}")
                    for role in summary["roles"]
                ],
            )
        )
    else:
        print("\ncode roles: none (config.code_roles is empty: one range of every code)")
    print(f"\nmost used codes (top {len(summary['top_codes'])})")
    print(
        format_table(
            ["code", "usage", "role", "tied prototype", "tied label"],
            [
                (code["code"], f"{code['usage']:.2%}", code["role"] or "-",
                 "-" if code["tied_prototype"] is None else code["tied_prototype"],
                 code["tied_label"] or "(no label)")  # fmt: skip
                for code in summary["top_codes"]
            ],
        )
    )
    print("\nwhat the codes learned (code_report: usage-weighted mean image signals of the latents they won in training)")
    print(
        format_table(
            ["group", "codes", "usage", "low-pass", "Laplacian", "chroma", "prototype cosine"],
            [
                (row["group"], row["codes"], f"{row['usage']:.1%}", _fmt(row["low_pass"]), _fmt(row["laplacian"]),
                 _fmt(row["chroma"]), _fmt(row["prototype_cosine"]))  # fmt: skip
                for row in code_summary
            ],
        )
    )
    if args.codes:
        print(f"\none record per code written to {args.codes}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _check_codes_file(codes: str, overwrite: bool) -> Path:
    """--codes: a .csv or .json file name (the suffix picks the format), checked like --out."""
    # An example of the name's own kind: check_output_file would refuse codes.json as "not a CSV", and this check
    # names both formats for any other suffix.
    path = check_output_file(codes, f"codes{Path(codes).suffix.lower() or '.csv'}", "--codes", overwrite)
    if path.suffix.lower() not in (".csv", ".json"):
        raise CLIError(f"--codes {codes} is neither a .csv nor a .json file name; give codes.csv or codes.json.")
    return path


def _inert_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: labels and role names come from a downloaded model's config, and one
    starting with `=`, `+`, `-`, `@` or a tab or carriage return would run as a formula (`'` keeps it text)."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _write_code_report(report: list[dict], path: Path) -> None:
    """One record per code as CSV (by the .csv suffix) or JSON (.json)."""
    if path.suffix.lower() == ".csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(report[0]))
        writer.writeheader()
        writer.writerows([{key: _inert_cell(value) for key, value in record.items()} for record in report])
        text = buffer.getvalue()
    else:
        text = json.dumps(report, indent=1) + "\n"
    replace_file(path, lambda target: target.write_text(text))


@files.output_dir_claims()
def tokenize_command(args: argparse.Namespace) -> None:
    """A folder or Hub data set -> a `datasets` data set of `image_tokens` (and labels), saved with `save_to_disk`."""
    dataset = open_dataset(args.data, args.image_column, args.split)  # names the training extras when missing
    import pyarrow.compute as pyarrow_compute

    from .priors import save_tokens, tokenize_dataset
    from .priors.token_data import TokenGridMismatch

    if not hasattr(dataset, "filter") or not hasattr(dataset, "__len__"):
        raise CLIError("tokenize needs a map-style data set (streaming is not supported).")
    if args.max_images is not None:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    out = _check_tokenize_folder(args.out, args.data)
    model, processor, _, fingerprint, _ = load_model_of(args)
    total = len(dataset)
    try:  # unreadable (or over-budget) images are skipped and counted as they are tokenised: each is read once
        tokenized = tokenize_dataset(
            dataset,
            model,
            processor,
            image_column=args.image_column,
            label_column=args.label_column,
            batch_size=args.batch_size,
            device=next(model.parameters()).device,
            max_pixels=args.max_image_pixels,
        )
    except ValueError as error:  # no readable image at all, or a label column that is not integer classes
        raise CLIError(f"--data {args.data}: {error}") from None
    skipped = total - len(tokenized)
    lengths = pyarrow_compute.min_max(pyarrow_compute.list_value_length(tokenized.with_format("arrow")["image_tokens"]))
    shortest, longest = lengths["min"].as_py(), lengths["max"].as_py()
    if shortest != longest:  # a processor without a fixed size: images of other shapes made other grids
        raise CLIError(
            f"--data {args.data}: the images gave token sequences of {shortest} to {longest} tokens; a prior needs one "
            f"length: use a model whose image processor makes one size ({{'height', 'width'}}, or a centre crop)."
        )
    # The codebook it indexes (before --dtype's cast), and the grid at the processor's size: a prior then decodes the
    # tokens in their own raster layout, not on a grid guessed from their count.
    size = processor_image_size(processor)
    try:
        save_tokens(tokenized, out, model, fingerprint, image_size=size)
    except TokenGridMismatch:  # a processor that does not make images of its size (no resize nor crop)
        raise CLIError(
            f"--model {args.model}: its image processor does not resize or crop to its size ({size[0]}x{size[1]}), "
            f"and the images came out at another ({shortest} tokens each); use a processor that resizes and crops "
            f"(do_resize and do_center_crop in preprocessor_config.json), or images of that size."
        ) from None
    length = shortest
    print(
        f"tokenized {counted(len(tokenized), 'image')} ({skipped} unreadable skipped) into {args.out}: columns "
        f"{tokenized.column_names}, {length} tokens per image, {model.config.codebook_size} codes"
    )


def _check_tokenize_folder(out: str, data: str) -> Path:
    """--out of tokenize: a new or empty folder, or an earlier tokenize output (save_to_disk replaces what is in it),
    outside a local --data folder (where the next run would read it as data), and no other run's now (two would write
    the same shard names into it: it is locked as the training scripts lock their --output_dir)."""
    data_folder = Path(data).expanduser()
    if out and data_folder.is_dir() and data_folder.resolve() in (Path(out).resolve(), *Path(out).resolve().parents):
        raise CLIError(f"--out {out} is inside --data {data}; give a folder outside the data.")
    path = check_output_folder(out)
    if not (path / files.OUTPUT_DIR_LOCK).exists():  # no tokenize has written here: refuse before locking,
        _refuse_foreign_out(path, out)  # so that a folder that is not ours is left as it was (no lock file in it)
    refusal = files.claim_output_dir(path, flag="--out")
    if refusal is not None:
        raise CLIError(refusal)
    _refuse_foreign_out(path, out)  # again under the lock: what a run that ended meanwhile left
    return path


def _refuse_foreign_out(path: Path, out: str) -> None:
    """Refuse a tokenize --out that holds anything but an earlier tokenize output (and its lock file)."""
    from .data import saved_to_disk
    from .priors.token_data import TOKENS_INFO

    if any(entry.name != files.OUTPUT_DIR_LOCK for entry in path.iterdir()) and not (path / TOKENS_INFO).is_file():
        if saved_to_disk(path):
            raise CLIError(
                f"--out {out} holds a data set without the {TOKENS_INFO} that `cdb-vq tokenize` writes last: an "
                f"interrupted tokenize (or another data set). Delete it to tokenize there again, or give a new folder."
            )
        raise CLIError(
            f"--out {out} is a folder with other files in it (no {TOKENS_INFO} of an earlier `cdb-vq tokenize`); "
            f"give a new or empty folder."
        )
    # `save_to_disk` writes over what an earlier output holds, following links: one would write outside --out.
    for parent, folders, names in os.walk(path):
        for name in folders + names:
            entry = Path(parent) / name
            if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
                raise CLIError(f"{entry} is a symbolic link or not a regular file; --out must hold only what tokenize wrote.")


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


class _Parser(OneLineErrorParser):
    """An argument parser whose multi-word options take both spellings (`--batch_size` and `--batch-size`); --help
    shows the spelling the option is declared with. Sub-command parsers are of this class too."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        for option in action.option_strings:
            if option.startswith("--"):
                for spelling in ("--" + option[2:].replace("_", "-"), "--" + option[2:].replace("-", "_")):
                    self._option_string_actions.setdefault(spelling, action)  # parsed, but not listed in --help
        return action

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        # An abbreviation (--batch) matches both spellings of one option: that is one option, not an ambiguity.
        return list({id(match[0]): match for match in super()._get_option_tuples(option_string)}.values())


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:  # argparse would name the function: "invalid _positive_int value: '1.5'"
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None


def _positive_int(value: str) -> int:
    number = _whole_number(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = _whole_number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return number


def _add_pixel_budget(
    command: argparse.ArgumentParser,
    what: str = "refuse (skip, in data sets) images with more pixels than this, before decoding them",
) -> None:
    command.add_argument(
        "--max_image_pixels",
        type=_non_negative_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"{what} (default: {DEFAULT_MAX_IMAGE_PIXELS:,}; 0: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `cdb-vq` command line: one sub-command per task, each with its own flags."""
    parser = _Parser(
        prog="cdb-vq",
        description="The cdb-vq image tokenizer: images <-> discrete tokens. Options of several words take '-' or '_' "
        "between them (--batch-size or --batch_size).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, function, help: str, model_required: bool = True) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument(
            "--model",
            required=model_required,
            help="Hub repo id (org/name) or local folder saved with save_pretrained",
        )
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        command.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: float32)")
        command.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="load through AutoModel with trust_remote_code=True, as transformers would; with this package "
            "installed its own classes are used anyway, so a folder's or repository's code (auto_map) still does not "
            "run (default: off)",
        )
        command.add_argument(
            "--revision",
            default=None,
            help="branch, tag or commit of a Hub model (default: main; decode: the commit recorded in the token file)",
        )
        command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        command.set_defaults(function=function)
        return command

    def add_overwrite(command: argparse.ArgumentParser) -> None:
        command.add_argument("--overwrite", action="store_true", help="replace output files that exist already")

    def add_data_arguments(command: argparse.ArgumentParser, split: str | None = "train") -> None:
        command.add_argument("--data", required=True, help="image folder, or a data set on the Hub")
        # None: eval's `_apply_protocol` picks the split, and must tell a --split given from none.
        shown = split or "train; with --protocol, the protocol's"
        command.add_argument("--split", default=split, help=f"split of the data set (default: {shown})")
        command.add_argument("--image_column", default="image", help="column holding the images (default: image)")
        command.add_argument("--max_images", type=_positive_int, default=None, help="use at most this many images")
        _add_pixel_budget(command)

    encode = add_command("encode", encode_command, "Encode images into a safetensors file of token grids.")
    encode.add_argument("images", nargs="+", help="image files")
    encode.add_argument("--out", required=True, type=expand_home, help="output .safetensors file")
    encode.add_argument("--batch_size", type=_positive_int, default=16)
    add_overwrite(encode)
    _add_pixel_budget(encode)

    decode = add_command("decode", decode_command, "Decode a token file into PNG images.", model_required=False)
    decode.add_argument("tokens", help="a .safetensors file written by `cdb-vq encode`")
    decode.add_argument("--out", required=True, type=expand_home, help="output folder")
    decode.add_argument("--batch_size", type=_positive_int, default=16)
    add_overwrite(decode)
    _add_pixel_budget(decode, "refuse token grids that decode to images of more pixels than this")
    decode.epilog = "The model recorded in the token file is used unless --model is given."

    reconstruct = add_command(
        "reconstruct", reconstruct_command, "Reconstruct images through their tokens; print PSNR."
    )
    reconstruct.add_argument("images", nargs="+", help="image files")
    reconstruct.add_argument("--out", required=True, type=expand_home, help="output folder")
    reconstruct.add_argument("--batch_size", type=_positive_int, default=16)
    add_overwrite(reconstruct)
    reconstruct.add_argument("--role-map", action="store_true",
                             help="also write each image beside its role map (the role of every token as a translucent colour) to OUT/role_maps/")  # fmt: skip
    _add_pixel_budget(reconstruct)

    restore = add_command("restore", restore_command, "Restore degraded images with a model trained for restoration (train.py --degradation).")
    restore.add_argument("images", nargs="+", help="degraded image files")
    restore.add_argument("--out", required=True, type=expand_home, help="output folder for the restored PNGs")
    restore.add_argument("--batch_size", type=_positive_int, default=16)
    add_overwrite(restore)
    _add_pixel_budget(restore)

    evaluate = add_command(
        "eval", eval_command, "PSNR, SSIM, LPIPS, rFID, codebook utilization and perplexity on a data set."
    )
    add_data_arguments(evaluate, split=None)
    evaluate.add_argument("--batch_size", type=_positive_int, default=16)
    evaluate.add_argument("--out", default=None, type=expand_home, help="also write the metrics to this JSON file")
    add_overwrite(evaluate)
    evaluate.add_argument(
        "--resolution", type=_positive_int, default=None,
        help="resize the shorter side to N and centre-crop N x N (default: the model's image processor)",
    )  # fmt: skip
    evaluate.add_argument(
        "--fid", action="store_true",
        help="also compute rFID (torchmetrics' FrechetInceptionDistance; reference: the same crops)",
    )  # fmt: skip
    evaluate.add_argument(
        "--fid_weights", default=None, help="the FID Inception weights file (default: the torch hub cache)"
    )
    evaluate.add_argument(
        "--fid_reference", default=None, type=expand_home,
        help="reference statistics (.safetensors): used when it exists, else computed from these crops and saved",
    )  # fmt: skip
    evaluate.add_argument(
        "--fid_feature_extractor", choices=["inception", "random"], default="inception",
        help="'random': a small random network, to smoke-test the rFID path offline (numbers not comparable)",
    )  # fmt: skip
    evaluate.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default=None,
        help="'imagenet': the standard rFID protocol (--split validation --max_images 50000 --resolution 256 --fid)",
    )  # fmt: skip
    evaluate.add_argument(
        "--lpips", action=argparse.BooleanOptionalAction, default=True,
        help="LPIPS (VGG) when its weights are in the torch hub cache",
    )  # fmt: skip

    inspect = add_command("inspect", inspect_command, "Codebook size, assignment rule, roles and most used codes.")
    inspect.add_argument("--top", type=_positive_int, default=10, help="how many of the most used codes to list")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--codes", default=None, type=expand_home, help="write one record per code (model.code_report()) to this .csv or .json file")
    add_overwrite(inspect)

    tokenize = add_command("tokenize", tokenize_command, "Tokenize an image data set for a prior (save_to_disk).")
    add_data_arguments(tokenize)
    tokenize.add_argument("--out", required=True, type=expand_home, help="output folder for Dataset.save_to_disk")
    tokenize.add_argument(
        "--label_column", default=None, help="column of integer class labels to keep (default: label, if present)"
    )
    tokenize.add_argument("--batch_size", type=_positive_int, default=32)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdb-vq` with `argv` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    budget = getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    # PIL's own decompression-bomb limit (it raises at twice its MAX_IMAGE_PIXELS) must not stop an image the budget
    # allows; smaller images are refused by the budget check from their header first.
    Image.MAX_IMAGE_PIXELS = max(budget, _PIL_MAX_IMAGE_PIXELS) if budget else None
    _created_folders.clear()
    try:
        with sigterm_as_interruption():  # a `kill` cleans up as Ctrl-C does
            args.function(args)
    except KeyboardInterrupt as interruption:
        remove_created_folders()
        what, status = interruption_status(interruption)
        print(f"cdb-vq {args.command}: {what}", file=sys.stderr)
        return status
    except Exception as error:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        remove_created_folders()  # a refused command leaves no empty output folders behind
        if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
            # A reader that closed early (`| head`): stop quietly, as a command killed by SIGPIPE. Files are written
            # whole (files.py), so none is left half-written; the exit flush must not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, what a shell reports for such a command
        if args.debug:
            traceback.print_exc()
        if isinstance(error, CLIError):
            message = str(error)
        elif isinstance(error, Image.DecompressionBombError):
            message = f"an image is too large to decode safely (a decompression bomb?): {first_line(error)}"
        elif isinstance(error, OSError) and error.filename is not None:
            message = f"{error.filename}: {error.strerror or first_line(error)}"
        else:
            message = f"{first_line(error)} ({type(error).__name__}{'' if args.debug else '; --debug shows where'})"
        print(f"cdb-vq {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
