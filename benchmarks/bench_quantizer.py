"""Time and peak memory of the quantizer's assignment rules, and of a whole 256x256 encode per rule.

Assignment: `CDBVQQuantizer` alone, N latents (default 65,536) against K codes of dimension D, for each rule:

- `nearest`: inference (argmin distance);
- `cdb`: inference (the router's argmax);
- `sinkhorn-train`: training mode (Sinkhorn plan of the batch), forward and backward;
- `cdb-train`: training mode (router, soft assignment over the candidates, potentials, losses), forward and backward.

Training-mode cases run a backward pass of the weighted quantizer losses plus a stand-in for the decoder's gradient
(`quantized.square().mean()`). Every case runs in its own process; peak memory is the extra memory of live tensors
over the inputs (see `common.py`). The full grid at K = 65,536 with the training rules takes hours on a 2-core CPU, so by default
those rules stop at smaller K (see `DEFAULT_MAX_CODEBOOK`); `--full` runs everything.

Encode: `CDBVQModel(CDBVQConfig(assignment=rule)).encode` of one 256x256 image with the default config, the rules
timed round-robin in one process so that machine load hits them alike. Target: `cdb` within 1.15x of `nearest`.

    python benchmarks/bench_quantizer.py                      # default grid (~10 min on 2 CPU cores)
    python benchmarks/bench_quantizer.py --full               # every rule at every K and D
    python benchmarks/bench_quantizer.py --codebook-sizes 1024 --dims 8 --skip-encode   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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
    run_worker,
    time_call,
    write_report,
)
from tqdm.auto import tqdm

# rule name -> (config.assignment, training mode)
RULES = {
    "nearest": ("nearest", False),
    "cdb": ("cdb", False),
    "sinkhorn-train": ("sinkhorn", True),
    "cdb-train": ("cdb", True),
}
# Largest K each rule runs at without --full (training rules at K = 65,536 take tens of minutes per case on 2 cores).
DEFAULT_MAX_CODEBOOK = {"nearest": 65536, "cdb": 16384, "sinkhorn-train": 1024, "cdb-train": 1024}
ENCODE_RULES = ("nearest", "sinkhorn", "cdb")
MEMORY_TARGET_BYTES = 2**30
ENCODE_TARGET_RATIO = 1.15


# ----------------------------------------------------------------------------------------------------------------
# Worker side: one case per process
# ----------------------------------------------------------------------------------------------------------------


def build_quantizer(rule: str, codebook_size: int, dim: int, chunk_size: int | None, device: torch.device):
    """A `CDBVQQuantizer` with the default config except K, D (and the chunk size), initialised like the model's."""
    from cdb_tokenizer import CDBVQConfig
    from cdb_tokenizer.quantization_cdb_vq import CDBVQQuantizer

    assignment, training = RULES[rule]
    extra = {"assignment_chunk_size": chunk_size} if chunk_size else {}
    config = CDBVQConfig(codebook_size=codebook_size, codebook_dim=dim, assignment=assignment, **extra)
    quantizer = CDBVQQuantizer(config)
    with torch.no_grad():
        quantizer.codebook.weight.normal_(std=1.0 / math.sqrt(dim))
        quantizer.reset_state()
        quantizer.initialized.fill_(True)  # time the assignment, not the one-off k-means initialisation
        if quantizer.router is not None:
            quantizer.router.code_keys.normal_(std=1e-3)
    return quantizer.to(device).train(training), config


def assignment_worker(case: dict) -> dict:
    from cdb_tokenizer.modeling_cdb_vq import LOSS_WEIGHTS, weighted_vq_loss

    device = torch.device(case["device"])
    torch.manual_seed(0)
    quantizer, config = build_quantizer(case["rule"], case["codebook_size"], case["dim"], case["chunk_size"], device)
    training = quantizer.training
    latents = torch.randn(case["num_latents"], case["dim"], device=device, requires_grad=training)
    semantic = None
    if config.assignment == "cdb":
        semantic = torch.randn(case["num_latents"], config.semantic_dim, device=device, requires_grad=training)

    def forward_backward() -> tuple[float, float]:
        if not training:
            with torch.no_grad():
                return time_call(lambda: quantizer(latents, semantic_features=semantic), device), 0.0
        holder = {}

        def forward():
            output = quantizer(latents, semantic_features=semantic)
            terms = {name: getattr(output, name, None) for name in LOSS_WEIGHTS}  # the semantic ones are not here
            holder["loss"] = weighted_vq_loss(config, terms) + output.quantized.square().mean()

        forward_seconds = time_call(forward, device)
        backward_seconds = time_call(lambda: holder.pop("loss").backward(), device)
        latents.grad = None
        quantizer.zero_grad(set_to_none=True)
        return forward_seconds, backward_seconds

    with PeakMemory(device) as memory:
        timings = [forward_backward()]
    while len(timings) < case["repeats"] and sum(sum(t) for t in timings) < case["max_seconds"]:
        timings.append(forward_backward())
    return {
        **case,
        "forward_seconds": median([t[0] for t in timings]),
        "backward_seconds": median([t[1] for t in timings]) if training else None,
        "peak_extra_bytes": memory.extra,
        "memory_method": memory.method,
        "runs": len(timings),
    }


def encode_worker(case: dict) -> dict:
    """Encode a batch per rule, round-robin so that load changes hit every rule alike.

    The quantizer's share (the semantic head plus the assignment for `cdb`, the assignment alone otherwise) is
    timed separately on the same latents. Memory comes from `encode_memory_worker`, one fresh process per rule.
    """
    from cdb_tokenizer import CDBVQConfig, CDBVQModel
    from cdb_tokenizer.modeling_cdb_vq import flatten_grid

    device = torch.device(case["device"])
    models = {}
    for rule in case["rules"]:
        torch.manual_seed(0)
        models[rule] = CDBVQModel(CDBVQConfig(assignment=rule)).to(device).eval()
    config = models[case["rules"][0]].config
    pixel_values = torch.rand(case["batch_size"], 3, config.resolution, config.resolution, device=device) * 2 - 1
    timings = {rule: [] for rule in models}
    quantizer_timings = {rule: [] for rule in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.encode(pixel_values)
        for _ in range(case["repeats"]):
            for rule, model in models.items():
                timings[rule].append(time_call(functools.partial(model.encode, pixel_values), device))
        for rule, model in models.items():
            hidden_states = model.encoder(pixel_values)
            call = functools.partial(quantize, model, hidden_states, flatten_grid(model.quant_conv(hidden_states)))
            quantizer_timings[rule] = [time_call(call, device) for _ in range(case["quantizer_repeats"])]
    return {
        **case,
        "resolution": config.resolution,
        "codebook_size": config.codebook_size,
        "codebook_dim": config.codebook_dim,
        "all_seconds": timings,
        "quantizer_seconds": {rule: median(values) for rule, values in quantizer_timings.items()},
    }


def quantize(model, hidden_states: torch.Tensor, latents: torch.Tensor) -> None:
    """The quantizer's part of an encode: the semantic head (read by `cdb` only) and the assignment."""
    from cdb_tokenizer.modeling_cdb_vq import flatten_grid

    features = None
    if model.config.assignment == "cdb":
        features = flatten_grid(model.semantic_head(hidden_states))
    model.quantizer(latents, semantic_features=features)


def encode_memory_worker(case: dict) -> dict:
    """Peak extra memory of the first encode of a fresh model (one rule per process)."""
    from cdb_tokenizer import CDBVQConfig, CDBVQModel

    device = torch.device(case["device"])
    model = CDBVQModel(CDBVQConfig(assignment=case["rule"])).to(device).eval()
    size = model.config.resolution
    pixel_values = torch.rand(case["batch_size"], 3, size, size, device=device) * 2 - 1
    with torch.no_grad(), PeakMemory(device) as peak:
        model.encode(pixel_values)
    return {**case, "peak_extra_bytes": peak.extra, "memory_method": peak.method}


# ----------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------


def planned_cases(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    cases, skipped = [], []
    for codebook_size in args.codebook_sizes:
        for dim in args.dims:
            for rule in args.rules:
                if not args.full and codebook_size > DEFAULT_MAX_CODEBOOK[rule]:
                    skipped.append(f"{rule} K={codebook_size:,} D={dim}")
                    continue
                cases.append(
                    {
                        "kind": "assignment", "rule": rule, "codebook_size": codebook_size, "dim": dim,
                        "num_latents": args.num_latents, "chunk_size": args.chunk_size, "device": args.device,
                        "repeats": args.repeats, "max_seconds": args.max_seconds, "threads": args.threads,
                    }
                )  # fmt: skip
    return cases, skipped


def assignment_section(results: list[dict], skipped: list[str], num_latents: int) -> str:
    rows = []
    for r in results:
        mode = "train (fwd+bwd)" if RULES[r["rule"]][1] else "inference"
        if "error" in r:
            rows.append([r["rule"], mode, f"{r['codebook_size']:,}", r["dim"], "error: " + r["error"], "", "", "", ""])
            continue
        total = r["forward_seconds"] + (r["backward_seconds"] or 0.0)
        rows.append(
            [
                r["rule"], mode, f"{r['codebook_size']:,}", r["dim"], format_seconds(r["forward_seconds"]),
                format_seconds(r["backward_seconds"]) if r["backward_seconds"] is not None else "-",
                format_seconds(total), format_bytes(r["peak_extra_bytes"]), r["runs"],
            ]
        )  # fmt: skip
    table = markdown_table(
        ["rule", "mode", "K", "D", "forward", "backward", "total", "peak extra memory", "runs"], rows
    )
    lines = [f"## Assignment of N = {num_latents:,} latents", "", table, ""]
    lines += memory_target_lines(results)
    if skipped:
        lines += ["", "Not run by default (pass `--full`): " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def memory_target_lines(results: list[dict]) -> list[str]:
    largest = [r for r in results if "error" not in r and r["codebook_size"] * r["num_latents"] >= 65536 * 65536]
    if not largest:
        return [
            "Memory target (65,536 x 65,536 assignment < 1 GiB extra): not measured in this run (needs K = 65,536)."
        ]
    lines = ["Memory target, 65,536 latents x 65,536 codes must take < 1 GiB extra:"]
    for r in largest:
        verdict = "met" if r["peak_extra_bytes"] < MEMORY_TARGET_BYTES else "MISSED"
        lines.append(f"- {r['rule']} D={r['dim']}: {format_bytes(r['peak_extra_bytes'])} extra -> {verdict}")
    return lines


def encode_section(result: dict, memory: dict[str, int | None]) -> str:
    if "error" in result:
        return f"## Whole encode\n\nerror: {result['error']}"
    timings = result["all_seconds"]
    baseline = timings.get("nearest")
    rows = []
    for rule, values in timings.items():
        seconds = median(values)
        ratio = median([v / b for v, b in zip(values, baseline)]) if baseline else None
        rows.append(
            [
                rule, format_seconds(seconds), format_seconds(min(values)), f"{result['batch_size'] / seconds:.2f}",
                f"{ratio:.3f}x" if ratio else "-", format_seconds(result["quantizer_seconds"][rule]),
                format_bytes(memory.get(rule)),
            ]
        )  # fmt: skip
    headers = [
        "rule",
        "encode (median)",
        "encode (min)",
        "images/s",
        "vs nearest",
        "quantizer part",
        "peak extra memory",
    ]
    lines = [
        (
            f"## Whole encode, {result['batch_size']} image(s) of {result['resolution']}x{result['resolution']}, "
            f"default config (K = {result['codebook_size']:,}, D = {result['codebook_dim']})"
        ),
        "",
        markdown_table(headers, rows),
        "",
        f"{result['repeats']} round-robin rounds after one warm-up; peak extra memory is the first encode in a fresh "
        f"process; `vs nearest` is the median over rounds of the "
        "per-round ratio, which cancels slow changes of machine load. `quantizer part` is the quantizer alone on the "
        "same latents (plus the semantic head for `cdb`, which only `cdb` runs at inference), median of "
        f"{result['quantizer_repeats']}. All encode runs (s): "
        + "; ".join(f"{rule} " + ", ".join(f"{s:.2f}" for s in values) for rule, values in timings.items()),
    ]
    if baseline and "cdb" in timings:
        ratio = median([v / b for v, b in zip(timings["cdb"], baseline)])
        verdict = "met" if ratio <= ENCODE_TARGET_RATIO else f"MISSED by {ratio / ENCODE_TARGET_RATIO - 1:.0%}"
        lines += ["", f"Target `cdb` encode <= {ENCODE_TARGET_RATIO}x `nearest`: {ratio:.3f}x -> {verdict}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-latents", type=positive_int, default=65536, help="N latents per assignment.")
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[1024, 16384, 65536], help="K values.")
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 256], help="Code dimensions D.")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), help="Assignment rules.")
    parser.add_argument("--full", action="store_true", help="Run every rule at every K (hours on 2 CPU cores).")
    parser.add_argument("--chunk-size", type=int, default=None, help="Override config.assignment_chunk_size.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per assignment case (at most).")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="Stop repeating a case after this long.")
    parser.add_argument("--encode-repeats", type=int, default=7, help="Timed encodes per rule (round-robin rounds).")
    parser.add_argument("--encode-batch-size", type=int, default=1, help="Images per encode call.")
    parser.add_argument("--skip-assignment", action="store_true", help="Only the whole-encode benchmark.")
    parser.add_argument("--skip-encode", action="store_true", help="Only the assignment benchmark.")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds before a case is given up.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (0: torch's default); 1 gives steadier numbers on a shared machine.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None,
                        help="Report name under benchmarks/results/ (default: quantizer.md for both parts, "
                        "quantizer_encode.md with --skip-assignment, quantizer_assignment.md with --skip-encode).")
    args = parser.parse_args(argv)
    if args.skip_assignment and args.skip_encode:
        parser.error("--skip-assignment and --skip-encode leave nothing to run.")
    if args.output is None:  # a report of one part never replaces one of both
        part = "_encode" if args.skip_assignment else "_assignment" if args.skip_encode else ""
        args.output = f"quantizer{part}.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = load_line()
    sections, outcomes = [], []
    if not args.skip_assignment:
        cases, skipped = planned_cases(args)
        results = []
        for case in tqdm(cases, desc="assignment cases"):
            # Timing with one mapping per large block was within noise of the default allocator for these cases.
            result = run_worker(__file__, case, args.timeout, exact_memory=True)
            results.append(result)
            tqdm.write(json.dumps({k: v for k, v in result.items() if k not in ("device", "max_seconds", "threads")}))
        sections.append(assignment_section(results, skipped, args.num_latents))
        outcomes += results
    if not args.skip_encode:
        common = {"batch_size": args.encode_batch_size, "device": args.device, "threads": args.threads}
        memory = {}
        for rule in tqdm(ENCODE_RULES, desc="encode memory (one process each)"):
            result = run_worker(
                __file__, {**common, "kind": "encode_memory", "rule": rule}, args.timeout, exact_memory=True
            )
            memory[rule] = result.get("peak_extra_bytes")
        case = {**common, "kind": "encode", "rules": list(ENCODE_RULES), "repeats": args.encode_repeats,
                "quantizer_repeats": 20}  # fmt: skip
        print("timing whole encodes ...", flush=True)
        result = run_worker(__file__, case, args.timeout)
        sections.append(encode_section(result, memory))
        outcomes.append(result)
    if all("error" in outcome for outcome in outcomes):  # a report without a number would replace the last good one
        failures = " | ".join(outcome["error"] for outcome in outcomes) or "every case was skipped (see --full)"
        raise SystemExit(f"bench_quantizer.py: no case ran, no report written: {failures}")
    report = "\n\n".join(
        [
            "# Quantizer benchmark",
            f"Command: `{command_line()}`",
            f"Measured on: {environment_summary(args.device)}.",
            load_summary(load_before),
            (
                "Peak memory is the extra memory over the inputs at the peak of the call (CPU: resident-set "
                "high-water mark in a fresh process per case, one mapping per block of 64 KiB or more so that it "
                "counts live tensors, see `common.py`; CUDA: `max_memory_allocated`). Times are medians. The machine "
                "may be shared: see the load average."
            ),
            *sections,
        ]
    )
    path = write_report(args.output, report + "\n")
    print(report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        case = json.loads(sys.argv[2])
        if case.get("threads", 0) > 0 and case["device"] == "cpu":
            torch.set_num_threads(case["threads"])
        workers = {"assignment": assignment_worker, "encode": encode_worker, "encode_memory": encode_memory_worker}
        report_from_worker(workers[case["kind"]](case))
    else:
        main()
