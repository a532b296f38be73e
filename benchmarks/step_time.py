"""Training-step time of each quantizer on quality.py's protocol, timed round-robin so machine load hits all alike.

quality.py trains the rules one after the other, so its s/step column moves with whatever else the machine runs.
Here every rule gets a model built exactly as quality.py builds it (same backbone, same config, same batches) and one
training step of each rule runs in turn, for `--rounds` rounds after `--warmup` rounds; the report gives the median
step time of each rule and the median of the per-round ratios to `nearest`. Target (issue 10): `cdb` <= 1.3x `nearest`.

    python benchmarks/step_time.py                                 # K = 1,024, D = 16 (quality.py's defaults)
    python benchmarks/step_time.py --codebook-size 16384 --codebook-dim 8 --output step_time_k16384.md
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import (
    command_line,
    environment_summary,
    load_line,
    load_summary,
    markdown_table,
    median,
    positive_int,
    with_range,
    write_report,
)

import quality

from cdb_tokenizer.tools.messages import counted

STEP_TARGET_RATIO = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=["nearest", "cdb", "sinkhorn", "vqtorch"], choices=quality.RULES)
    parser.add_argument("--rounds", type=positive_int, default=30, help="Timed rounds (one step of every rule per round).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed rounds first (k-means init happens here).")
    parser.add_argument("--output", default="step_time.md", help="Report name under benchmarks/results/.")
    args, rest = parser.parse_known_args(argv)
    # Every model knob is quality.py's own flag, with its defaults.
    args.quality = quality.parse_args(rest + ["--rules", *args.rules])
    if args.quality.device != "cpu":  # the round-robin below runs on the CPU; its report must not claim another device
        parser.error(f"--device {args.quality.device}: step_time.py times the CPU; on a GPU use cuda_training.py.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quality.threads > 0:
        torch.set_num_threads(args.quality.threads)
    load_before = load_line()
    backbone = quality.reference_backbone(args.quality)
    photos = quality.photo_tensors("skimage")
    parts = {}
    for rule in args.rules:
        model = quality.build_model(args.quality, rule, backbone).train()
        parts[rule] = quality.training_parts(model, args.quality.learning_rate)
    generator = torch.Generator().manual_seed(args.quality.seed)
    times = {rule: [] for rule in args.rules}
    for round_index in range(args.warmup + args.rounds):
        batch = quality.random_crops(photos, args.quality.resolution, args.quality.batch_size, generator)
        for rule in args.rules:
            start = time.perf_counter()
            quality.train_step(parts[rule], batch, round_index)
            if round_index >= args.warmup:
                times[rule].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)

    reference = "nearest" if "nearest" in args.rules else args.rules[0]
    rows = []
    for rule in args.rules:
        ratios = [t / r for t, r in zip(times[rule], times[reference])]
        rows.append([rule, with_range(times[rule], 3), with_range(ratios, 2, "x")])
    lines = [
        "# Training-step time, round-robin",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Measured on: {environment_summary()}.",
        "",
        load_summary(load_before),
        "",
        f"quality.py's model and batches (K = {args.quality.codebook_size}, D = {args.quality.codebook_dim}, batch "
        f"{args.quality.batch_size} of {args.quality.resolution}x{args.quality.resolution}); one step = forward, "
        f"L1 + L2 + vq_loss, backward, AdamW, dead-code restarts (the library's training step, as quality.py). "
        f"{counted(args.rounds, 'round')} after {counted(args.warmup, 'warm-up round')}, each round one step of every rule on the same batch.",
        "",
        markdown_table(["rule", "s / step: median [min-max]", f"ratio to `{reference}`: median [min-max] over rounds"], rows),
        "",
    ]
    if "cdb" in times and reference == "nearest":
        ratio = median([t / r for t, r in zip(times["cdb"], times["nearest"])])
        verdict = "met" if ratio <= STEP_TARGET_RATIO else "MISSED"
        lines.append(f"Target `cdb` step <= {STEP_TARGET_RATIO}x `nearest`: {ratio:.2f}x -> {verdict}.")
    report = "\n".join(lines) + "\n"
    print(report)
    write_report(args.output, report)


if __name__ == "__main__":
    main()
