"""Training steps on a GPU in bf16: s / step per assignment rule at the default config, and what bf16 must not change.

For each rule (`nearest` and `cdb` by default), a `CDBVQModel(CDBVQConfig(...))` at the default architecture (f16,
16,384 codes of 32 dimensions) is trained with the library's own training step (`tools.steps.training_step`: L1 + L2
+ vq_loss, AdamW, dead-code restarts) under `Accelerator(mixed_precision="bf16")` on random 256x256 crops of
scikit-image's photos. The rules take turns, one step each per round (load changes hit them alike), after warm-up
rounds (k-means initialisation, kernel selection); each step is timed between CUDA synchronisations. Then it checks:

- every loss stayed finite and the quantizer's state (codebook, usage, EMA statistics, router potentials and
  temperature) is still float32;
- the quantizer picks the same codes for the same latents with and without bf16 autocast (it switches autocast off:
  in bf16 the expanded distance picks other codes than inference does);
- peak GPU memory per rule (training steps only).

    python benchmarks/cuda_training.py                                  # on a CUDA machine, ~10 s on one H200
    python benchmarks/cuda_training.py --device cpu --tiny --batch-size 2 --rounds 2 --warmup 1 \
        --output /tmp/cuda_training.md                                  # dry check of the script on a CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from common import (
    command_line,
    environment_summary,
    load_line,
    load_summary,
    markdown_table,
    median,
    positive_int,
    synchronize,
    with_range,
    write_report,
)
from quality import photo_tensors, random_crops, train_step

from cdb_tokenizer import CDBVQConfig, CDBVQModel
from cdb_tokenizer.modeling_cdb_vq import flatten_grid
from cdb_tokenizer.tools.losses import TokenizerLoss
from cdb_tokenizer.tools.messages import counted
from cdb_tokenizer.tools.steps import TrainingParts

RULES = ("nearest", "sinkhorn", "cdb")
TINY = {"resolution": 32, "base_channels": 16, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1,
        "norm_num_groups": 8, "latent_dim": 16, "codebook_size": 64, "semantic_dim": 32, "num_prototypes": 8}
QUANTIZER_STATE = ("codebook.weight", "usage", "ema_cluster_size", "ema_embed_sum", "router.potentials", "router.temperature")


def build(args: argparse.Namespace, rule: str, accelerator: Accelerator) -> TrainingParts:
    fields = {"assignment": rule, "resolution": args.resolution, "codebook_size": args.codebook_size}
    if args.tiny:  # a dry check of the script on a CPU, not a measurement
        fields.update(TINY)
    torch.manual_seed(args.seed)
    model = CDBVQModel(CDBVQConfig(**fields))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainingParts(accelerator, model, optimizer, TokenizerLoss(l1_weight=1.0, l2_weight=1.0), max_grad_norm=1.0)


def same_codes_under_autocast(parts: TrainingParts, pixel_values: torch.Tensor) -> float:
    """Share of tokens whose code is the same when the quantizer runs inside bf16 autocast as outside it, for the
    same (float32) latents and semantic features."""
    model, device = parts.unwrapped.eval(), pixel_values.device
    with torch.no_grad():
        output = model.encode(pixel_values)
        latents = flatten_grid(output.latents).float()
        quantizer = model.quantizer
        plain = quantizer(latents).indices
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = quantizer(latents).indices
    model.train()
    return float((plain == autocast).float().mean())


def float32_state(parts: TrainingParts) -> list[str]:
    """Names of quantizer state that is not float32 (should be none)."""
    state = parts.unwrapped.quantizer.state_dict()
    return [f"{name} ({state[name].dtype})" for name in QUANTIZER_STATE if name in state and state[name].dtype != torch.float32]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_training.py: no CUDA device here; pass --device cpu for a dry check.")
    before = load_line()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    photos = photo_tensors("skimage")
    generator = torch.Generator().manual_seed(args.seed)
    parts = {rule: build(args, rule, accelerator) for rule in args.rules}
    times = {rule: [] for rule in args.rules}
    finite = {rule: True for rule in args.rules}
    peak = {}
    for round_index in range(args.warmup + args.rounds):
        batch = random_crops(photos, args.resolution, args.batch_size, generator).to(device)
        for rule in args.rules:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)  # every rule's model and optimiser state
            synchronize(device)
            start = time.perf_counter()
            record = train_step(parts[rule], batch, round_index)
            synchronize(device)
            if round_index >= args.warmup:
                times[rule].append(time.perf_counter() - start)
            finite[rule] &= bool(torch.isfinite(torch.tensor(record["loss"])))
            if device.type == "cuda":
                # The step's own peak: above what was allocated before it, which holds the other rules' models too.
                peak[rule] = max(peak.get(rule, 0), torch.cuda.max_memory_allocated(device) - resident)
    held_out = random_crops(photos, args.resolution, args.batch_size, torch.Generator().manual_seed(10**6)).to(device)
    reference = median(times[args.rules[0]])
    rows = [
        [
            rule,
            with_range(times[rule], 4),
            with_range([t / r for t, r in zip(times[rule], times[args.rules[0]])], 2, "x"),
            f"{peak[rule] / 2**30:.2f} GiB" if rule in peak else "n/a",
            "yes" if finite[rule] else "NO",
            ", ".join(float32_state(parts[rule])) or "all float32",
            f"{same_codes_under_autocast(parts[rule], held_out):.2%}",
        ]
        for rule in args.rules
    ]
    config = parts[args.rules[0]].unwrapped.config
    text = "\n".join([
        "# Training steps on a GPU in bf16",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Measured on: {environment_summary(device)}; mixed precision {args.mixed_precision}.",
        "",
        load_summary(before),
        "",
        f"Setup: `CDBVQConfig` defaults but resolution {config.resolution}, K = {config.codebook_size} codes of "
        f"{config.codebook_dim} dimensions, base_channels {config.base_channels}{' (--tiny: a dry check)' if args.tiny else ''}; batch {args.batch_size} random "
        f"{args.resolution}x{args.resolution} crops of scikit-image's photos; the library's training step (L1 + L2 + "
        f"vq_loss, AdamW {args.learning_rate}, grad-norm clip 1, dead-code restarts); {counted(args.warmup, 'warm-up round')}, "
        f"then {args.rounds} timed rounds, one step of every rule per round. Ratio: median of per-round ratios to "
        f"`{args.rules[0]}` (median s / step of `{args.rules[0]}`: {reference:.4f}).",
        "",
        markdown_table(
            ["rule", "s / step: median [min-max]", f"vs {args.rules[0]}: median [min-max]", "step peak memory", "losses finite",
             "quantizer state", "same codes with bf16 autocast"],
            rows,
        ),  # fmt: skip
        "",
    ])
    path = write_report(args.output, text)
    print(text)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=["nearest", "cdb"], choices=RULES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="A tiny model at 32x32: a dry check on a CPU.")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="cuda_training.md", help="Report name under benchmarks/results/.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution = TINY["resolution"]
    if args.warmup < 1 or args.rounds < 1:
        parser.error("--warmup and --rounds must be at least 1 (k-means initialisation happens in the first round).")
    return args


if __name__ == "__main__":
    main()
