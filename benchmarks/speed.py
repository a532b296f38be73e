"""Encode and decode throughput and peak memory at 256x256 with the default config, per assignment rule, and the
backbone against diffusers' `VQModel` with matching channels.

- ours, per rule (`nearest`, `sinkhorn`, `cdb`): `model.encode(pixel_values)` (images -> tokens, quantizer included)
  and `model.decode(tokens)` (tokens -> images), in eval mode without gradients;
- `diffusers VQModel`: the same work, `encode` + its `quantize` (images -> tokens) and `get_codebook_entry` +
  `decode(..., force_not_quantize=True)` (tokens -> images), with block_out_channels, layers_per_block,
  norm groups, latent channels, code dimension and codebook size taken from `CDBVQConfig()` (needs `diffusers`;
  `--no-diffusers` leaves it out).

Timing runs every model round-robin in one process (load changes hit them alike); ratios are medians of per-round
ratios. Peak memory is measured for each (model, operation) on its first call in a fresh process (see `common.py`).

    python benchmarks/speed.py                       # defaults (~10 min on 2 busy CPU cores)
    python benchmarks/speed.py --batch-size 8 --rounds 5 --threads 0
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
from common import (
    PeakMemory,
    WORKER_FLAG,
    command_line,
    environment_summary,
    format_bytes,
    format_seconds,
    load_line,
    load_summary,
    markdown_table,
    median,
    positive_int,
    report_from_worker,
    require,
    run_worker,
    time_call,
    with_range,
    write_report,
)
from tqdm.auto import tqdm

RULES = ("nearest", "sinkhorn", "cdb")
DIFFUSERS = "diffusers VQModel"
ENCODE_TARGET_RATIO = 1.15


# ----------------------------------------------------------------------------------------------------------------
# Models behind one interface: encode(pixel_values) -> tokens (B, h, w); decode(tokens) -> images
# ----------------------------------------------------------------------------------------------------------------


class OurTokenizer:
    def __init__(self, rule: str, device: torch.device):
        from cdb_tokenizer import CDBVQConfig, CDBVQModel

        torch.manual_seed(0)
        self.model = CDBVQModel(CDBVQConfig(assignment=rule)).to(device).eval()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode(pixel_values).image_tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens)


class DiffusersTokenizer:
    """diffusers' `VQModel` with the channels, depth and codebook of `CDBVQConfig()`."""

    def __init__(self, device: torch.device):
        from diffusers import VQModel

        from cdb_tokenizer import CDBVQConfig

        config = CDBVQConfig()
        levels = len(config.channel_multipliers)
        torch.manual_seed(0)
        self.model = (
            VQModel(
                in_channels=config.num_channels,
                out_channels=config.num_channels,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(config.base_channels * m for m in config.channel_multipliers),
                layers_per_block=config.num_res_blocks,  # its decoder has layers_per_block + 1, as ours
                latent_channels=config.latent_dim,
                sample_size=config.resolution,
                num_vq_embeddings=config.codebook_size,
                norm_num_groups=config.norm_num_groups,
                vq_embed_dim=config.codebook_dim,
                mid_block_add_attention=config.use_mid_attention,
            )
            .to(device)
            .eval()
        )
        self.codebook_dim = config.codebook_dim

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        latents = self.model.encode(pixel_values).latents
        _, _, (_, _, indices) = self.model.quantize(latents)
        return indices.view(latents.shape[0], *latents.shape[2:])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        quantized = self.model.quantize.get_codebook_entry(tokens.flatten(), (*tokens.shape, self.codebook_dim))
        return self.model.decode(quantized, force_not_quantize=True).sample


def build(name: str, device: torch.device):
    return DiffusersTokenizer(device) if name == DIFFUSERS else OurTokenizer(name, device)


def parameter_count(tokenizer) -> int:
    return sum(p.numel() for p in tokenizer.model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------


def inputs(case: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = case["resolution"]
    pixel_values = (torch.rand(case["batch_size"], 3, size, size, generator=generator) * 2 - 1).to(device)
    grid = size // case["downsampling_factor"]
    tokens = torch.randint(case["codebook_size"], (case["batch_size"], grid, grid), generator=generator).to(device)
    return pixel_values, tokens


def timing_worker(case: dict) -> dict:
    device = torch.device(case["device"])
    models = {name: build(name, device) for name in case["models"]}
    pixel_values, tokens = inputs(case, device)
    seconds = {name: {"encode": [], "decode": []} for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.decode(model.encode(pixel_values))
        for _ in tqdm(range(case["rounds"]), desc="rounds", file=sys.stderr):
            for name, model in models.items():
                seconds[name]["encode"].append(time_call(functools.partial(model.encode, pixel_values), device))
                seconds[name]["decode"].append(time_call(functools.partial(model.decode, tokens), device))
    return {**case, "seconds": seconds, "parameters": {name: parameter_count(m) for name, m in models.items()}}


def memory_worker(case: dict) -> dict:
    device = torch.device(case["device"])
    model = build(case["model"], device)
    pixel_values, tokens = inputs(case, device)
    call = (lambda: model.encode(pixel_values)) if case["operation"] == "encode" else (lambda: model.decode(tokens))
    with torch.no_grad(), PeakMemory(device) as peak:
        call()
    return {**case, "peak_extra_bytes": peak.extra, "memory_method": peak.method}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def paired_ratios(values: list[float], baseline: list[float]) -> list[float]:
    """The per-round time ratios (each round ran every model: load changes hit them alike)."""
    return [v / b for v, b in zip(values, baseline)]


def report(args: argparse.Namespace, timing: dict, memory: dict[tuple[str, str], dict], case: dict, load: str) -> str:
    """The markdown report of a timing run that worked (`main` writes none for one that failed)."""
    seconds = timing["seconds"]
    batch = case["batch_size"]
    rows = []
    for name, values in seconds.items():
        row = [name, f"{timing['parameters'][name] / 1e6:.1f} M"]
        for operation in ("encode", "decode"):
            per_call = median(values[operation])
            result = memory.get((name, operation), {})
            row += [
                f"{batch / per_call:.3f}",
                format_seconds(per_call / batch),
                format_bytes(result.get("peak_extra_bytes")),
            ]
        rows.append(row)
    headers = ["model", "parameters", "encode images/s", "encode s/image", "encode peak extra memory",
               "decode images/s", "decode s/image", "decode peak extra memory"]  # fmt: skip
    lines = [
        "# Speed benchmark: encode and decode at 256x256, default config",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Measured on: {environment_summary(args.device)}.",
        "",
        load,
        "",
        (
            f"Batch of {batch} random images of {case['resolution']}x{case['resolution']}, eval mode, no gradients, float32; "
            f"medians of {case['rounds']} round-robin rounds after one warm-up round. Peak extra memory: first call in a "
            "fresh process (CPU: resident-set high-water mark of live tensors, see `common.py`; CUDA: max_memory_allocated)."
        ),
        "",
        markdown_table(headers, rows),
        "",
        *memory_failures(memory),
        "Ratios (median [min-max] of per-round time ratios; below 1 means faster than the reference):",
        "",
    ]
    ratio_rows = []
    if "nearest" in seconds:
        for name in [n for n in seconds if n in RULES and n != "nearest"]:
            ratio_rows.append([f"`{name}` time / `nearest` time"] + [
                with_range(paired_ratios(seconds[name][op], seconds['nearest'][op]), 3, "x") for op in ("encode", "decode")])  # fmt: skip
    if DIFFUSERS in seconds:
        for name in [n for n in seconds if n in RULES]:
            ratio_rows.append([f"`{name}` time / {DIFFUSERS} time"] + [
                with_range(paired_ratios(seconds[name][op], seconds[DIFFUSERS][op]), 3, "x") for op in ("encode", "decode")])  # fmt: skip
    lines.append(markdown_table(["ratio", "encode", "decode"], ratio_rows))
    if "nearest" in seconds and "cdb" in seconds:
        ratio = median(paired_ratios(seconds["cdb"]["encode"], seconds["nearest"]["encode"]))
        verdict = "met" if ratio <= ENCODE_TARGET_RATIO else f"MISSED by {ratio / ENCODE_TARGET_RATIO - 1:.0%}"
        lines += ["", f"Target `cdb` encode <= {ENCODE_TARGET_RATIO}x `nearest`: {ratio:.3f}x -> {verdict}."]
    lines += [
        "",
        "All timings (s per call): "
        + "; ".join(f"{name} {op} " + ", ".join(f"{s:.2f}" for s in v[op]) for name, v in seconds.items() for op in v),
        "",
    ]
    return "\n".join(lines)


def memory_failures(memory: dict[tuple[str, str], dict]) -> list[str]:
    """Report lines naming the memory cases that failed (their cells read n/a)."""
    failed = [f"{name} {op}: {result['error']}" for (name, op), result in memory.items() if "error" in result]
    return ["Peak memory not measured for " + "; ".join(failed) + ".", ""] if failed else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="Skip diffusers' VQModel.")
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=3, help="Timed round-robin rounds.")
    parser.add_argument("--skip-memory", action="store_true", help="Only throughput.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (0: torch's default); 1 gives steadier numbers on a shared machine.")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds before a case is given up.")
    parser.add_argument("--output", default="speed.md", help="Report name under benchmarks/results/.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from cdb_tokenizer import CDBVQConfig

    args = parse_args(argv)
    if args.diffusers:
        require("diffusers", "the diffusers VQModel baseline", "pass --no-diffusers to skip it")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = load_line()
    config = CDBVQConfig()
    names = list(args.rules) + ([DIFFUSERS] if args.diffusers else [])
    case = {
        "batch_size": args.batch_size, "resolution": config.resolution, "codebook_size": config.codebook_size,
        "downsampling_factor": config.downsampling_factor, "device": args.device, "threads": args.threads,
    }  # fmt: skip
    memory = {}
    if not args.skip_memory:
        jobs = [(name, op) for name in names for op in ("encode", "decode")]
        for name, operation in tqdm(jobs, desc="memory (one process each)"):
            job = {**case, "kind": "memory", "model": name, "operation": operation}
            result = run_worker(__file__, job, args.timeout, exact_memory=True)
            memory[(name, operation)] = result
            tqdm.write(json.dumps({k: result.get(k) for k in ("model", "operation", "peak_extra_bytes", "error")}))
    print("timing (one process, round-robin) ...", flush=True)
    timing = run_worker(__file__, {**case, "kind": "timing", "models": names, "rounds": args.rounds}, args.timeout)
    if "error" in timing:  # no report: one that is only an error would replace the last good one
        raise SystemExit(f"speed.py: the timing run failed, no report written: {timing['error']}")
    text = report(args, timing, memory, {**case, "rounds": args.rounds}, load_summary(load_before))
    path = write_report(args.output, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        case = json.loads(sys.argv[2])
        if case.get("threads", 0) > 0 and case["device"] == "cpu":
            torch.set_num_threads(case["threads"])
        report_from_worker(memory_worker(case) if case["kind"] == "memory" else timing_worker(case))
    else:
        main()
