#!/usr/bin/env python
"""Sample images from a prior trained by train_prior.py and write them as one PNG grid.

    python training/sample_prior.py --prior outputs/prior --num_images 8 --output outputs/prior/samples.png
    python training/sample_prior.py --prior outputs/prior --class_labels 0 3 7 --num_images 8 \\
        --guidance_scale 3 --temperature 1.0 --top_k 0 --top_p 0.95 --seed 0

Tokens come from `generate` restricted to image tokens, and are decoded by the tokenizer recorded in the prior's
`prior_config.json` (or `--tokenizer`). With `--class_labels`, the grid has one row of `--num_images` per class.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cdb_tokenizer.tools.priors import load_prior, load_tokenizer, sample_images, save_image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample an image grid from a cdb-vq prior.")
    parser.add_argument("--prior", type=str, required=True, help="Folder (or Hub id) written by train_prior.py.")
    parser.add_argument("--tokenizer", type=str, default=None, help="Default: the one in prior_config.json.")
    parser.add_argument("--output", type=str, default=None, help="PNG path (default: <prior>/samples.png).")
    parser.add_argument("--num_images", type=int, default=16, help="Images in all, or per class with --class_labels.")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None,
                        help="Classes to sample (class-conditional priors): one grid row each.")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance (1: off).")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy.")
    parser.add_argument("--top_k", type=int, default=0, help="0: off.")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when present.")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1, got {args.num_images}.")
    return args


def main(args: argparse.Namespace) -> Path:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prior, vocabulary, prior_config = load_prior(args.prior, device=device)
    tokenizer_id = args.tokenizer or prior_config.get("tokenizer")
    if not tokenizer_id:
        raise ValueError("prior_config.json names no tokenizer: pass --tokenizer (the one the prior was trained on).")
    tokenizer, _ = load_tokenizer(tokenizer_id, device=device)
    image_size = tuple(prior_config["image_size"]) if prior_config.get("image_size") else None

    class_labels, nrow = None, math.ceil(math.sqrt(args.num_images))
    num_images = args.num_images
    if args.class_labels is not None:
        class_labels = [label for label in args.class_labels for _ in range(args.num_images)]
        num_images, nrow = len(class_labels), args.num_images
    images = sample_images(
        prior, tokenizer, vocabulary, num_images,
        temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
        class_labels=class_labels, guidance_scale=args.guidance_scale, seed=args.seed, image_size=image_size,
        num_image_tokens=prior_config.get("num_image_tokens"),
    )  # fmt: skip
    output = Path(args.output) if args.output else Path(args.prior) / "samples.png"
    save_image_grid(images, output, nrow=nrow)
    print(f"Wrote {num_images} samples to {output}")
    return output


if __name__ == "__main__":
    main(parse_args())
