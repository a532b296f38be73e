"""The training step of a cdb-vq tokenizer, shared by `training/train.py` and the benchmarks.

`training_step` runs one batch: the forward pass and full loss (`compute_losses`), the backward pass and, at the end
of an accumulation window, the clipped optimiser step, with the NaN guard: a window in which a term (or the gradient
norm) is NaN or infinite on any process changes no weights and rolls the quantizer's codebook and statistics back to
where the window started. `restart_dead_codes` is the codebook upkeep a loop calls after a good step. The benchmarks
call these too, so they measure what users train.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..modeling_cdb_vq import CDBVQModel, flatten_grid
from .losses import TokenizerLoss, compute_losses, first_nonfinite


@dataclass
class TrainingParts:
    """What one training step works with.

    Args:
        accelerator: The run's `Accelerator` (a plain `Accelerator(cpu=True)` for a single CPU process).
        model: The tokenizer as prepared by `accelerator.prepare`.
        optimizer: Its optimiser, prepared too.
        loss_module: The pixel-space losses (the quantizer and semantic terms come with the model's output).
        unwrapped: The plain `CDBVQModel`; default `accelerator.unwrap_model(model)`.
        scheduler: The learning-rate schedule, stepped once per optimiser step; None for a constant rate.
        discriminator, plain_discriminator, disc_optimizer, disc_scheduler: The PatchGAN discriminator (prepared
            and plain) and its optimiser and schedule, when `loss_module.disc_weight > 0`.
        teacher: The CLIP teacher whose patch features drive the semantic terms, or None.
        grid_size: The token grid (h, w); needed with a teacher.
        max_grad_norm: Clip the gradient norm to this (0: no clipping, no check of the norm).
        window_snapshot: The quantizer's state at the start of the current accumulation window (set and cleared by
            `training_step`), which a skipped window is rolled back to.
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_module: TokenizerLoss
    unwrapped: CDBVQModel | None = None
    scheduler: object | None = None
    discriminator: nn.Module | None = None
    plain_discriminator: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scheduler: object | None = None
    teacher: object | None = None
    grid_size: tuple[int, int] | None = None
    max_grad_norm: float = 0.0
    window_snapshot: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.unwrapped is None:
            self.unwrapped = self.accelerator.unwrap_model(self.model)
        if self.discriminator is not None and self.plain_discriminator is None:
            self.plain_discriminator = self.accelerator.unwrap_model(self.discriminator)


def training_step(
    parts: TrainingParts,
    pixel_values: torch.Tensor,
    step: int,
    bad_term: str | None = None,
    inputs: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], str | None, object]:
    """Forward, backward and (at the end of an accumulation window) the optimiser step for one batch.

    Args:
        parts: The model, optimisers, loss and teacher.
        pixel_values: The images (B, 3, H, W) in [-1, 1] the reconstruction should match.
        step: The optimisation step (the adversarial terms start at `loss_module.disc_start`).
        bad_term: The non-finite term an earlier micro-batch of this accumulation window found, if any.
        inputs: What the encoder sees when it is not `pixel_values` (restoration: their degraded versions).

    Returns:
        The batch's loss terms; the name of a term that was NaN/infinite on any process in this window, or "gradient
        norm" (the window's update is then skipped and, at its end, the quantizer rolled back to its start) or None;
        and the model output.
    """
    accelerator, loss_module = parts.accelerator, parts.loss_module
    pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
    target = {}
    if inputs is not None:  # restoration: the encoder sees the degraded image, the loss targets the clean one
        inputs, target = inputs.to(accelerator.device, non_blocking=True), {"target_pixel_values": pixel_values}
    if parts.window_snapshot is None:  # the first batch of an accumulation window
        parts.window_snapshot = parts.unwrapped.quantizer.snapshot()
    adversarial = parts.discriminator is not None and loss_module.adversarial_active(step)
    with accelerator.accumulate(*[m for m in (parts.model, parts.discriminator) if m is not None]):
        with accelerator.autocast():
            losses = compute_losses(parts.model, pixel_values if inputs is None else inputs, loss_module, parts.teacher,
                                    step, parts.plain_discriminator, parts.unwrapped.decoder.conv_out.weight,
                                    parts.grid_size, **target)  # fmt: skip
            terms, disc_loss = dict(losses.terms), None
            if adversarial:
                disc_loss, disc_terms = loss_module.discriminator_loss(parts.discriminator, pixel_values, losses.model_output.reconstruction)
                terms.update(disc_terms)
        bad_term = bad_term or _nonfinite_anywhere(terms, accelerator)
        # Backward even when a term is not finite, so that every process takes part in the same collectives;
        # the window's gradients are dropped below.
        accelerator.backward(losses.total)
        if disc_loss is not None:
            accelerator.backward(disc_loss)
        if accelerator.sync_gradients:
            bad_term = bad_term or _apply_gradients(parts, adversarial)
            if bad_term:  # every batch of the window updated the codebook and statistics (EMA, usage, potentials)
                parts.unwrapped.quantizer.restore(parts.window_snapshot)
            parts.window_snapshot = None
            if parts.scheduler is not None:
                parts.scheduler.step()
            if adversarial and parts.disc_scheduler is not None:
                parts.disc_scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
            if parts.disc_optimizer is not None:
                parts.disc_optimizer.zero_grad(set_to_none=True)
    return terms, bad_term, losses.model_output


def restart_dead_codes(model: CDBVQModel, output, seed: int, ema=None) -> int:
    """Restart the dead codes of `model.quantizer` from a batch's model output (its latents (B, D, h, w), and with
    code roles its signal features, so that a code restarts on a latent of its role's kind); returns how many.

    Every process calls it (the quantizer gathers the latents and broadcasts the new codes). With a weight EMA
    (`runs.EMAWeights`), the EMA copies of the restarted codes jump to them too.
    """
    dead = model.quantizer.dead_codes() if ema is not None else None
    signal_features = output.signal_features
    restarted = model.quantizer.restart_dead_codes(
        flatten_grid(output.latents.detach()).float(),
        seed=seed,
        signal_features=flatten_grid(signal_features) if signal_features is not None else None,
    )
    if restarted and ema is not None:
        # Only the codes restarted now (at most one per latent; the others stay dead until the next call), and every
        # per-code parameter a restart rewrites (a gradient codebook's rows, the router keys they inherit).
        still_dead = model.quantizer.dead_codes()
        for name in ("quantizer.codebook.weight", "quantizer.router.code_keys"):
            ema.copy_rows(model, name, dead[~torch.isin(dead, still_dead)])
    return restarted


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of `parts` (a run's seed and the indices of what it seeds): any seed or index
    stays within a generator's 64 bits, and no two index tuples share a seed.

    `derived_seed(seed, step, micro_batch, process_index)` seeds what is drawn for one micro-batch (its
    degradations; a prior's label dropout): a function of the step, not of the global random state, which data
    loaders draw from ahead of the step, so a resumed run draws exactly as an uninterrupted one."""
    key = "/".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _nonfinite_anywhere(terms: dict[str, torch.Tensor], accelerator: Accelerator) -> str | None:
    """The first non-finite term on any process (every process gets the same answer)."""
    name = first_nonfinite(terms)
    if accelerator.num_processes == 1:
        return name
    flag = accelerator.reduce(torch.tensor([float(name is not None)], device=accelerator.device), reduction="sum")
    if not bool(flag.item()):
        return None
    names = [found for found in gather_object([name]) if found is not None]
    return names[0]


def _apply_gradients(parts: TrainingParts, adversarial: bool) -> str | None:
    """Clip and apply the accumulated gradients; returns "gradient norm" (and skips) when it is not finite."""
    accelerator = parts.accelerator
    if parts.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(parts.model.parameters(), parts.max_grad_norm)
        # A gradient scaler (fp16) skips overflowing steps itself (and must see every step to lower its scale).
        if accelerator.scaler is None and not bool(torch.isfinite(torch.as_tensor(grad_norm))):
            return "gradient norm"
        if adversarial:
            accelerator.clip_grad_norm_(parts.discriminator.parameters(), parts.max_grad_norm)
    parts.optimizer.step()
    if adversarial:
        parts.disc_optimizer.step()
    return None


__all__ = ["TrainingParts", "derived_seed", "restart_dead_codes", "training_step"]
