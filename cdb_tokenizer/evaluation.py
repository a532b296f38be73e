"""Evaluation of a tokenizer: reconstruction quality, codebook usage, and the pictures people look at.

Training-only (torchmetrics, matplotlib): never imported by the modeling files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm


def usage_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Utilization (share of codes used at least once) and perplexity exp(H) of a code histogram."""
    counts = counts.double()
    share = counts / counts.sum().clamp_min(1.0)
    entropy = -(share * share.clamp_min(1e-30).log()).sum()
    return {"utilization": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


def to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> [0, 1], clamped."""
    return ((pixel_values.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable,
    max_batches: int | None = None,
    lpips=None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Reconstruction and usage metrics of `model` over `batches` of pixel values in [-1, 1].

    `batches` yields tensors (B, 3, H, W) or dicts with `pixel_values`. Returns PSNR and SSIM (data range [0, 1]),
    LPIPS when an `lpips` callable (taking two [-1, 1] batches) is given, and the utilization and perplexity of the
    code histogram over the whole set (not averaged per batch). The model is put in eval mode and restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # No cross-process sync: under DDP a caller may evaluate on the main process alone.
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long, device=device)
    lpips_total, num_images = 0.0, 0
    try:
        for step, batch in enumerate(tqdm(batches, desc="evaluating", disable=not show_progress, leave=False)):
            if max_batches is not None and step >= max_batches:
                break
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            pixel_values = pixel_values.to(device=device, dtype=dtype)
            output = model(pixel_values)
            counts += torch.bincount(output.image_tokens.flatten(), minlength=counts.numel())
            original, reconstruction = to_unit_range(pixel_values), to_unit_range(output.reconstruction)
            psnr.update(reconstruction, original)
            ssim.update(reconstruction, original)
            if lpips is not None:
                lpips_total += float(lpips(output.reconstruction.float(), pixel_values.float()).sum())
            num_images += pixel_values.shape[0]
    finally:
        model.train(was_training)
    if num_images == 0:
        raise ValueError("evaluate got no images: the evaluation data is empty.")
    metrics = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), **usage_statistics(counts.cpu())}
    if lpips is not None:
        metrics["lpips"] = lpips_total / num_images
    metrics["num_images"] = num_images
    return metrics


def check_image_size(height: int, width: int, name: str = "the image size") -> None:
    """Raise a ValueError naming the reason when `evaluate` could not score images of this size (SSIM's window).

    Runs the metrics `evaluate` uses on a blank pair of that size, so it follows torchmetrics' own limits.
    """
    images = torch.zeros(1, 3, height, width)
    try:
        StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False)(images, images)
        PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False)(images, images)
    except Exception as error:  # noqa: BLE001 - torchmetrics raises ValueError or RuntimeError from conv2d/pad
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{name} {height}x{width} is too small for validation: SSIM's Gaussian window (11x11, padded by 5) "
            f"does not fit "
            f"({first_line}); use a larger size."
        ) from None


@torch.no_grad()
def code_usage_counts(model, batches: Iterable, max_batches: int | None = None) -> torch.Tensor:
    """How often each code is chosen over `batches` (K,), at inference."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    try:
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            tokens = model.get_image_tokens(pixel_values.to(device=device, dtype=dtype))
            counts += torch.bincount(tokens.flatten().cpu(), minlength=counts.numel())
    finally:
        model.train(was_training)
    return counts


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """A (3, H', W') image in [0, 1]: one row per image, original left and reconstruction right."""
    from torchvision.utils import make_grid

    pairs = torch.stack([to_unit_range(originals.cpu()), to_unit_range(reconstructions.cpu())], dim=1)
    return make_grid(pairs.flatten(0, 1), nrow=2, padding=2, pad_value=1.0)


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """Write originals beside their reconstructions (both (B, 3, H, W) in [-1, 1]) as a PNG."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(reconstruction_grid(originals, reconstructions), path)
    return path


def save_usage_plot(
    counts: torch.Tensor | dict[str, torch.Tensor],
    path: str | Path,
    code_roles: dict[str, list[int]] | None = None,
    title: str | None = None,
) -> Path:
    """Plot code-usage histograms: codes sorted by use (log scale), one curve per entry when given a dict.

    With `code_roles`, role ranges are shaded on a second panel of the raw (unsorted) usage.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = counts if isinstance(counts, dict) else {"usage": counts}
    panels = 2 if code_roles else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    sorted_axis = axes[0][0]
    for name, values in series.items():
        values = values.double().cpu()
        stats = usage_statistics(values)
        share = (values / values.sum().clamp_min(1.0)).sort(descending=True).values
        sorted_axis.plot(share.numpy(), label=f"{name} (used {stats['utilization']:.0%}, ppl {stats['perplexity']:.0f})")
    sorted_axis.set_yscale("log")
    sorted_axis.set_xlabel("code rank")
    sorted_axis.set_ylabel("share of tokens")
    sorted_axis.set_title(title or "codebook usage")
    sorted_axis.legend(fontsize=8)
    if code_roles:
        raw_axis = axes[0][1]
        values = next(iter(series.values())).double().cpu()
        raw_axis.bar(range(values.numel()), values.numpy(), width=1.0, color="black")
        for index, (name, (start, end)) in enumerate(sorted(code_roles.items(), key=lambda item: item[1][0])):
            raw_axis.axvspan(start, end, alpha=0.15, color=f"C{index}", label=name)
        raw_axis.set_xlabel("code id")
        raw_axis.set_ylabel("tokens")
        raw_axis.set_title("usage by role")
        raw_axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
