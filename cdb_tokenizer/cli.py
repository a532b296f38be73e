"""The `cdb-vq` command line: images to tokens and back, reconstruction, evaluation, inspection, tokenised data sets.

```bash
cdb-vq encode photos/*.jpg --model org/cdb-vq --out tokens.safetensors
cdb-vq decode tokens.safetensors --out decoded/
cdb-vq reconstruct photos/*.jpg --model org/cdb-vq --out reconstructions/
cdb-vq eval --model org/cdb-vq --data held_out_photos/ [--fid]
cdb-vq inspect --model org/cdb-vq
cdb-vq tokenize --model org/cdb-vq --data photos/ --out tokenized/
```

Every command takes `--model` as a Hub repo id or a local folder written by `save_pretrained`, and `--device` /
`--dtype`. Errors are one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm


TOKEN_FILE_FORMAT = "cdb-vq-tokens"
TOKEN_FILE_VERSION = "1"
_NUMBER = re.compile(r"[-+]?(\d[\d.,]*|inf|nan)%?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit."""


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
    return resolved


def codebook_fingerprint(model) -> str:
    """A short hash of the codebook: tokens are only meaningful to a model with the same codes."""
    codes = model.quantizer.codes().detach().float().cpu().contiguous()
    return hashlib.sha256(codes.numpy().tobytes()).hexdigest()[:16]


def load_model(name_or_path: str, device: str | None = None, dtype: str = "float32"):
    """Load a cdb-vq tokenizer from a local folder or a Hub repo id, in eval mode on `device` in `dtype`.

    Returns `(model, processor, model_id, fingerprint)`: `model_id` is the Hub id or the folder's absolute path, and
    `fingerprint` is the codebook's `codebook_fingerprint` taken before the dtype cast.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoConfig

    from .priors import load_tokenizer

    device = resolve_device(device)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(
                f"--model {name_or_path} is a file; give a model folder (saved with save_pretrained) or a Hub id."
            )
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {name_or_path} has no config.json: it is not a saved model folder.")
        model_id = str(path.resolve())
    elif _looks_like_path(name_or_path):
        raise CLIError(f"--model {name_or_path}: no such folder.")
    else:
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise CLIError(
                f"--model {name_or_path!r} is neither a local folder nor a valid Hub model id (org/name)."
            ) from None
        model_id = name_or_path
    try:
        # The config first (one small file): a model of another kind is refused before its weights load.
        model_type = AutoConfig.from_pretrained(model_id, trust_remote_code=True).model_type
        if model_type != "cdb_vq":
            raise CLIError(f"--model {name_or_path} is a {model_type!r} model, not a cdb-vq tokenizer.")
        model, processor = load_tokenizer(model_id)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not load model {name_or_path!r}: {first_line}") from None
    fingerprint = codebook_fingerprint(model)
    model.to(device=device, dtype=DTYPES[dtype])
    return model, processor, model_id, fingerprint


def _looks_like_path(name: str) -> bool:
    """Names no Hub id can have: relative or absolute paths, home folders, a trailing slash."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or "\\" in name or name.count("/") > 1


def check_image_files(paths: Sequence[str]) -> list[Path]:
    """Check that every path is a file PIL can open as an image (header only, so this is quick)."""
    checked = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise CLIError(f"{name}: no such file.")
        if not path.is_file():
            raise CLIError(f"{name}: is a directory, not an image file.")
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError):
            raise CLIError(f"{name}: not an image file (PIL cannot read it).") from None
        checked.append(path)
    if not checked:
        raise CLIError("no images given.")
    return checked


def load_image(path: Path) -> Image.Image:
    """An image file as RGB (transparent images on white), or a one-line error when it cannot be decoded."""
    from .data import decode_image

    image = decode_image(path)
    if image is None:
        raise CLIError(f"{path}: the image file is broken or truncated (PIL cannot decode it).")
    return image


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with a numeric suffix (photos/a.jpg and other/a.png -> a, a-1)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names


def pixel_values_of(images: list[Image.Image], processor, model) -> torch.Tensor:
    parameter = next(model.parameters())
    return processor(images, return_tensors="pt").pixel_values.to(device=parameter.device, dtype=parameter.dtype)


def to_unit_images(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """Model-range pixels -> float (B, 3, H, W) in [0, 1], inverting the processor's own normalisation."""
    return processor.postprocess(pixel_values.float(), return_tensors="pt").pixel_values


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of two [0, 1] images (the definition of torchmetrics' PeakSignalNoiseRatio(data_range=1))."""
    mse = float(((original.double() - reconstruction.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; columns of numbers are right-aligned, others left-aligned."""
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
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
    """A local image folder or a Hub data set, with undecoded images (see `cdb_tokenizer.data.load_image_dataset`)."""
    try:
        from .data import load_image_dataset
    except ImportError as error:
        raise CLIError(
            f"reading data sets needs the training extras: pip install 'cdb-tokenizer[train]' ({error})."
        ) from None
    path = Path(data).expanduser()
    try:
        if path.exists() or _looks_like_path(data):
            if not path.is_dir():
                raise CLIError(f"--data {data}: no such folder.")
            return load_image_dataset(train_data_dir=str(path), split=split, image_column=image_column)
        return load_image_dataset(dataset_name=data, split=split, image_column=image_column)
    except ImportError as error:
        raise CLIError(
            f"reading data sets needs the training extras: pip install 'cdb-tokenizer[train]' ({error})."
        ) from None
    except (OSError, ValueError, ConnectionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not open --data {data}: {first_line}") from None


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_command(args: argparse.Namespace) -> None:
    """Images -> a safetensors file of token grids with the model's identity in its metadata."""
    from safetensors.torch import save_file

    paths = check_image_files(args.images)
    model, processor, model_id, fingerprint = load_model(args.model, args.device, args.dtype)
    grids = []
    with tqdm(total=len(paths), desc="encoding", unit="image") as progress:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start : start + args.batch_size]
            pixel_values = pixel_values_of([load_image(path) for path in batch], processor, model)
            grids.append(model.encode(pixel_values).image_tokens.cpu())
            progress.update(len(batch))
    if len({tuple(grid.shape[1:]) for grid in grids}) > 1:
        raise CLIError("the images gave token grids of different sizes; use an image processor with a fixed size.")
    tokens = torch.cat(grids).to(torch.int32)
    height, width = pixel_values.shape[-2:]
    metadata = {
        "format": TOKEN_FILE_FORMAT,
        "format_version": TOKEN_FILE_VERSION,
        "model": model_id,
        "model_name": Path(model_id).name if Path(model_id).is_absolute() else model_id,
        "codebook_size": str(model.config.codebook_size),
        "codebook_fingerprint": fingerprint,
        "grid_height": str(tokens.shape[1]),
        "grid_width": str(tokens.shape[2]),
        "image_height": str(height),
        "image_width": str(width),
        "images": json.dumps(unique_names(paths)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"image_tokens": tokens}, str(out), metadata=metadata)
    print(f"wrote {tokens.shape[0]} images x {tokens.shape[1]}x{tokens.shape[2]} tokens to {out}")


def read_token_file(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    """The (N, h, w) tokens and metadata of a file written by `cdb-vq encode`."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise CLIError(f"{path}: no such file.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # safe_open has no `in`
            if metadata.get("format") != TOKEN_FILE_FORMAT or "image_tokens" not in names:
                raise CLIError(f"{path} is not a cdb-vq token file (write one with `cdb-vq encode`).")
            tokens = handle.get_tensor("image_tokens")
    except SafetensorError:
        raise CLIError(f"{path} is not a safetensors file (write one with `cdb-vq encode`).") from None
    if tokens.ndim != 3:
        raise CLIError(f"{path} holds tokens of shape {tuple(tokens.shape)}, expected (images, height, width).")
    return tokens.long(), metadata


@torch.inference_mode()
def decode_command(args: argparse.Namespace) -> None:
    """A token file -> one PNG per image, with the model recorded in the file unless --model is given."""
    tokens, metadata = read_token_file(args.tokens)
    model_name = args.model or metadata.get("model")
    if not model_name:
        raise CLIError(f"{args.tokens} does not name its model; pass --model.")
    try:
        model, processor, _, fingerprint = load_model(model_name, args.device, args.dtype)
    except CLIError as error:
        if args.model:
            raise
        raise CLIError(f"the model recorded in {args.tokens} cannot be loaded ({error}); pass --model.") from None
    source = metadata.get("model", "another model")
    if str(model.config.codebook_size) != metadata.get("codebook_size"):
        raise CLIError(
            f"{args.tokens} holds tokens of a {metadata.get('codebook_size')}-code model ({source}), but {model_name} "
            f"has {model.config.codebook_size} codes; decode with --model {source}."
        )
    if metadata.get("codebook_fingerprint") not in (None, fingerprint):
        raise CLIError(
            f"{args.tokens} was encoded with a different codebook ({source}) than {model_name}'s; "
            f"decode with --model {source}."
        )
    names = _image_names(metadata, len(tokens))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    with tqdm(total=len(tokens), desc="decoding", unit="image") as progress:
        for start in range(0, len(tokens), args.batch_size):
            grids = tokens[start : start + args.batch_size].to(device)
            images = processor.postprocess(model.decode_image_tokens(grids).float()).pixel_values
            for name, image in zip(names[start : start + args.batch_size], images):
                image.save(out / f"{name}.png")
            progress.update(len(grids))
    print(f"wrote {len(tokens)} images to {out}")


def _image_names(metadata: dict[str, str], count: int) -> list[str]:
    """The source image names recorded by `encode`, or image-00000, image-00001, ... when they are missing."""
    try:
        names = json.loads(metadata.get("images", "null"))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or len(names) != count or len(set(map(str, names))) != count:
        return [f"image-{index:05d}" for index in range(count)]
    return [Path(str(name)).name for name in names]  # never a path outside --out


@torch.inference_mode()
def reconstruct_command(args: argparse.Namespace) -> None:
    """Images -> tokens -> images: originals beside reconstructions, and the PSNR of each."""
    paths = check_image_files(args.images)
    model, processor, _, _ = load_model(args.model, args.device, args.dtype)
    out = Path(args.out)
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    names = unique_names(paths)
    scores = {}
    with tqdm(total=len(paths), desc="reconstructing", unit="image") as progress:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start : start + args.batch_size]
            pixel_values = pixel_values_of([load_image(path) for path in batch], processor, model)
            # Through the tokens, as a prior's samples would be: the same images `encode` + `decode` give.
            reconstruction = model.decode(model.encode(pixel_values).image_tokens).float()
            originals = to_unit_images(pixel_values, processor)
            reconstructions = to_unit_images(reconstruction, processor)
            pairs = processor.postprocess(torch.cat([pixel_values.float(), reconstruction], dim=-1)).pixel_values
            singles = processor.postprocess(reconstruction).pixel_values
            for index, name in enumerate(names[start : start + args.batch_size]):
                scores[name] = psnr(originals[index], reconstructions[index])
                pairs[index].save(out / f"{name}.png")  # original left, reconstruction right
                singles[index].save(out / "reconstructions" / f"{name}.png")
            progress.update(len(batch))
    mean = sum(scores.values()) / len(scores)
    (out / "psnr.json").write_text(json.dumps({"images": scores, "mean": mean}, indent=2) + "\n")
    rows = [(name, f"{value:.2f}") for name, value in scores.items()] + [("mean", f"{mean:.2f}")]
    print(format_table(["image", "PSNR (dB)"], rows))
    print(f"originals beside reconstructions in {out}, reconstructions alone in {out / 'reconstructions'}")


def _readable_images(
    dataset, image_column: str, counter: dict[str, int], limit: int | None = None
) -> Iterator[Image.Image]:
    """Decoded images of a data set, row by row; unreadable ones are skipped and counted."""
    from .data import decode_image

    for row in itertools.islice(dataset, limit):
        image = decode_image(row[image_column])
        if image is None:
            counter["unreadable"] += 1
            continue
        yield image


# The standard rFID protocol (LlamaGen, OptVQ, ...): ImageNet val, all 50,000 images, shorter side resized to 256 and
# centre-cropped to 256x256; the reference statistics come from those same crops. See docs/evaluation.md.
PROTOCOLS = {"imagenet": {"split": "validation", "max_images": 50_000, "resolution": 256, "fid": True}}


def _apply_protocol(args: argparse.Namespace) -> None:
    """Fill the flags a `--protocol` implies and that were not given (a local folder keeps its own split)."""
    if args.protocol is None:
        return
    protocol = PROTOCOLS[args.protocol]
    if args.split == "train" and not Path(args.data).expanduser().exists():
        args.split = protocol["split"]
    if args.max_images is None:
        args.max_images = protocol["max_images"]
    if args.resolution is None:
        args.resolution = protocol["resolution"]
    args.fid = args.fid or protocol["fid"]


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
        print(f"rFID left out: {error}", file=sys.stderr)
        return None


def _eval_lpips(device):
    """LPIPS when its backbone weights are in the torch hub cache (never downloads), else None and one line."""
    import os

    from .losses import load_lpips, lpips_backbone_file

    path, _ = lpips_backbone_file("vgg")
    if not os.path.isfile(path):
        print(f"LPIPS left out: its VGG weights are not in the torch hub cache ({path}).", file=sys.stderr)
        return None
    return load_lpips("vgg", required=False).to(device)


def eval_command(args: argparse.Namespace) -> None:
    """PSNR, SSIM, LPIPS, rFID, utilization and perplexity over a folder or Hub data set, as a table and JSON."""
    try:
        from .evaluation import evaluate, load_fid_reference, save_fid_reference
    except ImportError as error:
        raise CLIError(
            f"cdb-vq eval needs the training extras: pip install 'cdb-tokenizer[train]' ({error})."
        ) from None
    _apply_protocol(args)
    dataset = open_dataset(args.data, args.image_column, args.split)
    model, processor, _, _ = load_model(args.model, args.device, args.dtype)
    device = next(model.parameters()).device
    if args.resolution is not None:  # shorter side to N, then the centre N x N crop
        factor = model.config.downsampling_factor
        if args.resolution % factor:
            raise CLIError(
                f"--resolution {args.resolution} is not divisible by the model's downsampling factor ({factor})."
            )
        processor.size = {"height": args.resolution, "width": args.resolution}
        processor.do_resize, processor.do_center_crop = True, True
    counter = {"unreadable": 0}
    fid = _eval_fid(args, device)
    lpips = _eval_lpips(device) if args.lpips else None
    reference = None
    if fid is not None and args.fid_reference and Path(args.fid_reference).is_file():
        reference = load_fid_reference(args.fid_reference)

    def batches() -> Iterator[torch.Tensor]:
        images = []
        for image in _readable_images(dataset, args.image_column, counter, args.max_images):
            images.append(image)
            if len(images) == args.batch_size:
                yield pixel_values_of(images, processor, model)
                images = []
        if images:
            yield pixel_values_of(images, processor, model)

    try:
        metrics = evaluate(model, batches(), lpips=lpips, fid=fid, fid_reference=reference)
    except ValueError as error:
        raise CLIError(f"{error} ({counter['unreadable']} unreadable images skipped)") from None
    if fid is not None and args.fid_reference and reference is None:
        description = f"{args.data} {args.split} {metrics['num_images']} images"
        save_fid_reference(fid, args.fid_reference, description=description)
        print(f"Saved the rFID reference statistics to {args.fid_reference}.", file=sys.stderr)
    metrics["unreadable_images"] = counter["unreadable"]
    random_features = args.fid_feature_extractor == "random"
    if fid is not None:
        metrics["fid_feature_extractor"] = "random" if random_features else "inception-v3-compat"
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")


def inspect_command(args: argparse.Namespace) -> None:
    """Codebook size, assignment rule, role ranges with their usage, and the labels of the most used codes."""
    from .publishing import codebook_summary

    model, _, model_id, fingerprint = load_model(args.model, args.device, args.dtype)
    summary = codebook_summary(model, top_k=args.top)
    if args.json:
        print(json.dumps({"model": model_id, "codebook_fingerprint": fingerprint, **summary}, indent=2))
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
            ],
        )
    )
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
    print(f"\nmost used codes (top {len(summary['top_codes'])})")
    print(
        format_table(
            ["code", "usage", "role", "prototype", "label"],
            [
                (code["code"], f"{code['usage']:.2%}", code["role"], code["prototype"], code["label"] or "(no label)")
                for code in summary["top_codes"]
            ],
        )
    )


def tokenize_command(args: argparse.Namespace) -> None:
    """A folder or Hub data set -> a `datasets` data set of `image_tokens` (and labels), saved with `save_to_disk`."""
    from .data import decode_image
    from .priors import tokenize_dataset

    dataset = open_dataset(args.data, args.image_column, args.split)
    if not hasattr(dataset, "filter") or not hasattr(dataset, "__len__"):
        raise CLIError("tokenize needs a map-style data set (streaming is not supported).")
    if args.max_images is not None:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    model, processor, _, _ = load_model(args.model, args.device, args.dtype)
    total = len(dataset)
    dataset = dataset.filter(
        lambda value: decode_image(value) is not None, input_columns=args.image_column, desc="checking images"
    )
    skipped = total - len(dataset)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data} has no readable images ({skipped} unreadable).")
    try:
        tokenized = tokenize_dataset(
            dataset,
            model,
            processor,
            image_column=args.image_column,
            label_column=args.label_column,
            batch_size=args.batch_size,
            device=next(model.parameters()).device,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    tokenized.save_to_disk(args.out)
    length = len(tokenized[0]["image_tokens"])
    print(
        f"tokenized {len(tokenized)} images ({skipped} unreadable skipped) into {args.out}: columns "
        f"{tokenized.column_names}, {length} tokens per image, {model.config.codebook_size} codes"
    )


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdb-vq", description="The cdb-vq image tokenizer: images <-> discrete tokens."
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
        command.set_defaults(function=function)
        return command

    def add_data_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--data", required=True, help="image folder, or a data set on the Hub")
        command.add_argument("--split", default="train", help="split of the data set (default: train)")
        command.add_argument("--image_column", default="image", help="column holding the images (default: image)")
        command.add_argument("--max_images", type=_positive_int, default=None, help="use at most this many images")

    encode = add_command("encode", encode_command, "Encode images into a safetensors file of token grids.")
    encode.add_argument("images", nargs="+", help="image files")
    encode.add_argument("--out", required=True, help="output .safetensors file")
    encode.add_argument("--batch_size", type=_positive_int, default=16)

    decode = add_command("decode", decode_command, "Decode a token file into PNG images.", model_required=False)
    decode.add_argument("tokens", help="a .safetensors file written by `cdb-vq encode`")
    decode.add_argument("--out", required=True, help="output folder")
    decode.add_argument("--batch_size", type=_positive_int, default=16)
    decode.epilog = "The model recorded in the token file is used unless --model is given."

    reconstruct = add_command(
        "reconstruct", reconstruct_command, "Reconstruct images through their tokens; print PSNR."
    )
    reconstruct.add_argument("images", nargs="+", help="image files")
    reconstruct.add_argument("--out", required=True, help="output folder")
    reconstruct.add_argument("--batch_size", type=_positive_int, default=16)

    evaluate = add_command(
        "eval", eval_command, "PSNR, SSIM, LPIPS, rFID, codebook utilization and perplexity on a data set."
    )
    add_data_arguments(evaluate)
    evaluate.add_argument("--batch_size", type=_positive_int, default=16)
    evaluate.add_argument("--out", default=None, help="also write the metrics to this JSON file")
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
        "--fid_reference", default=None,
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

    tokenize = add_command("tokenize", tokenize_command, "Tokenize an image data set for a prior (save_to_disk).")
    add_data_arguments(tokenize)
    tokenize.add_argument("--out", required=True, help="output folder for Dataset.save_to_disk")
    tokenize.add_argument(
        "--label_column", default=None, help="column of integer class labels to keep (default: label, if present)"
    )
    tokenize.add_argument("--batch_size", type=_positive_int, default=32)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdb-vq` with `argv` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.function(args)
    except CLIError as error:
        print(f"cdb-vq {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cdb-vq {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
