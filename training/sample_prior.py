#!/usr/bin/env python
"""Sample images from a prior trained by train_prior.py and write them as one PNG grid.

    python training/sample_prior.py --prior outputs/prior --num_images 8 --output outputs/prior/samples.png
    python training/sample_prior.py --prior outputs/prior --class_labels 0 3 7 --num_images 8 \\
        --guidance_scale 3 --temperature 1.0 --top_k 0 --top_p 0.95 --seed 0

Tokens come from `generate` restricted to image tokens, and are decoded by the tokenizer recorded in the prior's
`prior_config.json` (or `--tokenizer`), which must have the codebook the prior was trained on. With `--class_labels`,
the grid has one row of `--num_images` per class. `--tokens_out samples.safetensors` also keeps the sampled code ids
as a token file, which `cdb-vq decode` turns into one PNG per sample. An existing `--output` (or `--tokens_out`) is
replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from cdb_tokenizer.configuration_cdb_vq import expand_home
from cdb_tokenizer.tools.cli import (
    CLIError,
    check_output_file,
    codebook_fingerprint,
    local_model_files,
    refuse_overwriting_inputs,
    remove_created_folders,
    resolve_device,
    write_token_file,
)
from cdb_tokenizer.tools.loading import cached_main_commit, locate
from cdb_tokenizer.tools.messages import OneLineErrorParser, listed, run_script
from cdb_tokenizer.tools.priors import (
    PRIOR_CONFIG_NAME,
    load_prior,
    load_prior_config,
    load_prior_tokenizer,
    sample_images,
    save_image_grid,
    token_image_size,
)
from cdb_tokenizer.tools.priors.sampling import MIN_TEMPERATURE, SEED_RANGE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="Sample an image grid from a cdb-vq prior.")
    parser.add_argument("--prior", type=str, required=True, help="Folder (or Hub id) written by train_prior.py.")
    parser.add_argument("--tokenizer", type=str, default=None, help="Default: the one in prior_config.json.")
    parser.add_argument("--output", type=expand_home, default=None, help="PNG path (default: <prior>/samples.png; for a Hub prior, samples.png here).")
    parser.add_argument("--tokens_out", type=expand_home, default=None,
                        help="Also write the sampled tokens to this token file (.safetensors), which `cdb-vq decode` "
                             "reads.")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="Replace --output (and --tokens_out) if it exists.")
    parser.add_argument("--num_images", type=int, default=16, help="Images in all, or per class with --class_labels.")
    parser.add_argument("--class_labels", type=str, nargs="+", default=None,
                        help="Classes to sample (class-conditional priors), by id or by the name prior_config.json "
                             "records: one grid row each.")  # fmt: skip
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance (1: off).")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy.")
    parser.add_argument("--top_k", type=int, default=0, help="0: off.")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off.")
    parser.add_argument("--seed", type=int, default=0,
                        help="The same seed, request and --batch_size give the same samples (see docs/priors.md).")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="Images sampled and decoded at once (memory: the prior's cache grows with it).")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when present.")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors before anything is loaded (the prior's config only for --class_labels); --output last, as
    checking it creates its folder. A --prior meant as a local folder that is none is said first (exit 1, as when
    loading): its default --output is samples.png here, which may well exist."""
    locate(args.prior, "prior", "Give the folder train_prior.py wrote.")
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1, got {args.num_images}.")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a finite number of at least 0 (0: greedy), got {args.temperature}.")
    if 0 < args.temperature < MIN_TEMPERATURE:
        parser.error(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {args.temperature:g}: "
                     f"the logits divided by it would overflow.")  # fmt: skip
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        parser.error(f"--seed must be in [-2**63, 2**64) (torch's seeds), got {args.seed}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.top_k < 0:
        parser.error(f"--top_k must be at least 0 (0: off), got {args.top_k}.")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1] (1: off), got {args.top_p}.")
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance_scale must be a finite number, got {args.guidance_scale}.")
    if args.guidance_scale != 1 and args.class_labels is None:
        parser.error("--guidance_scale needs --class_labels (classifier-free guidance steers towards a class).")
    if args.class_labels is not None:
        try:
            vocabulary = load_prior_config(args.prior)[0]["vocabulary"]
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--prior {args.prior}: {error}")
        num_classes = vocabulary.get("num_classes", 0)
        if num_classes == 0:
            parser.error(f"--class_labels: the prior {args.prior} is unconditional (trained without labels).")
        try:
            args.class_labels = class_ids(args.class_labels, num_classes, vocabulary.get("class_names"))
        except ValueError as error:
            parser.error(f"--class_labels {error}")
    try:
        resolve_device(args.device)
        args.output = str(check_output(args))
        if args.tokens_out is not None:
            # --overwrite cannot help: the prior's or the tokenizer's weights would be replaced by what they made.
            refuse_overwriting_inputs([Path(args.tokens_out)], input_model_files(args), option="--tokens_out")
            args.tokens_out = str(check_output_file(args.tokens_out, example="samples.safetensors",
                                                    option="--tokens_out", overwrite=args.overwrite))  # fmt: skip
    except CLIError as error:
        remove_created_folders()  # those made for --output, when --tokens_out is refused after it
        parser.error(str(error))


def input_model_files(args: argparse.Namespace) -> Iterator[Path]:
    """The files of a local --prior and of its local tokenizer (--tokenizer, else the one prior_config.json
    records), read only when --tokens_out exists."""
    yield from local_model_files(args.prior)
    tokenizer = args.tokenizer
    if tokenizer is None and locate(args.prior, "prior") is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):  # loading the prior says what is wrong with it
            tokenizer = load_prior_config(args.prior)[0].get("tokenizer")
    yield from local_model_files(tokenizer)


def class_ids(labels: list[str], num_classes: int, class_names: list[str] | None) -> list[int]:
    """--class_labels as class ids: a name the prior records (`class_names`, from the data set's labels), else a whole
    number as an id (0 to num_classes - 1). Names first: an image folder's classes named 0, 1, 10, 2, ... (sorted as
    text) have names that are other classes' ids."""
    ids = []
    for label in labels:
        if class_names and label in class_names:
            ids.append(class_names.index(label))
        elif label.isascii() and label.removeprefix("-").isdigit():
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"{label}: the prior has classes 0 to {num_classes - 1}.")
            ids.append(int(label))
        elif not class_names:
            raise ValueError(f"{label!r}: the prior records no class names; give class ids, 0 to {num_classes - 1}.")
        else:
            close = difflib.get_close_matches(label, class_names, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            classes = listed(class_names, 20)
            raise ValueError(f"{label!r} is not a class of the prior{guess}; its classes are {classes}.")
    return ids


def check_output(args: argparse.Namespace) -> Path:
    """--output (default <prior>/samples.png, or samples.png for a Hub prior): a .png file name, new or, with
    --overwrite, a regular file to replace; never a folder, device or link (`check_output_file`, which creates its
    folder)."""
    # A Hub prior's grid goes to the working directory: `owner/name/samples.png` would make a local folder that the
    # next `--prior owner/name` is taken for.
    prior = Path(args.prior).expanduser()
    default = prior / "samples.png" if prior.is_dir() else Path("samples.png")
    output = args.output if args.output is not None else str(default)
    if Path(output).suffix.lower() != ".png":
        raise CLIError(f"--output {output!r}: the grid is written as a PNG image; give a .png file name.")
    return check_output_file(output, example="samples.png", option="--output", overwrite=args.overwrite)


def main(args: argparse.Namespace) -> Path:
    """`sample`; after a failure, the folders that checking --output created are removed again."""
    try:
        return sample(args)
    except BaseException:
        remove_created_folders()  # a failed run leaves no empty folders behind
        raise


def sample(args: argparse.Namespace) -> Path:
    """Load the prior and its tokenizer, sample, and write the grid; returns its path."""
    device = resolve_device(args.device)
    prior, vocabulary, prior_config = load_prior(args.prior, device=device)
    output = Path(args.output)  # checked (and its default set) by parse_args
    tokenizer, _ = load_tokenizer_of(args, prior_config, None)
    # On the CPU, as load_model and check_prior_codebook take it: another device may round the codes otherwise.
    fingerprint = codebook_fingerprint(tokenizer)
    tokenizer.to(device)
    # The recorded image size sets the grid (one that does not hold the prior's tokens is refused by sample_images,
    # never replaced by a square guess); priors trained on token data that recorded none without a tokenizer
    # (--codebook_size) record none: the token count gives it.
    image_size = tuple(prior_config["image_size"]) if prior_config.get("image_size") else None
    if image_size is None and prior_config.get("num_image_tokens"):
        image_size = token_image_size(tokenizer, prior_config["num_image_tokens"])

    class_labels, nrow = None, math.ceil(math.sqrt(args.num_images))
    num_images = args.num_images
    names = [f"sample-{index:05d}" for index in range(num_images)]
    if args.class_labels is not None:
        class_labels = [label for label in args.class_labels for _ in range(args.num_images)]
        num_images, nrow = len(class_labels), args.num_images
        names = [f"class-{label}-{index:05d}" for index, label in enumerate(class_labels)]  # unique: a class twice
    images, tokens = sample_images(
        prior, tokenizer, vocabulary, num_images,
        temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
        class_labels=class_labels, guidance_scale=args.guidance_scale, seed=args.seed, image_size=image_size,
        num_image_tokens=prior_config.get("num_image_tokens"), batch_size=args.batch_size, progress=True,
        return_tokens=True,
    )  # fmt: skip
    save_image_grid(images, output, nrow=nrow)
    print(f"Wrote {num_images} samples to {output}")
    if args.tokens_out is not None:
        tokenizer_id, revision = tokenizer_source(args, prior_config)
        write_token_file(
            Path(args.tokens_out), tokens, tokenizer, tokenizer_id, fingerprint, images.shape[-2:], names, revision
        )
        print(f"Wrote their tokens to {args.tokens_out} (`cdb-vq decode {args.tokens_out} --out DIR` decodes them)")
    return output


def tokenizer_source(args: argparse.Namespace, prior_config: dict) -> tuple[str, str | None]:
    """The tokenizer a token file records for the samples, and its Hub commit: --tokenizer or prior_config.json's,
    a local folder as its absolute path (the token file records it relative to itself, as `cdb-vq encode` does), a
    Hub id with the commit it was loaded at, so that `cdb-vq decode` uses that one when the repository moves on."""
    name = args.tokenizer or prior_config["tokenizer"]
    folder = locate(name, "tokenizer")
    return (str(folder.resolve()), None) if folder is not None else (name, cached_main_commit(name))


def load_tokenizer_of(args: argparse.Namespace, prior_config: dict, device: torch.device | None) -> tuple:
    """(model, processor) of --tokenizer, else of the one prior_config.json records, checked against the codebook
    the prior was trained on."""
    if args.tokenizer:
        return load_prior_tokenizer(args.tokenizer, prior_config, device, what="--tokenizer")
    tokenizer_id = prior_config.get("tokenizer")
    if not tokenizer_id:
        name = prior_config.get("tokenizer_name")  # a local tokenizer too far from the prior to record its path
        trained_on = f"the folder {name!r} it was trained on" if name else "the one the prior was trained on"
        raise ValueError(f"{PRIOR_CONFIG_NAME} names no tokenizer: pass --tokenizer ({trained_on}).")
    return load_prior_tokenizer(
        tokenizer_id, prior_config, device, what=f"the tokenizer {PRIOR_CONFIG_NAME} records",
        hint="Moved or deleted since training? Pass --tokenizer.",
    )  # fmt: skip


if __name__ == "__main__":
    # Mistakes in the inputs (a missing folder, another tokenizer's tokens, a Hub id that cannot be reached): one line.
    run_script(lambda: main(parse_args()), FileNotFoundError, ValueError, OSError, CLIError)
