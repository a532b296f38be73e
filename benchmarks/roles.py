"""Code roles and restoration: do supervised roles divide the work, and does restoration training undo blur?

Four runs of the same small `cdb` tokenizer (same backbone weights at step 0, same crops in the same order, same
steps; the protocol, helpers and held-out set of `benchmarks/quality.py`):

- `plain`: reconstruction training, no roles (the reference);
- `roles`: the three-role preset (structure / texture / colour thirds of the codebook) with role supervision;
- `restore`: restoration training: the encoder sees a degraded crop (`--train-degradation`), the loss targets the
  clean one;
- `restore+roles`: restoration with the three roles.

Measured on every non-overlapping crop of scikit-learn's two photos (never trained on):

1. role separation: the share of high-Laplacian tokens (top quarter of the held-out Laplacian energy) whose code
   lies in the texture range, and of smooth tokens (bottom half) whose code lies in the structure range, against
   chance (the range's share of the codebook); the same shares for `plain` read through the same code ranges;
   PSNR cost of the roles = PSNR(`plain`) - PSNR(`roles`);
2. restoration: PSNR of the sharp crop from its blurred version (Gaussian sigma `--sigma`, and motion blur of
   `--motion-length` pixels in a direction drawn per crop, fixed seed): the blurred input itself, `plain` given the
   blurred input, `restore` and `restore+roles`.

    OMP_NUM_THREADS=1 python benchmarks/roles.py                 # defaults: a few minutes per run on a busy CPU
    OMP_NUM_THREADS=1 python benchmarks/roles.py --steps 100 --runs plain roles --output roles_smoke.md
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    command_line,
    distinct,
    environment_summary,
    load_line,
    load_summary,
    markdown_table,
    positive_int,
    timestamp,
    write_report,
)
from quality import grid_crops, parse_overrides, photo_tensors, random_crops, reference_backbone, small_config, train_step, training_parts
from tqdm.auto import tqdm

from cdb_tokenizer import CDBVQModel
from cdb_tokenizer.modeling_cdb_vq import flatten_grid
from cdb_tokenizer.tools.degradations import degrade, parse_spec
from cdb_tokenizer.tools.evaluation import psnr  # pooled over the set's pixels, as evaluate()
from cdb_tokenizer.tools.losses import TokenizerLoss
from cdb_tokenizer.quantization_cdb_vq import image_signal_features
from cdb_tokenizer.tools.roles import role_legend, save_role_map, three_role_ranges

RUNS = ("plain", "roles", "restore", "restore+roles")
TRAINING_CROPS = 520  # crops of the training photos read back, spread evenly over them (as many as held out)
EVAL_SEED = 1234


def run_config(args: argparse.Namespace, run: str) -> dict:
    overrides = dict(args.overrides)
    if "roles" in run:
        overrides.update(code_roles=three_role_ranges(args.codebook_size), role_supervision_weight=args.role_weight)
    if run.startswith("restore"):
        overrides["restoration_degradation"] = args.train_degradation
    return overrides


def build(args: argparse.Namespace, run: str, backbone: dict) -> CDBVQModel:
    saved = args.overrides
    args.overrides = run_config(args, run)
    try:
        config = small_config(args, "cdb")
    finally:
        args.overrides = saved
    torch.manual_seed(args.seed)
    model = CDBVQModel(config)
    model.load_state_dict(backbone, strict=False)
    return model


def train(args: argparse.Namespace, run: str, backbone: dict, photos: list) -> tuple[CDBVQModel, float]:
    """quality.py's loop (the library's training step: L1 + L2 + vq_loss, AdamW, dead-code restarts after each
    step), with a degraded input for the restoration runs (and the optional high-frequency term)."""
    model = build(args, run, backbone).train()
    restore = run.startswith("restore")
    loss_module = TokenizerLoss(l1_weight=1.0, l2_weight=1.0, high_frequency_weight=args.high_frequency_weight if restore else 0.0)
    parts = training_parts(model, args.learning_rate, loss_module)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"training {run}")
    for step in progress:
        target = random_crops(photos, args.resolution, args.batch_size, generator)
        inputs = degrade(target, args.train_degradation, seed=args.seed * 100_003 + step) if restore else None
        metrics = train_step(parts, target, step, inputs)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    return model.eval(), (time.perf_counter() - start) / args.steps


@torch.no_grad()
def reconstruct(
    model: CDBVQModel, images: torch.Tensor, batch_size: int = 64, quantize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions and token ids; `quantize=False` decodes the encoder's latents as they are (no codebook)."""
    outputs, tokens = [], []
    for batch in images.split(batch_size):
        encoded = model.encode(batch)
        tokens.append(encoded.image_tokens)
        outputs.append(model.decode(encoded.image_tokens) if quantize else model.decode_latents(encoded.latents))
    return torch.cat(outputs), torch.cat(tokens)


def separation(tokens: torch.Tensor, signals: torch.Tensor, codebook_size: int) -> dict:
    """Shares of high-Laplacian tokens in texture codes and of smooth tokens in structure codes, with chance."""
    ranges = three_role_ranges(codebook_size)
    flat_tokens = tokens.flatten()
    laplacian_energy = signals[:, 1].flatten()
    high = laplacian_energy >= laplacian_energy.quantile(0.75)
    smooth = laplacian_energy <= laplacian_energy.quantile(0.5)

    def share(mask: torch.Tensor, role: str) -> float:
        start, end = ranges[role]
        chosen = flat_tokens[mask]
        return float(((chosen >= start) & (chosen < end)).float().mean())

    return {
        "texture_share": share(high, "texture"),
        "texture_chance": (ranges["texture"][1] - ranges["texture"][0]) / codebook_size,
        "structure_share": share(smooth, "structure"),
        "structure_chance": (ranges["structure"][1] - ranges["structure"][0]) / codebook_size,
        "colour_share_of_smooth": share(smooth, "colour"),
    }


def report(args, results: dict, minutes: float, started: str, load: str, held_out: int) -> str:
    config = small_config(args, "cdb")
    lines = [
        "# Code roles and restoration",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} {command_line()}`, started {started}, "
        f"{minutes:.1f} min in all; one training process at a time.",
        "",
        load,
        "",
        f"Measured on: {environment_summary()}.",
        "",
        f"Setup (quality.py's protocol): `cdb` tokenizer, base_channels {config.base_channels}, channel_multipliers "
        f"{config.channel_multipliers} (x{config.downsampling_factor}), latent_dim {config.latent_dim}, K = "
        f"{config.codebook_size} codes of dim {config.codebook_dim}; {args.steps} steps of batch {args.batch_size} "
        f"random {args.resolution}x{args.resolution} crops of `sample_photos({args.train_source!r})`, AdamW lr {args.learning_rate}, "
        f"seed {args.seed}, loss L1 + L2 + vq_loss, the same backbone weights at step 0 for every run. Roles: "
        f"structure / texture / colour thirds, role_supervision_weight {args.role_weight} (thresholds: the config "
        f"defaults). Restoration runs train on `{args.train_degradation}`"
        + (f" with high_frequency_weight {args.high_frequency_weight}" if args.high_frequency_weight else "")
        + f". Held-out: {held_out} non-overlapping crops of scikit-learn's two photos. No CLIP teacher.",
        "",
    ]
    if "plain" in results or "roles" in results:
        rows = []
        for run in ("plain", "roles", "restore", "restore+roles"):
            if run not in results:
                continue
            r = results[run]
            s = r["separation"]
            rows.append([run, f"{r['psnr']:.2f}", f"{s['texture_share']:.1%}", f"{s['texture_share'] / s['texture_chance']:.2f}x",
                         f"{s['structure_share']:.1%}", f"{s['structure_share'] / s['structure_chance']:.2f}x",
                         f"{s['colour_share_of_smooth']:.1%}", f"{r['seconds_per_step']:.3f}"])  # fmt: skip
        lines += [
            "## Role separation (held-out, clean input)",
            "",
            markdown_table(["run", "PSNR (dB)", "high-Laplacian -> texture", "vs chance", "smooth -> structure",
                            "vs chance", "smooth -> colour", "s / step"], rows),  # fmt: skip
            "",
            "Chance is each range's share of the codebook (1/3). Runs without roles are read through the same "
            "code ranges. High-Laplacian: top quarter of the held-out tokens' Laplacian energy; smooth: bottom half "
            "(smooth tokens with strong chroma are meant for the colour range).",
            "",
        ]
    restoration_runs = [run for run in ("plain", "restore", "restore+roles") if run in results]
    if any(run.startswith("restore") for run in results):
        first = next(run for run in RUNS if run in results)
        rows = [["blurred input itself", *[f"{results[first]['blurred'][name]:.2f}" for name in BLURS], "-", "-", "-"]]
        for run in restoration_runs:
            r = results[run]
            rows.append([f"{run} given the blurred input", *[f"{r['restored'][name]:.2f}" for name in BLURS],
                         f"{r['psnr']:.2f}", f"{r['unquantized']:.2f}", f"{r['training_crops']:.2f}"])  # fmt: skip
        lines += [
            "## Restoration (held-out PSNR of the sharp crop, dB)",
            "",
            markdown_table(["", *[BLUR_TITLES[name].format(args=args) for name in BLURS],
                            "the same model on the sharp input (its ceiling)", "sharp input, latents not quantized",
                            "sharp crops of its training photos"], rows),  # fmt: skip
            "",
            "A tokenizer cannot give back more than it can reconstruct: its PSNR on the sharp input bounds what it "
            "can restore. The next column decodes the encoder's latents without the codebook (what the quantizer "
            f"costs), the last one is the model on {TRAINING_CROPS} non-overlapping crops of the photos it trained on "
            "(the sharp input; how much of the held-out gap is the step from its training photos to the held-out ones).",
            "",
        ]
    lines += ["## Targets", "", *targets(results), ""]
    if args.figure:
        lines += [f"![role map of held-out crops (roles run; {args.figure_legend})]({args.figure})", ""]
    return "\n".join(lines)


BLURS = ("gaussian", "motion")
BLUR_TITLES = {"gaussian": "Gaussian blur sigma {args.sigma}", "motion": "motion blur {args.motion_length} px"}


def targets(results: dict) -> list[str]:
    lines = []
    if "roles" in results:
        s = results["roles"]["separation"]
        for key, chance, name in (("texture_share", "texture_chance", "high-Laplacian tokens in texture codes"),
                                  ("structure_share", "structure_chance", "smooth tokens in structure codes")):  # fmt: skip
            ratio = s[key] / s[chance]
            lines.append(f"- {name} >= 2x chance: {ratio:.2f}x -> {'met' if ratio >= 2 else 'MISSED'}")
        if "plain" in results:
            cost = results["plain"]["psnr"] - results["roles"]["psnr"]
            lines.append(f"- PSNR cost of the roles <= 0.3 dB: {cost:+.2f} dB -> {'met' if cost <= 0.3 else 'MISSED'}")
    for run in ("restore", "restore+roles"):
        if run not in results:
            continue
        for blur in BLURS:
            restored = results[run]["restored"][blur]
            others = {"the blurred input itself": results[run]["blurred"][blur]}
            if "plain" in results:
                others["`plain` given the blurred input"] = results["plain"]["restored"][blur]
            for name, value in others.items():
                margin = restored - value
                lines.append(
                    f"- `{run}` beats {name} by >= 1.5 dB ({blur} blur): {restored:.2f} vs {value:.2f} dB "
                    f"({margin:+.2f} dB) -> {'met' if margin >= 1.5 else 'MISSED'}"
                )
    if "restore" in results and "restore+roles" in results:
        for blur in BLURS:
            gain = results["restore+roles"]["restored"][blur] - results["restore"]["restored"][blur]
            lines.append(f"- roles and restoration, {blur} blur: {gain:+.2f} dB with roles (no target; reported)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--train-source", default="skimage", choices=["skimage", "demo"],
                        help="Training photos (`sample_photos`): quality.py's 16 scikit-image photos, or the demo's "
                        "13 with scikit-image's colour wheel (saturated colour the others never show).")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=32, help="Crop size for training and evaluation.")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--channel-multipliers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=384)
    parser.add_argument("--codebook-dim", type=int, default=16)
    parser.add_argument("--role-weight", type=float, default=1.0, help="role_supervision_weight of the role runs.")
    parser.add_argument("--train-degradation", default="gaussian_blur:0.5-2.5|motion_blur:3-11",
                        help="Degradation spec of the restoration runs (cdb_tokenizer.tools.degradations).")  # fmt: skip
    parser.add_argument("--high-frequency-weight", type=float, default=0.0)
    parser.add_argument("--sigma", type=float, default=1.5, help="Gaussian blur of the restoration test.")
    parser.add_argument("--motion-length", type=float, default=7.0, help="Motion blur length of the restoration test.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="CDBVQConfig field for every run, e.g. --set role_prior_scale=0.3 (repeatable).")  # fmt: skip
    parser.add_argument("--output", default="roles.md", help="Report name under benchmarks/results/.")
    args = parser.parse_args(argv)
    args.overrides, args.dead_code_restarts = parse_overrides(args.overrides), True
    distinct(parser, "--runs", args.runs)
    try:  # before any training: a bad spec or model flag failed only when its run came, as a traceback
        parse_spec(args.train_degradation)
        small_config(args, "cdb")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, load_before = timestamp(), load_line()
    start = time.perf_counter()
    photos = photo_tensors(args.train_source)
    held_out = grid_crops(photo_tensors("sklearn"), args.resolution)
    training_crops = grid_crops(photos, args.resolution)
    training_crops = training_crops[torch.linspace(0, len(training_crops) - 1, TRAINING_CROPS).long()]
    blurred = {
        "gaussian": degrade(held_out, f"gaussian_blur:{args.sigma}", seed=EVAL_SEED),
        "motion": degrade(held_out, f"motion_blur:{args.motion_length}", seed=EVAL_SEED),
    }
    backbone = reference_backbone(args)
    factor = small_config(args, "cdb").downsampling_factor
    signals = flatten_grid(image_signal_features(held_out, factor))
    results = {}
    args.figure = None
    for run in args.runs:
        model, seconds_per_step = train(args, run, backbone, photos)
        reconstruction, tokens = reconstruct(model, held_out)
        result = {"psnr": psnr(reconstruction, held_out), "seconds_per_step": seconds_per_step,
                  "separation": separation(tokens, signals, args.codebook_size),
                  "blurred": {name: psnr(images, held_out) for name, images in blurred.items()},
                  "restored": {name: psnr(reconstruct(model, images)[0], held_out) for name, images in blurred.items()},
                  "unquantized": psnr(reconstruct(model, held_out, quantize=False)[0], held_out),
                  "training_crops": psnr(reconstruct(model, training_crops)[0], training_crops)}  # fmt: skip
        results[run] = result
        tqdm.write(json.dumps({"run": run, **result}, default=float))
        if run == "roles":  # drawn once the report is written: a run that fails later leaves the last good pair
            picks = held_out[torch.linspace(0, held_out.shape[0] - 1, 8).long()]
            role_map = (F.interpolate(picks, scale_factor=4, mode="nearest"),  # 32-pixel crops are too small to see
                        model.role_map(picks), model.config.role_names)  # fmt: skip
            figure_path = RESULTS_DIR / f"{args.output.rsplit('.', 1)[0]}_role_map.png"
            args.figure = figure_path.name  # the report links it by name, beside itself
            args.figure_legend = role_legend(model.config.role_names)
    minutes = (time.perf_counter() - start) / 60
    text = report(args, results, minutes, started, load_summary(load_before), held_out.shape[0])
    # The figure beside the report, both or neither: drawn under a temporary name, renamed once the report is written.
    drawn = save_role_map(*role_map, figure_path.with_name("." + figure_path.name)) if args.figure else None
    try:
        path = write_report(args.output, text)
    except BaseException:
        if drawn is not None:
            drawn.unlink(missing_ok=True)
        raise
    if drawn is not None:
        os.replace(drawn, figure_path)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
