"""Reconstruction quality and codebook usage of the assignment rules, trained on real photos, held-out evaluation.

The same small `CDBVQModel` (same backbone weights at step 0, same seed, same crops in the same order, same steps)
is trained once per quantizer:

- `nearest`, `sinkhorn`, `cdb`: this project's `CDBVQQuantizer` with `config.assignment` set to the rule;
- `vqtorch`: vector-quantize-pytorch's `VectorQuantize` (k-means init, EMA codebook, dead-code replacement, the
  library's default rotation-trick gradient) behind `VectorQuantizeAdapter`, which has the forward signature and
  outputs of `CDBVQQuantizer`, so it drops into `model.quantizer` and the backbone is untouched.

Training: random crops (and flips) of the 16 scikit-image photos through the library's own training step
(`cdb_tokenizer.tools.steps.training_step` on a CPU `Accelerator`, `TokenizerLoss` as L1 + L2, plus
`output.vq_loss`; AdamW). Codebook updates: `nearest` and `sinkhorn` learn their codebook by gradient (unless
`--set ema_decay=...`), `cdb` by EMA (`ema_decay`), `vqtorch` by the library's EMA (`--vq-decay`). Every rule starts
from k-means of the first batch's latents, and dead-code restarts use one threshold, not one rule: a code is dead when
its running share of tokens is below `dead_code_threshold / K`. Ours (`restart_dead_codes` after every step) keeps
that share with `usage_decay` (0.99: ~100 steps) and gives a restarted code twice the threshold; `VectorQuantize`
(inside its forward) keeps tokens per batch with its EMA decay (0.8: ~5 steps) and gives a restarted code the
threshold itself. `--no-dead-code-restarts` turns them off for all. Evaluation: every non-overlapping crop of
scikit-learn's two photos (a different package: no leakage) through `cdb_tokenizer.tools.evaluation.evaluate`.
Writes `benchmarks/results/quality_seed{SEED}.md` (`quality_{rules}_seed{SEED}.md` for a subset of the rules) and
its code-usage plot beside it.

    python benchmarks/quality.py                                   # defaults, ~22-25 min on 2 busy CPU cores
    python benchmarks/quality.py --steps 5000 --output quality_5k.md
    python benchmarks/quality.py --rules cdb --set router_candidates=1 --output cdb_no_learned_term.md   # an ablation
    python benchmarks/quality.py --rules cdb nearest --held-in    # also on the training photos: are idle codes dead?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from common import (
    RESULTS_DIR,
    command_line,
    distinct,
    environment_summary,
    load_line,
    load_summary,
    markdown_table,
    positive_int,
    require,
    write_report,
)
from torch import nn
from tqdm.auto import tqdm

from cdb_tokenizer import CDBVQConfig, CDBVQModel
from cdb_tokenizer.configuration_cdb_vq import field_names
from cdb_tokenizer.modeling_cdb_vq import flatten_grid
from cdb_tokenizer.quantization_cdb_vq import CDBVQQuantizerOutput, nearest_codes, usage_statistics
from cdb_tokenizer.tools.data import sample_photos
from cdb_tokenizer.tools.evaluation import code_usage_counts, eval_mode, evaluate, save_usage_plot
from cdb_tokenizer.tools.losses import TokenizerLoss
from cdb_tokenizer.tools.steps import TrainingParts, restart_dead_codes, training_step

RULES = ("nearest", "sinkhorn", "cdb", "vqtorch")
TRAIN_WINDOW = 50  # steps averaged for the "train" columns of the report
# What `--set FIELD=VALUE` reaches (said in its help and in every report).
OVERRIDES_REACH = (
    "every rule's `CDBVQConfig`: all of it for `nearest`, `sinkhorn` and `cdb`; for `vqtorch` only the backbone "
    "and the K, D and dead_code_threshold its `VectorQuantize` is built from"
)
# Parts of the model that are the same in every run (the quantizer is what differs).
BACKBONE_PREFIXES = ("encoder.", "quant_conv.", "post_quant_conv.", "decoder.", "semantic_head.")


# ----------------------------------------------------------------------------------------------------------------
# The external baseline as a drop-in quantizer
# ----------------------------------------------------------------------------------------------------------------


class VectorQuantizeAdapter(nn.Module):
    """vector-quantize-pytorch's `VectorQuantize` with the interface `CDBVQModel` expects of `model.quantizer`.

    `forward(latents (N, D), semantic_features=None, signal_features=None) -> CDBVQQuantizerOutput` and
    `lookup(indices)`, and what the training step asks of a quantizer (`snapshot` / `restore`, `restart_dead_codes`).
    The library's commitment loss is returned unweighted as `commitment_loss` (the model applies
    `config.commitment_weight`, as for its own quantizer; at eval, the mean squared latent-to-code distance, as ours);
    the codebook learns by EMA, so `codebook_loss` is None. `codebook.weight` is the library's codebook.
    The library replaces dead codes inside its forward; `count_replacements` wraps its codebook's `replace` so that
    `restart_dead_codes` can report how many it replaced, as ours does.
    """

    def __init__(self, config: CDBVQConfig, decay: float = 0.8, threshold_ema_dead_code: float = 0.0):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.codebook_size = config.codebook_size
        self.vq = VectorQuantize(
            dim=config.codebook_dim,
            codebook_size=config.codebook_size,
            decay=decay,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=1.0,
        )
        self.replaced = 0
        self.router = None  # the model's inference checks read the router of a `cdb` quantizer
        count_replacements(self)

    def forward(
        self,
        latents: torch.Tensor,
        semantic_features: torch.Tensor | None = None,
        signal_features: torch.Tensor | None = None,
    ) -> CDBVQQuantizerOutput:
        quantized, indices, loss = self.vq(latents[None])
        indices = indices[0]
        utilization, perplexity = usage_statistics(torch.bincount(indices, minlength=self.codebook_size).float())
        if not self.training:  # the library's loss is 0 at eval; the model checks this one for NaN, as ours gives it
            loss = F.mse_loss(self.lookup(indices), latents.detach())
        return CDBVQQuantizerOutput(
            quantized=quantized[0],
            indices=indices,
            commitment_loss=loss.sum(),
            utilization=utilization,
            perplexity=perplexity,
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.vq.codebook)

    @property
    def codebook(self) -> SimpleNamespace:
        """The codes (K, D) as `codebook.weight`, where the model checks them for NaN/inf."""
        return SimpleNamespace(weight=self.vq.codebook)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the codebook and its EMA state, for `restore` to undo a step whose loss was not finite."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(snapshot)
        self.replaced = 0  # the undone step's replacements are undone too

    def restart_dead_codes(self, latents: torch.Tensor, seed: int = 0, signal_features=None) -> int:
        """Nothing to restart here (`VectorQuantize` replaced its dead codes inside its forward): how many codes it
        replaced since the last call."""
        replaced, self.replaced = self.replaced, 0
        return replaced


def count_replacements(adapter: VectorQuantizeAdapter) -> None:
    """Count the codes `VectorQuantize` replaces into `adapter.replaced`: the rows of its codebook that its `replace`
    changes (it may replace only some of the dead codes it is given, when they outnumber the batch's latents)."""
    codebook = adapter.vq._codebook
    replace = codebook.replace

    def counted(*args, **kwargs):
        before = codebook.embed.detach().clone()
        replace(*args, **kwargs)
        adapter.replaced += int((codebook.embed.detach() != before).any(-1).sum())

    codebook.replace = counted


# ----------------------------------------------------------------------------------------------------------------
# Data: random training crops of one package's photos, a fixed grid of held-out crops of another's
# ----------------------------------------------------------------------------------------------------------------


def photo_tensors(source: str) -> list[torch.Tensor]:
    """The photos of `sample_photos(source)` as (3, H, W) tensors in [-1, 1]."""
    import numpy as np

    return [
        torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 127.5 - 1
        for photo in sample_photos(source)
    ]


def random_crops(photos: list[torch.Tensor], size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of random `size` x `size` crops (photo drawn uniformly), each flipped left-right with p = 1/2."""
    crops = []
    for _ in range(batch_size):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        top = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=generator))
        crop = photo[:, top : top + size, left : left + size]
        crops.append(crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop)
    return torch.stack(crops)


def grid_crops(photos: list[torch.Tensor], size: int) -> torch.Tensor:
    """Every non-overlapping `size` x `size` crop of every photo, (n, 3, size, size)."""
    crops = []
    for photo in photos:
        tiles = photo.unfold(1, size, size).unfold(2, size, size)  # 3, rows, cols, size, size
        crops.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size))
    return torch.cat(crops)


# ----------------------------------------------------------------------------------------------------------------
# Models and training
# ----------------------------------------------------------------------------------------------------------------


def small_config(args: argparse.Namespace, assignment: str) -> CDBVQConfig:
    fields = {
        "resolution": args.resolution,
        "base_channels": args.base_channels,
        "channel_multipliers": args.channel_multipliers,
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "latent_dim": args.latent_dim,
        "codebook_size": args.codebook_size,
        "codebook_dim": args.codebook_dim,
        "semantic_dim": 64,
        "num_prototypes": 16,
        "router_dim": 32,
        "assignment": assignment,
    }
    if assignment in ("nearest", "sinkhorn"):
        # The baselines keep the gradient codebook they were first measured with (nearest's best PSNR here);
        # EMA nearest with k-means init and restarts is the `vqtorch` row.
        fields["ema_decay"] = None
    fields.update(args.overrides)
    if not args.dead_code_restarts:
        fields["dead_code_threshold"] = 0.0
    return CDBVQConfig(**fields)


def vqtorch_threshold(args: argparse.Namespace, config: CDBVQConfig) -> float:
    """`VectorQuantize`'s `threshold_ema_dead_code` (tokens per batch) at our threshold's share of the tokens,
    `dead_code_threshold / K`."""
    tokens_per_batch = args.batch_size * (args.resolution // config.downsampling_factor) ** 2
    return config.dead_code_threshold * tokens_per_batch / config.codebook_size


def build_model(args: argparse.Namespace, rule: str, backbone: dict[str, torch.Tensor]) -> CDBVQModel:
    """A model for `rule` whose backbone starts from `backbone` (the same weights for every rule)."""
    config = small_config(args, "nearest" if rule == "vqtorch" else rule)
    torch.manual_seed(args.seed)
    model = CDBVQModel(config)
    if rule == "vqtorch":
        threshold = vqtorch_threshold(args, config)
        model.quantizer = VectorQuantizeAdapter(config, decay=args.vq_decay, threshold_ema_dead_code=threshold)
    missing = [name for name in backbone if name not in model.state_dict()]
    if missing:
        raise RuntimeError(f"backbone weights not in the model: {missing[:3]}")
    model.load_state_dict(backbone, strict=False)
    return model


def reference_backbone(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    torch.manual_seed(args.seed)
    model = CDBVQModel(small_config(args, "cdb"))  # cdb has every backbone part (the semantic head too)
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


def training_parts(
    model: CDBVQModel, learning_rate: float, loss_module: TokenizerLoss | None = None, device: str = "cpu"
) -> TrainingParts:
    """What the library's training step needs for one model: an `Accelerator` (CPU unless `device` is a GPU; float32
    either way), AdamW and (by default) the L1 + L2 loss (no LPIPS, no discriminator, no teacher)."""
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainingParts(accelerator, model, optimizer, loss_module or TokenizerLoss(l1_weight=1.0, l2_weight=1.0))


def train_step(parts: TrainingParts, pixel_values: torch.Tensor, step: int, inputs: torch.Tensor | None = None) -> dict:
    """One step of the library's training step (L1 + L2 + vq_loss), then dead-code restarts (our quantizer;
    VectorQuantize replaces inside its forward, and its adapter reports how many codes). `inputs`: the encoder's
    input when it is not `pixel_values`."""
    terms, bad_term, output = training_step(parts, pixel_values, step, inputs=inputs)
    restarted = 0 if bad_term else restart_dead_codes(parts.unwrapped, output, seed=step)
    return {
        "loss": float(terms["total"].detach()),
        "reconstruction_loss": float((terms["l1"] + terms["l2"]).detach()),
        "utilization": float(output.utilization),
        "perplexity": float(output.perplexity),
        "restarted": restarted,
    }


def train_and_evaluate(
    args: argparse.Namespace, rule: str, backbone: dict, train_photos: list, held_out: torch.Tensor
) -> dict:
    model = build_model(args, rule, backbone).train()
    parts = training_parts(model, args.learning_rate, device=args.device)
    device = parts.accelerator.device
    generator = torch.Generator().manual_seed(args.seed)  # crops are drawn on the CPU: the same on every device
    history, restarted = [], 0
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"training {rule}")
    for step in progress:
        batch = random_crops(train_photos, args.resolution, args.batch_size, generator).to(device)
        metrics = train_step(parts, batch, step)
        restarted += metrics["restarted"]
        history.append(metrics)
        if step % 50 == 0 or step == args.steps - 1:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", used=f"{metrics['utilization']:.0%}")
    train_seconds = time.perf_counter() - start
    batches = [batch.to(device) for batch in held_out.split(args.eval_batch_size)]
    results = evaluate(model, batches, show_progress=False)
    counts = code_usage_counts(model, batches)
    diagnostics = assignment_diagnostics(model, batches)
    if args.held_in:
        diagnostics.update(held_in_diagnostics(args, model, train_photos, counts))
    tail = history[-min(TRAIN_WINDOW, len(history)) :]
    return {
        "rule": rule,
        **results,
        **diagnostics,
        "seconds_per_step": train_seconds / args.steps,
        "train_loss": sum(h["reconstruction_loss"] for h in tail) / len(tail),
        "train_utilization": sum(h["utilization"] for h in tail) / len(tail),
        "restarted_codes": restarted,
        "counts": counts,
    }


@torch.no_grad()
def assignment_diagnostics(model: CDBVQModel, batches: list[torch.Tensor]) -> dict[str, float]:
    """How the chosen codes relate to the latents on held-out data (eval mode).

    `nearest_agreement`: share of tokens whose code is the latent's nearest code (1 for nearest-code inference).
    `relative_error`: mean squared latent-to-chosen-code distance over the latents' variance (lower: the decoder
    sees codes closer to what the encoder meant). `nearest_relative_error`: the same with the nearest codes.
    """
    quantizer = model.quantizer
    agree, chosen_error, nearest_error, latents_all = 0, 0.0, 0.0, []
    with eval_mode(model):
        codes = quantizer.codes() if hasattr(quantizer, "codes") else quantizer.vq.codebook.float()
        for batch in batches:
            encoded = model.encode(batch)
            latents = flatten_grid(encoded.latents).float()
            if hasattr(quantizer, "prepare_latents"):
                latents = quantizer.prepare_latents(latents)
            chosen = encoded.image_tokens.flatten()
            nearest = nearest_codes(latents, codes, model.config.assignment_chunk_size)
            agree += int((chosen == nearest).sum())
            chosen_error += float((latents - codes[chosen]).pow(2).sum())
            nearest_error += float((latents - codes[nearest]).pow(2).sum())
            latents_all.append(latents)
    latents = torch.cat(latents_all)
    variance = float((latents - latents.mean(0)).pow(2).sum())
    return {
        "nearest_agreement": agree / latents.shape[0],
        "relative_error": chosen_error / variance,
        "nearest_relative_error": nearest_error / variance,
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_in_diagnostics(args: argparse.Namespace, model: CDBVQModel, train_photos: list, held_out_counts: torch.Tensor) -> dict:
    """The same measures on every non-overlapping crop of the *training* photos, and the share of the codes unused on
    held-out that these crops do use: whether a code idle on held-out is dead or serves content the held-out photos
    do not have."""
    device = next(model.parameters()).device
    batches = [batch.to(device) for batch in grid_crops(train_photos, args.resolution).split(args.eval_batch_size)]
    results = evaluate(model, batches, show_progress=False)
    used = code_usage_counts(model, batches) > 0
    idle_on_held_out = held_out_counts == 0
    return {
        "held_in_psnr": results["psnr"],
        "held_in_utilization": float(used.float().mean()),
        "held_in_perplexity": results["perplexity"],
        "idle_on_held_out": int(idle_on_held_out.sum()),
        "idle_on_held_out_used_held_in": int((used & idle_on_held_out).sum()),
    }


def held_in_table(results: dict[str, dict]) -> list[str]:
    rows = [
        [rule, f"{r['held_in_psnr']:.2f}", f"{r['held_in_utilization']:.1%}", f"{r['held_in_perplexity']:.0f}",
         f"{r['idle_on_held_out_used_held_in']} of {r['idle_on_held_out']}"]
        for rule, r in results.items()
    ]  # fmt: skip
    headers = ["quantizer", "PSNR (dB)", "codes used", "perplexity", "codes idle on held-out that these crops use"]
    return [
        "Held-in (`--held-in`: every non-overlapping crop of the training photos, which the models trained on):",
        "",
        markdown_table(headers, rows),
        "",
    ]


def uniform_usage_ceiling(num_tokens: int, codebook_size: int) -> float:
    """Expected share of codes used by `num_tokens` draws from a perfectly uniform code distribution."""
    return 1.0 - (1.0 - 1.0 / codebook_size) ** num_tokens


def targets(results: dict[str, dict], usage_target: float) -> list[str]:
    """Issue 10's targets for one seed: usage, perplexity against `vqtorch`, PSNR against the best baseline."""
    lines = []
    if "cdb" in results:
        used = results["cdb"]["utilization"]
        lines.append(f"- `cdb` uses >= {usage_target:.0%} of the codes on held-out: {used:.1%} -> {'met' if used >= usage_target else 'MISSED'}")
    if "cdb" in results and "vqtorch" in results:
        ours, theirs = results["cdb"]["perplexity"], results["vqtorch"]["perplexity"]
        lines.append(f"- `cdb` perplexity >= `vqtorch`'s: {ours:.0f} vs {theirs:.0f} -> {'met' if ours >= theirs else 'MISSED'}")
    baselines = {r: v for r, v in results.items() if r != "cdb"}
    if "cdb" in results and baselines:
        best = max(baselines, key=lambda r: baselines[r]["psnr"])
        gap = results["cdb"]["psnr"] - baselines[best]["psnr"]
        missing = [rule for rule in ("nearest", "vqtorch") if rule not in results]
        # Judged against every baseline or not at all: a "met" against a subset said nothing about the target.
        verdict = ("met" if gap >= 0.3 else "MISSED") if not missing else f"no verdict: {', '.join(missing)} not in this run"
        lines.append(
            f"- `cdb` held-out PSNR >= best baseline + 0.3 dB (`{best}`, {baselines[best]['psnr']:.2f} dB): "
            f"{results['cdb']['psnr']:.2f} dB ({gap:+.2f} dB) -> {verdict}"
        )
    return lines


def codebook_updates(args: argparse.Namespace) -> str:
    """How each rule of the run learns its codebook, read from the configs it ran with."""
    updates = []
    for rule in args.rules:
        if rule == "vqtorch":
            updates.append(f"`vqtorch` the library's EMA (decay {args.vq_decay})")
        else:
            decay = small_config(args, rule).ema_decay
            updates.append(f"`{rule}` " + ("gradient (ema_decay None)" if decay is None else f"EMA (decay {decay})"))
    return "Codebook updates: " + ", ".join(updates) + "."


def dead_code_upkeep(args: argparse.Namespace) -> str:
    """The dead-code restarts of the run: one threshold for all rules, but each keeps its own running usage."""
    if not args.dead_code_restarts:
        return "Dead-code restarts: off for all."
    config = small_config(args, "cdb")
    text = (
        f"Dead-code restarts: the same threshold for all, not the same rule: a code is dead when its running share of "
        f"tokens is below dead_code_threshold / K = {config.dead_code_threshold} / {config.codebook_size}. Ours "
        f"(`restart_dead_codes` after each step) keeps that share with usage_decay {config.usage_decay} "
        f"({remembered_steps(config.usage_decay)}) and sets a restarted code's usage to twice the threshold"
    )
    if "vqtorch" in args.rules:
        text += (
            f"; `VectorQuantize` (inside its forward) keeps tokens per batch with its EMA decay {args.vq_decay} "
            f"({remembered_steps(args.vq_decay)}) against threshold_ema_dead_code "
            f"{vqtorch_threshold(args, config):.3g} tokens, and sets a replaced code's count to the threshold itself"
        )
    return text + "."


def remembered_steps(decay: float) -> str:
    """How many steps a running average of this decay is about a mean over."""
    return f"~{1 / (1 - decay):.0f} steps" if decay < 1 else "never forgets"


def report(
    args: argparse.Namespace, results: dict[str, dict], plot_name: str, num_held_out: int, minutes: float, load: str
) -> str:
    verdicts = targets(results, args.usage_target)  # none without `cdb`: then no "Targets:" heading either
    rows = [
        [
            rule, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['utilization']:.1%}", f"{r['perplexity']:.0f}",
            f"{r['nearest_agreement']:.1%}", f"{r['relative_error']:.3f}", f"{r['train_utilization']:.1%}",
            f"{r['train_loss']:.4f}", r["restarted_codes"], f"{r['seconds_per_step']:.3f}",
        ]
        for rule, r in results.items()
    ]  # fmt: skip
    window = f"last {min(TRAIN_WINDOW, args.steps)}"  # a run shorter than the window averages all its steps
    headers = ["quantizer", "PSNR (dB)", "SSIM", "codes used", "perplexity", "on nearest code", "quantization error",
               f"codes used (train, {window})",
               f"train L1+L2 ({window})", "codes restarted", "s / step"]  # fmt: skip
    config = small_config(args, "cdb")
    num_tokens = num_held_out * (args.resolution // config.downsampling_factor) ** 2
    overrides = ""
    if args.overrides:
        overrides = f" Config overrides (`--set`, {OVERRIDES_REACH}): `{json.dumps(args.overrides)}`."
    return "\n".join(
        [
            "# Quality benchmark: assignment rules on real photos",
            "",
            f"Command: `{command_line()}` ({minutes:.1f} min in all)",
            "",
            f"Measured on: {environment_summary(args.device)}.",
            "",
            load,
            "",
            f"Setup: `CDBVQModel` with base_channels {config.base_channels}, channel_multipliers {config.channel_multipliers}, "
            f"1 res block per level, latent_dim {config.latent_dim}, K = {config.codebook_size}, codebook_dim "
            f"{config.codebook_dim}; {args.steps} steps of batch {args.batch_size} random {args.resolution}x{args.resolution} "
            f"crops of the scikit-image photos, AdamW lr {args.learning_rate}, seed {args.seed}, loss L1 + L2 + vq_loss; "
            f"the same backbone weights at step 0 for every quantizer. Held-out: {num_held_out} non-overlapping "
            f"{args.resolution}x{args.resolution} crops of scikit-learn's two photos "
            f"({num_tokens:,} tokens; a perfectly uniform assignment would use "
            f"{uniform_usage_ceiling(num_tokens, config.codebook_size):.1%} of the {config.codebook_size:,} codes). "
            f"{codebook_updates(args)} Every rule starts from k-means of the first batch's latents. "
            f"{dead_code_upkeep(args)} `codes restarted` counts the codes each rule restarted over the run "
            "(`VectorQuantize`'s own replacements for `vqtorch`)."
            " No CLIP teacher (no weights offline): `cdb`'s semantic head gets no gradient (the router reads its"
            " features detached). What `cdb` alone trains: its router's query and per-code keys, by gradient, and its"
            " soft assignment over the candidates sends a reconstruction gradient into the encoder besides the"
            " straight-through one (its codes are EMA-updated, so none reaches them)."
            + overrides,
            "",
            markdown_table(headers, rows),
            "",
            (
                "PSNR, SSIM, codes used, perplexity, `on nearest code` (share of tokens whose code is the latent's "
                "nearest code) and `quantization error` (mean squared latent-to-code distance over the latents' "
                "variance) are on the held-out crops, at inference (one argmax for `cdb`, nearest code for `sinkhorn`)."
            ),
            "",
            f"![held-out code usage]({plot_name})",
            "",
            *(held_in_table(results) if args.held_in else []),
            *(["Targets:", *verdicts, ""] if verdicts else []),
        ]
    )


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set takes FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key not in field_names():  # the config keeps unknown keys: the run would be the default, reported as changed
            raise SystemExit(f"--set {key}: not a CDBVQConfig field (see `CDBVQConfig` for the fields).")
        python_constants = {"None": None, "True": True, "False": False}
        try:
            # JSON values (numbers, lists, null, true); Python's None / True / False too, e.g. --set ema_decay=None.
            overrides[key] = python_constants[value] if value in python_constants else json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=64, help="Crop size for training and evaluation.")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--channel-multipliers", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--codebook-dim", type=int, default=16)
    parser.add_argument("--vq-decay", type=float, default=0.8, help="EMA decay of VectorQuantize (its default).")
    parser.add_argument("--no-dead-code-restarts", dest="dead_code_restarts", action="store_false")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="A CDBVQConfig field, e.g. --set balance_weight=0.5 (repeatable); it reaches "
                        f"{OVERRIDES_REACH}. Not `assignment` (choose the rules with --rules).")  # fmt: skip
    parser.add_argument("--eval-batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="Where to train and evaluate (e.g. cuda): the same protocol, but other numerics than the "
                             "CPU's, so compare rules run on the same device only.")  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on a shared 2-core machine more threads ran 2-10x slower.",
    )
    parser.add_argument("--held-in", action="store_true",
                        help="Also measure on the training photos, and which codes idle on held-out they use.")  # fmt: skip
    parser.add_argument("--usage-target", type=float, default=0.98, help="Held-out code usage `cdb` must reach.")
    parser.add_argument("--output", default=None,
                        help="Report name under benchmarks/results/ (default: quality_seed{SEED}.md, with the "
                        "rules in the name when not all run); the usage plot goes beside it as STEM_usage.png.")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}.")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here.")
    args.overrides = parse_overrides(args.overrides)
    if "assignment" in args.overrides:
        parser.error("--set assignment=... would set every rule's assignment (each row would no longer be its rule): "
                     "choose the rules with --rules.")  # fmt: skip
    distinct(parser, "--rules", args.rules)
    try:  # a model flag the config refuses: one line now, not a traceback after the first rule
        small_config(args, "cdb")
    except ValueError as error:
        parser.error(str(error))
    if args.output is None:
        rules = "" if set(args.rules) == set(RULES) else "_" + "_".join(args.rules)
        args.output = f"quality{rules}_seed{args.seed}.md"
    if "vqtorch" in args.rules:
        require("vector_quantize_pytorch", "the `vqtorch` rule", "leave vqtorch out of --rules")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = load_line()
    start = time.perf_counter()
    train_photos = photo_tensors("skimage")
    held_out = grid_crops(photo_tensors("sklearn"), args.resolution)
    backbone = reference_backbone(args)
    results = {}
    for rule in args.rules:
        results[rule] = train_and_evaluate(args, rule, backbone, train_photos, held_out)
        summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in results[rule].items() if k != "counts"}
        tqdm.write(json.dumps(summary))
    stem = str(Path(args.output).with_suffix(""))
    plot = save_usage_plot(
        {rule: r["counts"] for rule, r in results.items()},
        RESULTS_DIR / f"{stem}_usage.png",
        title=f"held-out code usage, K = {args.codebook_size}, {args.steps} steps",
    )
    minutes = (time.perf_counter() - start) / 60
    text = report(args, results, plot.name, held_out.shape[0], minutes, load_summary(load_before))
    path = write_report(args.output, text)
    print(text)
    print(f"wrote {path} and {plot}")


if __name__ == "__main__":
    main()
