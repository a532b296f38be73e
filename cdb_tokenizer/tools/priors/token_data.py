"""Tokenised data sets for priors: a data set of images mapped through a tokenizer, and photo crops for tests and demos."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from ..data import MAX_REPORTED_UNREADABLE, decode_image, sample_photos, skipped_image_message
from ..files import write_text
from .model import is_image_size, is_positive_int

logger = logging.getLogger(__name__)


# Written beside a tokenised data set (`save_tokens`): which codebook its ids index, and on which grid.
TOKENS_INFO = "cdb_vq_tokens.json"
# Recorded together, or not at all (older folders record none: their grid is inferred from the token count).
GRID_FIELDS = ("image_size", "grid_height", "grid_width")


def save_tokens(
    tokenized, folder: str | Path, model, fingerprint: str | None = None, image_size: tuple[int, int] | None = None
) -> Path:
    """`tokenized.save_to_disk(folder)`, plus `cdb_vq_tokens.json` recording the codebook the ids index (its size
    and fingerprint), so that a prior is never trained with, or decoded by, another tokenizer by mistake.

    `fingerprint` is `cdb_tokenizer.tools.cli.codebook_fingerprint` of the model as saved (float32 codes); give it
    when `model` was cast to half precision (its codes then round, and so would a fingerprint taken now).
    `image_size` (height, width) in pixels is the size the processor made the images (`processor_image_size`): it is
    recorded with its token grid (`grid_height`, `grid_width`), so that the raster layout is never guessed from the
    token count; a grid that does not hold the sequences' tokens is a ValueError, before anything is written."""
    from ..cli import codebook_fingerprint

    folder = Path(folder)
    fingerprint = fingerprint or codebook_fingerprint(model)
    info = {"codebook_size": model.config.codebook_size, "codebook_fingerprint": fingerprint}
    if image_size is not None:
        info.update(_grid_info(tokenized, model, image_size))
    else:
        logger.warning("save_tokens: no image_size given, so no token grid is recorded: a prior will infer it.")
    # An earlier run's record goes first: a crash while saving must not leave new ids beside the old codebook's.
    # (A link is left for `write_text` to refuse.)
    info_file = folder / TOKENS_INFO
    if info_file.is_file() and not info_file.is_symlink():
        info_file.unlink()
    tokenized.save_to_disk(str(folder))
    write_text(folder / TOKENS_INFO, json.dumps(info, indent=2) + "\n")  # whole, and never through a link
    return folder


class TokenGridMismatch(ValueError):
    """The image size given to `save_tokens` makes another token grid than the sequences hold."""


def _grid_info(tokenized, model, image_size: tuple[int, int]) -> dict[str, Any]:
    """The record of `image_size` and its token grid, checked against the first sequence's length."""
    height, width = image_size
    grid_height, grid_width = model.token_grid_size(height, width)
    first = next(iter(tokenized.values())) if isinstance(tokenized, dict) else tokenized  # a DatasetDict's first split
    length = len(first[0]["image_tokens"])
    if grid_height * grid_width != length:
        raise TokenGridMismatch(
            f"{height}x{width} images have a {grid_height}x{grid_width} token grid, but the sequences hold {length} "
            f"tokens: give the image_size the processor made the images at."
        )
    return {"image_size": [height, width], "grid_height": grid_height, "grid_width": grid_width}


def read_tokens_info(folder: str | Path, num_image_tokens: int | None = None) -> dict[str, Any] | None:
    """What `save_tokens` recorded about the token data in `folder` (`codebook_size`, `codebook_fingerprint` and,
    when recorded, `image_size`, `grid_height`, `grid_width`), or None when the folder records nothing; a damaged
    record, or a grid that does not hold `num_image_tokens` tokens (when given), is a ValueError."""
    path = Path(folder) / TOKENS_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info["codebook_fingerprint"], str):
            raise TypeError("not a record of the codebook")
        if not isinstance(info.get("codebook_size"), int) or info["codebook_size"] < 1:
            raise TypeError(f"codebook_size {info.get('codebook_size')!r}")
        _check_grid_fields(info)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is damaged ({error}).") from None
    grid = recorded_grid(info)
    if grid and num_image_tokens is not None and math.prod(grid) != num_image_tokens:
        raise ValueError(
            f"{path} records a {grid[0]}x{grid[1]} token grid ({math.prod(grid)} tokens per image), but the data "
            f"hold {num_image_tokens} tokens per image: the record belongs to other token data."
        )
    return info


def _check_grid_fields(info: dict[str, Any]) -> None:
    """All three grid fields or none (folders written before they were recorded); positive whole numbers."""
    present = [key for key in GRID_FIELDS if key in info]
    if present and len(present) < len(GRID_FIELDS):
        raise TypeError(f"{', '.join(sorted(set(GRID_FIELDS) - set(present)))} missing beside {', '.join(present)}")
    if not present:
        return
    size = info["image_size"]
    if not is_image_size(size):
        raise TypeError(f"image_size {size!r}, not [height, width] in pixels")
    for key in ("grid_height", "grid_width"):
        if not is_positive_int(info[key]):
            raise TypeError(f"{key} {info[key]!r}")


def recorded_grid(info: dict[str, Any] | None) -> tuple[int, int] | None:
    """(grid_height, grid_width) a `read_tokens_info` record holds, or None (none recorded: an older folder)."""
    return (info["grid_height"], info["grid_width"]) if info and "grid_height" in info else None


def check_tokens_source(folder: str | Path, model) -> None:
    """Refuse token data that `model` did not make (its recorded codebook differs, or its token grid at the recorded
    image size); warn when none is recorded."""
    from ..cli import codebook_fingerprint

    info = read_tokens_info(folder)
    if info is None:
        logger.warning(
            "%s records no tokenizer (%s is missing: made with save_to_disk rather than save_tokens or "
            "`cdb-vq tokenize`): it cannot be checked against the tokenizer given.", folder, TOKENS_INFO
        )
        return
    recorded = info["codebook_fingerprint"]
    if recorded != codebook_fingerprint(model):
        size, made_with = model.config.codebook_size, info["codebook_size"]
        sizes = f"; {made_with} codes, the tokenizer given has {size}" if made_with != size else ""
        raise ValueError(
            f"{folder} was tokenised by another tokenizer (codebook fingerprint {recorded}, the tokenizer given has "
            f"{codebook_fingerprint(model)}{sizes}): its ids index other codes. Tokenise the images again with this "
            f"one."
        )
    grid = recorded_grid(info)
    if grid is None:
        return
    # The same codes with another downsampling factor would decode the tokens in another raster layout.
    height, width = info["image_size"]
    try:
        made = model.token_grid_size(height, width)
    except ValueError:  # not divisible by its downsampling factor
        made = None
    if made != grid:
        layout = f"a {made[0]}x{made[1]} grid" if made else "no whole token grid"
        raise ValueError(
            f"{folder} records {height}x{width} images on a {grid[0]}x{grid[1]} token grid ({TOKENS_INFO}), but the "
            f"tokenizer given makes {layout} at that size: it would decode them in another layout. Use the one that "
            f"made them."
        )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenize_dataset(
    dataset,
    model,
    processor,
    image_column: str = "image",
    label_column: str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    cache_file_name: str | None = None,
    max_pixels: int | None = None,
):
    r"""
    Map an image data set to token sequences for a prior, with `Dataset.map(batched=True)`.

    Args:
        dataset (`datasets.Dataset`): Images in `image_column`: anything `cdb_tokenizer.tools.data.decode_image` reads
            (PIL images, arrays, undecoded `{"bytes", "path"}` values as `load_image_dataset` gives, paths).
            Unreadable images are skipped with a warning.
        model (`CDBVQModel`): The tokenizer; its `get_image_tokens` gives raster-order code ids.
        processor (`CDBVQImageProcessor`): Turns the images into `pixel_values` (its size sets the token grid).
        image_column (`str`, *optional*, defaults to `"image"`): Column holding the images.
        label_column (`str`, *optional*): Column holding integer class labels, kept as `label`. When `None`, a
            `label` column is kept if the data set has one.
        batch_size (`int`, *optional*, defaults to 32): Images per `map` batch.
        device (`str` or `torch.device`, *optional*): Where the tokenizer runs; defaults to CUDA when present. The
            model is moved back afterwards.
        cache_file_name (`str`, *optional*): Arrow file to cache the result in. As everywhere in `datasets`, an
            existing file of that name is loaded as is: delete it after changing the tokenizer or the data.
        max_pixels (`int`, *optional*): Images announcing more pixels are skipped, like unreadable ones; by default
            `decode_image`'s budget (`cdb_tokenizer.tools.data.MAX_IMAGE_PIXELS`), 0 for none. Pass the same budget
            as any earlier check (`cdb-vq tokenize --max_image_pixels`), or images it allowed are dropped here.

    Returns:
        `datasets.Dataset` with `image_tokens` (list of ints, length h * w), `source_index` (the row of `dataset` each
        came from: rows close up over skipped images, so this is how a row finds its image) and, with labels,
        `label` (a `ClassLabel` when the source column is one). Without `cache_file_name` the result is cached by `datasets` under a
        fingerprint of the data, the tokenizer's weights and config, and the processor.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"tokenize_dataset expects a datasets.Dataset, got {type(dataset).__name__}"
            + ("; pick a split first, e.g. dataset['train']." if isinstance(dataset, datasets.DatasetDict) else ".")
        )
    if image_column not in dataset.column_names:
        raise ValueError(f"image column {image_column!r} not found; the data set has columns {dataset.column_names}.")
    if label_column is None and "label" in dataset.column_names and image_column != "label":
        label_column = "label"
    elif label_column is not None and label_column not in dataset.column_names:
        raise ValueError(f"label column {label_column!r} not found; the data set has columns {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError("the data set is empty: there is nothing to tokenise.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")

    features = {"image_tokens": datasets.List(datasets.Value("int32")), "source_index": datasets.Value("int64")}
    if label_column is not None:
        label_feature = dataset.features[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            features["label"] = label_feature
        elif isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")):
            features["label"] = datasets.Value("int64")
        else:
            raise ValueError(
                f"label column {label_column!r} must hold integer class labels, got {label_feature}; "
                f"encode it first, e.g. dataset.class_encode_column({label_column!r})."
            )

    device = torch.device(device) if device is not None else _default_device()
    original_device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    fingerprint = hashlib.sha256(
        "|".join(
            [dataset._fingerprint, model.config.to_json_string(), _weights_fingerprint(model),
             processor.to_json_string(), image_column, str(label_column), str(max_pixels), "source_index"]
        ).encode()
    ).hexdigest()[:32]  # fmt: skip

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        errors = [[] for _ in batch[image_column]]  # per image: why it was skipped
        images = [
            decode_image(value, max_pixels=max_pixels, errors=found) for value, found in zip(batch[image_column], errors)
        ]
        readable = [index for index, image in enumerate(images) if image is not None]
        if len(readable) < len(images):  # an unreadable file is skipped (counted, the first few named), not a crash
            for value, image, found in zip(batch[image_column], images, errors):
                if image is None:
                    skipped[0] += 1
                    if skipped[0] <= MAX_REPORTED_UNREADABLE:
                        logger.warning("Skipping unreadable image %s.", skipped_image_message(value, found))
        output: dict[str, list] = {"image_tokens": [], "source_index": [indices[index] for index in readable]}
        if label_column is not None:
            output["label"] = [batch[label_column][index] for index in readable]
        if readable:
            pixel_values = processor([images[index] for index in readable], return_tensors="pt").pixel_values
            tokens = model.get_image_tokens(pixel_values.to(device=device, dtype=dtype))
            output["image_tokens"] = tokens.cpu().tolist()
        return output

    skipped = [0]
    model.to(device).eval()
    try:
        tokenized = dataset.map(
            tokenize_batch,
            with_indices=True,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            features=datasets.Features(features),
            cache_file_name=cache_file_name,
            new_fingerprint=fingerprint,
            desc="tokenizing",
        )
    finally:
        model.to(original_device).train(was_training)
    if len(tokenized) == 0:
        raise ValueError(f"none of the {len(dataset)} images in column {image_column!r} could be read.")
    return tokenized


def photo_crops_dataset(
    num_crops_per_photo: int = 64,
    side_range: tuple[float, float] = (0.25, 0.5),
    seed: int = 0,
    source: str = "skimage",
):
    """The embedded default image data set: random square crops of the photos that ship in pip packages.

    Each crop's side is a random share (uniform in `side_range`) of its photo's shorter side, and its `label` is the photo's index
    in `sample_photos(source)` (a `ClassLabel`, 16 classes for scikit-image), so a class-conditional prior learns one
    class per photo. A different `seed` gives different crops of the same photos (use it for a validation split).
    """
    import datasets

    low, high = side_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"side_range must satisfy 0 < low <= high <= 1, got {side_range}.")
    if num_crops_per_photo < 1:
        raise ValueError(f"num_crops_per_photo must be at least 1, got {num_crops_per_photo}.")
    photos = sample_photos(source)
    rng = random.Random(seed)
    images, labels = [], []
    for index, photo in enumerate(photos):
        width, height = photo.size
        for _ in range(num_crops_per_photo):
            side = max(1, round(min(width, height) * rng.uniform(low, high)))
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
            images.append(photo.crop((left, top, left + side, top + side)))
            labels.append(index)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"photo_{i}" for i in range(len(photos))])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
