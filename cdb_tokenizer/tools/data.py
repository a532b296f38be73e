"""Image data for training and evaluation (training-only: never imported by the modeling files).

- `sample_photos` gives the real photos that ship inside pip packages, so the embedded default, the tests and the
  benchmarks run with no network: scikit-image's sample photos (and its colour wheel) for training, scikit-learn's
  two sample photos (a different source, so no leakage) for held-out evaluation.
- `load_image_dataset` opens an `imagefolder` directory or a Hub data set through `datasets`, with the image
  column left undecoded so that `decode_image` can turn a broken file into `None` (skipped and counted) instead of
  a crash in the middle of a run.
- `TrainImages` / `StreamingTrainImages` turn such a data set (or a list of photos) into augmented training crops
  (random resized crop + horizontal flip); `EpochSampler` gives each process its share of a seeded, per-epoch
  order that a resumed run can re-enter at any batch.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from pathlib import Path

import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..image_processing_cdb_vq import composite_on_white, greyscale_intensities, upright
from .messages import first_line

logger = logging.getLogger(__name__)

# scikit-image photos that ship inside the wheel (no download); greyscale ones are converted to RGB. Nine colour
# photos (the stereo pair gives two) and seven greyscale ones. The benchmarks train on these 16.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
    "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock",
)  # fmt: skip
# The embedded demo's training images: the same photos less three greyscale ones (moon, coins, clock), plus
# scikit-image's colour wheel (every hue, from white at the centre to saturated and dark at the rim) as it is, darker
# and paler: the photos have few greens, teals and sky blues, and a tokenizer trained on them alone renders those
# colours shifted (docs/training.md, "How the tiny preset was chosen"). (gain, offset) per copy, on 0-255.
DEMO_LEFT_OUT = ("moon", "coins", "clock")
COLOUR_WHEELS = ((1.0, 0.0), (0.55, 0.0), (0.5, 100.0))

# How many unreadable images are reported one by one before only the count is kept.
MAX_REPORTED_UNREADABLE = 5
# Images with more pixels than this are not decoded (a 64-megapixel RGB image already takes 192 MB decoded, and a
# small file can announce gigapixels). Change it here, or per call with `decode_image(..., max_pixels=...)`.
MAX_IMAGE_PIXELS = 64_000_000


def sample_photos(source: str = "skimage") -> list[Image.Image]:
    """Real RGB images shipped with a pip package: `"skimage"` (scikit-image's 16 photos: the benchmarks' training
    set), `"demo"` (the embedded demo's training set: 13 of those photos and 3 versions of scikit-image's colour
    wheel) or `"sklearn"` (scikit-learn's 2 photos, the held-out set of both)."""
    if source in ("skimage", "demo"):
        import skimage.data

        photos = []
        for name in SKIMAGE_PHOTOS:
            if source == "demo" and name in DEMO_LEFT_OUT:
                continue
            image = getattr(skimage.data, name)()
            for array in image[:2] if isinstance(image, tuple) else [image]:  # the stereo pair gives two photos
                photos.append(Image.fromarray(array).convert("RGB"))
        if source == "demo":
            wheel = skimage.data.colorwheel().astype(np.float32)
            for gain, offset in COLOUR_WHEELS:
                photos.append(Image.fromarray(np.clip(wheel * gain + offset + 0.5, 0, 255).astype(np.uint8)).convert("RGB"))
        return photos
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(array).convert("RGB") for array in load_sample_images().images]
    raise ValueError(f"source must be 'skimage', 'demo' or 'sklearn', got {source!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------------


class SplitNotFoundError(ValueError):
    """The requested split does not exist in the data set (the message lists the ones that do)."""


def load_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """Open one split of an image data set, with `image_column` left undecoded (decode with `decode_image`).

    Either source may also be a folder written by `Dataset.save_to_disk` (everything is `train`) or
    `DatasetDict.save_to_disk` (its splits), read with `datasets.load_from_disk` (Arrow files and JSON: nothing runs).

    Args:
        train_data_dir: A folder of images for `datasets`' `imagefolder` builder (sub-folders `train/`,
            `validation/`, `test/` become splits; otherwise everything is `train`).
        dataset_name: A data set on the Hub (or a local script/folder `datasets.load_dataset` understands).
        dataset_config_name: Its configuration, if it has several.
        split: The split to open.
        image_column: The column holding the images.
        streaming: Stream the data instead of downloading it (returns an `IterableDataset`).
        cache_dir: Where `datasets` caches downloads.

    Returns:
        A `datasets.Dataset` (or `IterableDataset` when streaming) whose `image_column` holds undecoded values
        (`{"bytes": ..., "path": ...}` dicts).

    Raises:
        FileNotFoundError: `train_data_dir` does not exist or holds no images.
        SplitNotFoundError: `split` is not one of the data set's splits.
        ValueError: neither or both sources were given, or `image_column` is not a column (the message lists them).
    """
    import datasets

    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Give exactly one image source: train_data_dir (a folder) or dataset_name (a Hub data set).")
    local = Path(train_data_dir or dataset_name).expanduser()
    saved = local.is_dir() and saved_to_disk(local)
    if saved:
        dataset, source = open_saved_dataset(local, split, streaming), f"the data set saved in {str(local)!r}"
    elif train_data_dir is not None:
        folder = Path(train_data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"the image folder {str(folder)!r} does not exist or is not a directory.")
        roots = split_folders(folder)
        try:
            # Every split's files, even for one split: `datasets` names the classes (label ids) from all of them, so
            # a validation split that lacks a class keeps the training split's ids.
            dataset = datasets.load_dataset(
                "imagefolder", data_files=imagefolder_files(roots), split=split, streaming=streaming, cache_dir=cache_dir
            )
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise FileNotFoundError(f"found no images in the folder {str(folder)!r}: {error}") from error
        except ValueError as error:
            _raise_if_unknown_split(error, split, f"the image folder {str(folder)!r}")
            if "corresponds to no data" in str(error):  # files there, but none an image (datasets' wording)
                raise FileNotFoundError(f"found no images in the folder {str(folder)!r} (split {split!r}).") from error
            raise
        ignored = _ignored_entries(folder, list(roots.values())) if roots["train"] != folder and split == "train" else []
        if ignored:
            shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
            logger.warning(
                "The image folder %r has a train/ folder, so only its train/, validation/ and test/ folders are read; its "
                "other folders and images at the top (%d) are ignored: %s. Move their images into those folders "
                "(held-out images go in validation/ or test/, not val/ or dev/; a metadata file goes inside each "
                "split folder).", str(folder), len(ignored), shown,
            )  # fmt: skip
        linked = _linked_folders(list(roots.values()))
        if linked:
            logger.warning(
                "The image folder %r: sub-folders that are links are not followed (datasets' file search skips them), so "
                "their images are not used: %s. Copy them in, or link the image files themselves.",
                str(folder), ", ".join(str(path.relative_to(folder)) for path in linked),
            )  # fmt: skip
        source = f"the image folder {str(folder)!r}"
    else:
        if local.is_dir() and glob.has_magic(str(local.resolve())):
            # datasets finds a local data set's files with glob patterns built from its (resolved) path, unescaped:
            # `data[1]` would read the files of a sibling `data1`, also through a link of a plain name.
            raise ValueError(
                f"dataset_name {dataset_name!r} is the folder {str(local.resolve())!r}, whose path holds a glob "
                "character (*, ? or [): datasets would read the files of other folders that the pattern matches. "
                "Rename the folders with those characters, or copy the data set to a plain path."
            )
        only_this_split = {} if streaming else _split_files(dataset_name, dataset_config_name, split, cache_dir)
        try:
            dataset = datasets.load_dataset(
                dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir,
                **only_this_split,
            )  # fmt: skip
        except ValueError as error:
            dataset = _split_prepared_alone(dataset_name, dataset_config_name, split, cache_dir, streaming, error)
            if dataset is None:
                _raise_if_unknown_split(error, split, f"data set {dataset_name!r}")
                raise
        source = f"data set {dataset_name!r}"

    columns = dataset.column_names
    if columns is not None and image_column not in columns:
        raise ValueError(f"image_column {image_column!r} is not a column of {source}; its columns are {list(columns)}.")
    feature = (dataset.features or {}).get(image_column)
    image_like = isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    )  # paths or encoded bytes cast to images; anything else cannot be one
    if feature is not None and not image_like:
        raise ValueError(f"image_column {image_column!r} of {source} holds {feature}, not images; its columns are {list(columns)}.")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if dataset_name is not None or saved:
        # An image given as a path is opened only when it is the data set's own file (its folder, the Hugging Face
        # caches, hf:// URLs): the data set's word does not reach other files of the machine.
        roots = [str(root) for root in (cache_dir, local if local.is_dir() else None) if root]
        screen = DataSetImagePaths(image_column, roots, repo_id=None if local.is_dir() else dataset_name)
        dataset = dataset.map(screen) if streaming else dataset.with_transform(screen)
    return dataset


class DataSetImagePaths:
    """Screens the image values of a `dataset_name` data set (a transform, picklable for loader workers): a value that
    is only a path (no bytes) is kept when it names the data set's own files, in the Hugging Face caches or
    `extra_roots` (its local folder, --cache_dir), or a `hf://` URL of its own repository `repo_id` (also inside an
    archive, `zip://a.png::hf://...`), and blanked otherwise: a stranger's data set naming `/home/me/photo.jpg` or a
    URL would have the run read it and show it in its validation pictures (which publishing uploads). Blanked images
    are skipped as unreadable."""

    def __init__(self, image_column: str, extra_roots: Sequence[str] = (), repo_id: str | None = None):
        import datasets
        from huggingface_hub import constants

        self.image_column = image_column
        self.warned = False
        # The Hub cache only where this repository's files go, not every cached repository's.
        hub = [Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"] if repo_id else []
        roots = [*hub, datasets.config.HF_DATASETS_CACHE, *extra_roots]
        self.roots = [str(Path(root).expanduser().resolve()) for root in roots]
        # Only the data set's own repository: another one's files would be fetched with the user's token.
        self.repo_urls = [
            f"{base}{repo_id}{end}" for base in ("hf://datasets/", "https://huggingface.co/datasets/") for end in "/@"
        ] if repo_id else []  # fmt: skip

    def allowed(self, path: str) -> bool:
        # A chained path (zip://a.png::hf://...) is opened from its last part, through archives before it.
        *inner, outer = path.split("::")
        if any(not ARCHIVE_URL.match(part) for part in inner):
            return False
        if "://" in outer:
            # `..` would climb out of the repository once the URL is resolved (with the user's token).
            segments = re.split(r"[/@]", outer.split("://", 1)[1])
            return "." not in segments and ".." not in segments and outer.startswith(tuple(self.repo_urls))
        if outer.startswith("~"):  # opened as written (relative to the working directory), so never expanded here
            return False
        resolved = Path(outer).resolve()
        return any(resolved.is_relative_to(root) for root in self.roots)

    def screened(self, value):
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            if not self.allowed(str(value["path"])):
                if not self.warned:  # once per data set (and loader worker)
                    self.warned = True
                    logger.warning(
                        "The data set names image files outside it (e.g. %s): they are skipped, never read (a folder of "
                        "your own images goes in --train_data_dir).", value["path"],
                    )  # fmt: skip
                return refused_value(str(value["path"]))
        return value

    def __call__(self, examples: dict) -> dict:
        values = examples[self.image_column]
        batch = isinstance(values, list)  # with_transform gives batches, IterableDataset.map single examples
        examples[self.image_column] = [self.screened(v) for v in values] if batch else self.screened(values)
        return examples


# The path a screened-out image is given: a short digest of the original path keeps blanked images apart (each
# counted once) without naming the file, which `decode_image` refuses to open.
REFUSED_PATH_PREFIX = "outside-the-data-set:"


def refused_value(path: str) -> dict:
    """The image value standing for `path`, a file the data set may not open."""
    return {"bytes": None, "path": REFUSED_PATH_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:16]}


SPLIT_FOLDERS = ("train", "validation", "test")
# The archive layers a chained fsspec path may go through (zip://a.png::...), none of which opens a file itself.
ARCHIVE_URL = re.compile(r"(zip|tar|gzip|bz2|xz|zstd|lz4)://")


# Shards per process of a `save_to_disk` data set streamed with --streaming (room for that many loader workers).
SAVED_DATASET_SHARDS_PER_PROCESS = 8


def saved_to_disk(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`load_dataset` refuses
    the first, and reads the second's Arrow files as a data set of its own making)."""
    a_dict = (folder / "dataset_dict.json").is_file()
    return a_dict or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _split_files(dataset_name: str, config_name: str | None, split: str, cache_dir: str | None) -> dict:
    """`load_dataset` arguments that read the files of `split` alone: `datasets` otherwise downloads and prepares
    every split for one (ImageNet's 140 GB training set for `cdb-vq eval --protocol imagenet`). Only where that
    cannot change the data: files that carry their own features (parquet, arrow) or features the data set declares
    (an image folder would name its classes from this split's folders alone); {} for the usual full load otherwise
    (a split expression such as `train[:10%]`, another builder, a builder that cannot be read)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(dataset_name, config_name, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - the full load below says what is wrong (offline, no such data set, ...)
        return {}
    files = dict(builder.config.data_files or {})
    if split not in files or len(files) < 2:
        return {}
    features = builder.info.features
    if features is None and builder.name not in ("parquet", "arrow"):
        return {}
    return {"data_files": {split: files[split]}, **({"features": features} if features is not None else {})}


def _split_prepared_alone(
    dataset_name: str, config_name: str | None, split: str, cache_dir: str | None, streaming: bool, error: Exception
):
    """Offline (HF_HUB_OFFLINE, or the Hub unreachable), the split that an earlier load prepared alone
    (`_split_files`): datasets keeps it as `<config>-<hash>` in its cache, which its own offline lookup never picks
    ("Couldn't find cache for ..."). None when there is no such split (the caller raises `error` then)."""
    if "Couldn't find cache for" not in str(error) or streaming:
        return None
    try:
        import datasets
        from datasets.naming import camelcase_to_snakecase
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError:  # another datasets' layout: the original error stands
        return None
    parts = dataset_name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    configs = (config_name,) if config_name else ("default", None)

    def holds_the_split(info_file: Path) -> bool:
        info = _json_object(info_file)
        return split in (info.get("splits") or {}) and info.get("config_name") in configs

    infos = root.glob(f"{config_name or '*'}-*/*/*/dataset_info.json")
    found = [info.parent for info in infos if holds_the_split(info)]
    if not found:
        return None
    config_id, version, commit = max(found, key=lambda folder: folder.stat().st_mtime).parts[-3:]
    try:  # datasets' own reader of its cache; should its internals change, the original error stands
        builder = Cache(cache_dir=cache_dir, dataset_name=dataset_name.split("/")[-1], repo_id=dataset_name,
                        config_name=config_id, version=version, hash=commit)  # fmt: skip
        return builder.as_dataset(split=split)
    except Exception:  # noqa: BLE001
        return None


def check_data_file_names(folder: Path, label: str) -> None:
    """Refuse a `save_to_disk` folder whose dataset_dict.json or state.json name files outside it (an absolute name,
    or one with `..`): `load_from_disk` would read them, and train or evaluate on other data than the folder's own.
    `label` names the folder in the message (`--tokens_dir tokens/`). A file that cannot be read as JSON is left for
    `load_from_disk` to call damaged."""

    def outside(name) -> bool:
        return isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts)

    folders = [folder]
    splits = _json_object(folder / "dataset_dict.json").get("splits")
    if isinstance(splits, list):
        if any(outside(split) or "/" in str(split) or "\\" in str(split) for split in splits):
            raise ValueError(f"{label} is damaged: its dataset_dict.json names splits outside the folder ({splits}).")
        folders += [folder / str(split) for split in splits]
    for part in folders:
        entries = _json_object(part / "state.json").get("_data_files")
        names = [entry.get("filename") for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
        far = [name for name in names if outside(name)]
        if far:
            raise ValueError(f"{label} is damaged: {part / 'state.json'} names data files outside the folder "
                             f"({', '.join(far)}).")  # fmt: skip


def _json_object(path: Path) -> dict:
    """A JSON object from `path`, or {} when there is none (no such file, bad JSON, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def open_saved_dataset(folder: Path, split: str, streaming: bool):
    """One split of a `save_to_disk` folder (a lone `Dataset` is the `train` split), as an `IterableDataset` when
    streaming."""
    import datasets

    check_data_file_names(folder, f"the data set saved in {str(folder)!r}")
    saved = datasets.load_from_disk(str(folder))
    splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    if split not in splits:
        raise SplitNotFoundError(
            f"the data set saved in {str(folder)!r} has no split {split!r}; its splits are {list(splits)}."
        )
    if not streaming:
        return splits[split]
    # In shards, as a Hub stream is, and a multiple of the process count: else every process reads the whole set
    # (keeping its every k-th row), and one loader worker alone can run.
    processes, rows = int(os.environ.get("WORLD_SIZE", "1")), len(splits[split])
    per_process = max(1, min(SAVED_DATASET_SHARDS_PER_PROCESS, rows // processes))
    return splits[split].to_iterable_dataset(num_shards=processes * per_process if rows >= processes else 1)


def split_folders(folder: Path) -> dict[str, Path]:
    """The folder read for each split of an image folder: its `train/`, `validation/` and `test/` sub-folders when it
    has a `train/`, otherwise the whole folder as `train`. (Left to itself, `datasets` also makes splits of any file
    or folder whose name merely starts with a split keyword, e.g. `training_shoes/` or `test.png`, and drops the
    rest.)"""
    if (folder / "train").is_dir():
        return {name: folder / name for name in SPLIT_FOLDERS if (folder / name).is_dir()}
    return {"train": folder}


def imagefolder_files(roots: dict[str, Path]) -> dict[str, str]:
    """The `data_files` of an image folder: every file under its split folders (`split_folders`)."""
    # Escaped: `datasets` reads these as glob patterns, and `run[1]` would otherwise match a sibling `run1`.
    return {split: os.path.join(glob.escape(str(root)), "**") for split, root in roots.items()}


def _image_suffixes() -> tuple[str, ...]:
    """The file extensions `datasets`' imagefolder reads as images."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


def _ignored_entries(folder: Path, roots: Sequence[Path]) -> list[str]:
    """The top-level folders and image files of `folder` that are none of `roots` (hidden ones aside: `datasets`
    skips them too; a README or LICENSE holds no images)."""
    # By identity (`os.stat`, through links: a linked train/ is read; `Validation/` on macOS is `validation/`).
    read = {(stat.st_dev, stat.st_ino) for stat in map(os.stat, roots)}
    ignored, image_suffixes = [], _image_suffixes()
    with os.scandir(folder) as entries:
        for entry in entries:
            is_folder = _is_folder(entry)
            if entry.name.startswith((".", "__")) or not (is_folder or entry.name.lower().endswith(image_suffixes)):
                continue
            stat = os.stat(entry.path) if is_folder else None  # DirEntry.stat() has no inode on Windows
            if stat is None or (stat.st_dev, stat.st_ino) not in read:
                ignored.append(entry.name)
    return sorted(ignored)


def _linked_folders(roots: Sequence[Path], limit: int = 5) -> list[Path]:
    """Up to `limit` sub-folders under `roots` that are symbolic links to folders (a walk of the folder trees that
    lists entries without opening any file). The roots themselves may be links: `datasets` reads those."""
    found, stack = [], list(roots)
    while stack and len(found) < limit:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_symlink() and _is_folder(entry):
                    found.append(Path(entry.path))
    return sorted(found[:limit])


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether a folder entry is (or links to) a folder; a link in a loop (or one the walk may not follow) is not:
    `datasets` skips it, and `DirEntry.is_dir` raises there instead of answering."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _raise_if_unknown_split(error: ValueError, split: str, source: str) -> None:
    message = str(error)
    # datasets says "Unknown split ..." when downloading and "Bad split ..." when streaming.
    if message.startswith(("Unknown split", "Bad split")):
        raise SplitNotFoundError(f"{source} has no split {split!r}: {message}") from error


def _local_or_remote(path: str):
    """A local file path as it is; a path `datasets` gives for a file inside an archive or a remote repository
    (`zip://000.png::/data/images.zip`, `hf://datasets/...`) read through `datasets`' fsspec opener (the file's bytes;
    the image is still decoded, and its pixel budget checked, by PIL here)."""
    if "://" not in path or os.path.exists(path):
        return path
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb") as handle:
        return io.BytesIO(handle.read())


def image_key(value) -> str:
    """An identity of a data-set image value that does not depend on where it sits in a stream: a digest of its
    bytes, else its path."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return hashlib.sha1(value["bytes"]).hexdigest()
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return hashlib.sha1(repr(value).encode()).hexdigest()


class WithoutImages:
    """A filter (picklable, for loader workers) keeping the examples whose image is not among `keys` (`image_key`)."""

    def __init__(self, keys: set[str], image_column: str):
        self.keys, self.image_column = keys, image_column

    def __call__(self, example: dict) -> bool:
        return image_key(example[self.image_column]) not in self.keys


def decode_image(value, max_pixels: int | None = None, errors: list[Exception] | None = None) -> Image.Image | None:
    """Turn a data-set image value into an upright RGB PIL image, or `None` when it cannot (or may not) be read.

    Accepts what an undecoded `datasets.Image` column holds (`{"bytes": ..., "path": ...}`), a file path, raw
    bytes, a PIL image or a NumPy array (H, W[, C]). The EXIF orientation is applied (a phone photo stored on its
    side comes out upright). Files announcing more than `max_pixels` pixels (default `MAX_IMAGE_PIXELS`; 0 or None
    after setting that to None: no limit, PIL's own decompression-bomb limit included) are refused from their header,
    before decoding. Callers skip `None` and count it; a caller that reports it can pass a list as `errors`, which
    gets the exception behind a `None` (a `PermissionError` for a data set's image outside it, never opened).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings(), _pil_limit_within(limit):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict):
                if value.get("bytes") is not None:
                    image = Image.open(io.BytesIO(value["bytes"]))
                elif str(value.get("path") or "").startswith(REFUSED_PATH_PREFIX):
                    raise PermissionError("the data set names this image file outside it; it is not opened")
                elif value.get("path"):
                    image = Image.open(_local_or_remote(value["path"]))
                else:
                    return None
            elif isinstance(value, (str, os.PathLike)):
                image = Image.open(value)
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, np.ndarray):
                image = Image.fromarray(value)
            else:
                return None
            if limit and image.width * image.height > limit:
                raise ValueError(f"{image.width}x{image.height} pixels is over the {limit / 1e6:g}-megapixel budget")
            image.load()  # PIL opens lazily: force the decode here so a truncated file fails now
        image = upright(image)
        grey = greyscale_intensities(image)  # 16-bit or float greyscale: PIL's convert("RGB") would clip it
        if grey is not None:
            image = Image.fromarray(grey[0].round().clamp(0, 255).to(torch.uint8).numpy(), mode="L")
        return composite_on_white(image).convert("RGB")  # transparent pixels on white rather than on black
    except Exception as error:  # noqa: BLE001 - any decoding failure means "unreadable"
        if errors is not None:
            errors.append(error)
        return None


_PIL_LIMIT_LOCK = threading.RLock()


@contextmanager
def _pil_limit_within(limit: int):
    """PIL's own decompression-bomb check (it raises above twice `Image.MAX_IMAGE_PIXELS`, when opening and again
    when loading some formats, e.g. TIFF) lifted while decoding, when our budget `limit` (0: none) allows more:
    `decode_image` checks that budget from the header before decoding. Other PIL users in the process see the lift."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or (limit and limit <= 2 * pil_limit):
        yield
        return
    with _PIL_LIMIT_LOCK:  # restored even when threads interleave
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def skipped_image_message(value, errors: Sequence[Exception]) -> str:
    """An unreadable image as a skip names it: its name and why `decode_image` gave None (the error it collected), as
    in "photo.png (9000x9000 pixels is over the 64-megapixel budget)"."""
    if not errors:
        reason = "not an image"
    elif isinstance(errors[-1], UnidentifiedImageError):  # its message shows a BytesIO's memory address
        reason = "not an image file PIL can read"
    else:
        reason = first_line(errors[-1]).rstrip(".")
    return f"{describe_image_value(value)} ({reason})"


def describe_image_value(value) -> str:
    """A short name for an image value in messages (its path when it has one)."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return f"<{type(value).__name__}>"


# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------


def train_transform(resolution: int, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True):
    """Random resized crop to `resolution` and a horizontal flip, giving a float tensor in [-1, 1]."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomResizedCrop(resolution, scale=tuple(crop_scale), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


def seeded_call(function, seed: int, *args):
    """Run `function(*args)` with torch's global RNG seeded by `seed` (and restored afterwards).

    torchvision's random transforms draw from the global RNG; seeding it per sample makes every crop a pure
    function of (seed, epoch, index), so a resumed run sees exactly the crops an uninterrupted run would.
    """
    # torch.manual_seed seeds the GPUs' generators too: keep theirs as well (they are the training's dropout's).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return function(*args)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed (63-bit) from the run seed, the epoch and the sample index."""
    return (seed * 1_000_003 + epoch * 2_147_483_647 + index * 7_919) % (2**63 - 1)


def fixed_crops(images: Sequence[Image.Image], resolution: int, crops_per_image: int, seed: int = 0,
                crop_scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:  # fmt: skip
    """Deterministic random resized crops (no flip) of each image: a fixed held-out set (N, 3, R, R) in [-1, 1]."""
    transform = train_transform(resolution, crop_scale, flip=False)
    crops = [
        seeded_call(transform, sample_seed(seed, 0, i * crops_per_image + j), image)
        for i, image in enumerate(images)
        for j in range(crops_per_image)
    ]
    return torch.stack(crops)


class TrainImages(torch.utils.data.Dataset):
    """Augmented crops of a map-style image source: a `datasets.Dataset` column or a list of images.

    An unreadable image is replaced by the next readable one (so batches keep their size on every process) and
    counted in the sample's `"skipped"` field (and named in `"skipped_ids"`, so a caller can count distinct files).
    Call `set_epoch` before each epoch: crops depend on
    (seed, epoch, index) only.
    """

    def __init__(self, images, transform, seed: int = 0, image_column: str = "image"):
        self.images = images
        self.transform = transform
        self.seed = seed
        self.image_column = image_column
        self.epoch = 0
        self._reported = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _value(self, index: int):
        item = self.images[index]
        return item[self.image_column] if isinstance(item, dict) else item

    def __getitem__(self, index: int) -> dict:
        skipped_ids = []
        for skipped in range(len(self)):
            position = (index + skipped) % len(self)
            value, errors = self._value(position), []
            image = decode_image(value, errors=errors)
            if image is not None:
                pixel_values = seeded_call(self.transform, sample_seed(self.seed, self.epoch, index), image)
                return {"pixel_values": pixel_values, "skipped": skipped, "skipped_ids": skipped_ids}
            skipped_ids.append(f"#{position}")
            if self._reported < MAX_REPORTED_UNREADABLE:
                self._reported += 1
                logger.warning("Skipping unreadable image %s.", skipped_image_message(value, errors))
        raise ValueError("None of the training images can be read.")


class StreamingTrainImages(torch.utils.data.IterableDataset):
    """Augmented crops of a streamed (`datasets.IterableDataset`) image source, already split for this process."""

    def __init__(self, images, transform, seed: int = 0, image_column: str = "image", shuffle_buffer: int = 1000,
                 process_index: int = 0):  # fmt: skip
        self.images = images
        self.transform = transform
        self.seed = seed
        self.process_index = process_index
        self.image_column = image_column
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        stream = self.images
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(self.epoch)
        skipped, reported, skipped_ids, held = 0, 0, [], None
        # Positions restart at 0 in every process's and loader worker's share of the stream: their crops must differ.
        worker = torch.utils.data.get_worker_info()
        stream_seed = self.seed + 1_000_003 * (self.process_index * 1024 + (worker.id if worker is not None else 0))
        for position, item in enumerate(stream):
            value, errors = item[self.image_column], []
            image = decode_image(value, errors=errors)
            if image is None:
                skipped += 1
                # A file is named by its path; a value without one by its content (the order changes per epoch).
                name = describe_image_value(value)
                if name.startswith("<"):
                    name = f"<{image_key(value)[:16]}>"
                skipped_ids.append(name)
                if reported < MAX_REPORTED_UNREADABLE:
                    reported += 1
                    logger.warning("Skipping unreadable image %s.", skipped_image_message(value, errors))
                continue
            pixel_values = seeded_call(self.transform, sample_seed(stream_seed, self.epoch, position), image)
            # Held back by one: unreadable files after the share's last readable image are counted on that image.
            if held is not None:
                yield held
            held = {"pixel_values": pixel_values, "skipped": skipped, "skipped_ids": skipped_ids}
            skipped, skipped_ids = 0, []
        if held is not None:
            held["skipped"] += skipped
            held["skipped_ids"] = held["skipped_ids"] + skipped_ids
            yield held


def collate_images(samples: list[dict]) -> dict:
    """Stack `pixel_values`, add up how many unreadable images were skipped for this batch and list which."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "skipped": sum(sample["skipped"] for sample in samples),
        "skipped_ids": [name for sample in samples for name in sample.get("skipped_ids", [])],
    }


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded per-epoch shuffle, whole global batches only, resumable at any batch.

    Each epoch is a permutation seeded by (seed, epoch), cut to a multiple of `batch_size * num_replicas`; process
    `rank` takes every `num_replicas`-th index, so every process gets the same number of batches. `set_epoch(epoch,
    skip_batches)` starts the next pass `skip_batches` batches in, without loading the skipped images.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True):  # fmt: skip
        global_batch = batch_size * num_replicas
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one global batch "
                f"(train_batch_size {batch_size} x {num_replicas} processes = {global_batch})."
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}] (one epoch), got {skip_batches}.")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        order = order[: self.batches_per_epoch * self.batch_size * self.num_replicas]
        mine = order[self.rank :: self.num_replicas]
        return iter(mine[self.skip_batches * self.batch_size :].tolist())


__all__ = [
    "EpochSampler",
    "SplitNotFoundError",
    "StreamingTrainImages",
    "TrainImages",
    "collate_images",
    "decode_image",
    "fixed_crops",
    "load_image_dataset",
    "sample_photos",
    "train_transform",
    "upright",
]
