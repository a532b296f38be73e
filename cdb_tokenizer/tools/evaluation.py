"""Evaluation of a tokenizer: reconstruction quality (PSNR, SSIM, LPIPS, rFID), codebook usage, and the pictures
people look at.

Training-only (torchmetrics, matplotlib, torch-fidelity): never imported by the modeling files.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import PreTrainedModel
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm

from ..quantization_cdb_vq import usage_statistics as quantizer_usage_statistics
from .downloads import reachable
from .files import replace_file
from .messages import TRAIN_EXTRAS, first_line
from .scores import psnr_from_mse


logger = logging.getLogger(__name__)

# The Inception-v3 weights torchmetrics' FrechetInceptionDistance uses (through torch-fidelity): the TensorFlow FID
# network (2015-12-05) ported to PyTorch, the one every published FID is computed with.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def usage_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Utilization (share of codes used at least once) and perplexity exp(H) of a code histogram, computed in double
    by the quantizer's own rule."""
    utilization, perplexity = quantizer_usage_statistics(counts.double())
    return {"utilization": float(utilization), "perplexity": float(perplexity)}


def to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> [0, 1], clamped."""
    return ((pixel_values.float() + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# rFID
# ----------------------------------------------------------------------------------------------------------------


class FIDUnavailableError(RuntimeError):
    """The Inception network of FID cannot be built here (torch-fidelity missing, or its weights not at hand)."""


def inception_weights_file() -> str:
    """Where torch hub caches the FID Inception weights (`$TORCH_HOME/hub/checkpoints/weights-inception-...pth`)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(INCEPTION_WEIGHTS_URL).path))


def inception_weights(weights_path: str | None = None, allow_download: bool = True) -> str:
    """The path of the FID Inception weights: `weights_path`, else the torch hub cache, else downloaded into the
    cache when the host answers a 3-second connection check. Raises `FIDUnavailableError` (one line) otherwise, so
    nothing ever waits on a download that cannot happen. The file is not read here: `inception_state_dict` is the
    one safe way to read it."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FIDUnavailableError(f"the FID Inception weights file {weights_path!r} does not exist.")
        return weights_path
    path = inception_weights_file()
    if os.path.isfile(path):
        return path
    if not allow_download or not reachable(INCEPTION_WEIGHTS_URL):
        raise FIDUnavailableError(
            f"the FID Inception weights are not in the torch hub cache ({path}) and cannot be downloaded now "
            f"({INCEPTION_WEIGHTS_URL}); download them once into $TORCH_HOME/hub/checkpoints to get rFID."
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    logger.info(f"Downloading the FID Inception weights to {path}.")
    torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, path, progress=False)
    return path


def inception_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The Inception weights in `path`, read once and as tensors only (a pickled object in the file is refused,
    never run). Raises `FIDUnavailableError` naming the file otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for anything but tensors, others for damaged files
        raise FIDUnavailableError(f"the FID Inception weights {path} cannot be read as tensors only: {first_line(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise FIDUnavailableError(f"the FID Inception weights {path} are not a state dict of tensors.")
    return state


class RandomFeatureExtractor(nn.Module):
    """A small, randomly initialised convolutional feature extractor for FID *smoke tests*.

    Maps [0, 1] float images of any size (B, 3, H, W) to (B, `num_features`) features (globally pooled). The same
    `seed` gives the same network. Distances it gives are not comparable with Inception FIDs: use it to run the
    whole rFID path offline (tests, the demo), never to report a number against the literature.
    """

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        self.num_features = num_features
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, num_features, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():  # He-normal weights keep the activations O(1); zero biases
                std = (2.0 / parameter[0].numel()) ** 0.5 if parameter.dim() > 1 else 0.0
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RandomFeatureExtractor:
        return super().train(False)  # like torchmetrics' Inception: never leaves eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images.float() * 2 - 1)


def fid_metric(
    feature_extractor: nn.Module | None = None,
    weights_path: str | None = None,
    allow_download: bool = True,
    device: torch.device | str | None = None,
):
    """A torchmetrics `FrechetInceptionDistance` taking [0, 1] float images (`normalize=True`).

    With no `feature_extractor` it is the standard one: torch-fidelity's port of the TensorFlow Inception-v3 and
    its 2,048-d pool features (images resized to 299 inside), weights from `inception_weights` (never a silent
    download that can hang). A `feature_extractor` module (taking [0, 1] images, returning (B, F) features) replaces
    it, e.g. `RandomFeatureExtractor()` to run the path offline. Raises `FIDUnavailableError` with a one-line reason
    when the Inception network cannot be built.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    kwargs = {"normalize": True, "reset_real_features": True, "sync_on_compute": False}
    if feature_extractor is not None:
        metric = FrechetInceptionDistance(feature=feature_extractor, **kwargs)
    else:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise FIDUnavailableError(
                f"rFID needs torch-fidelity for torchmetrics' Inception network: {TRAIN_EXTRAS} (or pip install "
                f"torch-fidelity)."
            ) from None
        state = inception_state_dict(inception_weights(weights_path, allow_download))
        # torch-fidelity loads its weights with weights_only=False. It gets the tensors read above, saved again
        # into memory, never the file: a file swapped after the check cannot reach its unpickler.
        checked = io.BytesIO()
        torch.save(state, checked)
        checked.seek(0)
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=checked, **kwargs)
    return metric.to(device) if device is not None else metric


def optional_fid_metric(weights_path: str | None = None, device=None, feature_extractor: nn.Module | None = None):
    """`fid_metric(...)`, or `None` after one logged line saying why rFID is left out."""
    try:
        return fid_metric(feature_extractor, weights_path, device=device)
    except FIDUnavailableError as error:
        logger.warning(f"rFID left out: {error}")
        return None


FID_REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def save_fid_reference(metric, path: str | Path, description: str = "", **facts: str) -> Path:
    """Save the reference (real-image) statistics a `FrechetInceptionDistance` has accumulated, to reuse them, with
    `facts` (strings: resolution, feature extractor, ...) that a reuse is checked against."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(metric, name).detach().cpu().contiguous() for name in FID_REFERENCE_STATES}
    # Written aside, then renamed: the file is reused whenever it exists, so it must never be half written.
    metadata = {"description": description, **facts}
    return replace_file(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_fid_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """Reference statistics written by `save_fid_reference` (pass them to `evaluate(fid_reference=...)`)."""
    from safetensors.torch import load_file

    reference = load_file(str(path))
    check_fid_reference(reference)
    return reference


def fid_reference_facts(path: str | Path) -> dict[str, str]:
    """The metadata `save_fid_reference` wrote beside the statistics (description and facts)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _set_fid_reference(metric, reference: dict[str, torch.Tensor]) -> None:
    check_fid_reference(reference)
    for name in FID_REFERENCE_STATES:
        current = getattr(metric, name)
        if name not in reference or reference[name].shape != current.shape:
            raise ValueError(
                f"the FID reference statistics do not fit this feature extractor ({name}: expected shape "
                f"{tuple(current.shape)}); were they computed with another one?"
            )
        setattr(metric, name, reference[name].to(device=current.device, dtype=current.dtype))


def check_fid_reference(reference: dict[str, torch.Tensor]) -> None:
    """Refuse reference statistics that would give a wrong rFID without a word: sums stored as integers (cast, they
    give another number), non-finite values (an rFID of nan), or fewer than two images (no covariance). A reference
    file is reused and shared, like a token file."""
    for name in FID_REFERENCE_STATES:
        if name not in reference:
            raise ValueError(f"the FID reference statistics have no {name}; were they written by save_fid_reference?")
        value = reference[name]
        if name != "real_features_num_samples" and not value.is_floating_point():
            raise ValueError(f"the FID reference statistics store {name} as {value.dtype}, not floating point.")
        if not torch.isfinite(value.double()).all():
            raise ValueError(f"the FID reference statistics hold non-finite values in {name}; compute them again.")
    if reference["real_features_num_samples"].numel() != 1 or int(reference["real_features_num_samples"]) < 2:
        raise ValueError("the FID reference statistics come from fewer than 2 images; a covariance needs more.")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block (inference assignment; the codebook's training statistics are left alone), then the
    mode the model was in. The block also runs the model's own `forward`: with mixed precision, accelerate wraps it
    in autocast (and `unwrap_model` keeps the wrapper), so validation would score other tokens than `cdb-vq eval`."""
    was_training = model.training
    wrapped, own = model.__dict__.get("forward"), model.__dict__.get("_original_forward")  # set by accelerate
    model.eval()
    if wrapped is not None and own is not None:
        model.forward = own
    try:
        yield model
    finally:
        model.train(was_training)
        if wrapped is not None and own is not None:
            model.forward = wrapped


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable,
    max_batches: int | None = None,
    lpips=None,
    show_progress: bool = True,
    fid=None,
    fid_reference: dict[str, torch.Tensor] | None = None,
    total_images: int | None = None,
) -> dict[str, float]:
    """Reconstruction and usage metrics of `model` over `batches` of pixel values in [-1, 1].

    `batches` yields tensors (B, 3, H, W) or dicts with `pixel_values`. Returns PSNR and SSIM (data range [0, 1]),
    LPIPS when an `lpips` callable (taking two [-1, 1] batches) is given, rFID (`rfid`) when a `fid` metric (from
    `fid_metric`) is given, and the utilization and perplexity of the code histogram over the whole set (not
    averaged per batch). rFID compares the reconstructions with the very images the model was given (the same
    resize and crop), unless `fid_reference` (from `load_fid_reference`) supplies the reference statistics. The
    model runs in eval mode (`eval_mode`). The progress bar counts images, out of `total_images` when given.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # No cross-process sync: under DDP a caller may evaluate on the main process alone.
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long, device=device)
    lpips_total, num_images = 0.0, 0
    if fid is not None:
        fid.reset()
        if fid_reference is not None:
            _set_fid_reference(fid, fid_reference)
    progress = tqdm(total=total_images, desc="evaluating", unit="image", disable=not show_progress, leave=False)
    with eval_mode(model), progress:
        for batch in first_batches(batches, max_batches):
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            pixel_values = pixel_values.to(device=device, dtype=dtype)
            # Any tokenizer whose forward gives `image_tokens` and `reconstruction`; ours asked for its output
            # object, whatever its saved config.return_dict says.
            output = model(pixel_values, return_dict=True) if isinstance(model, PreTrainedModel) else model(pixel_values)
            counts += torch.bincount(output.image_tokens.flatten(), minlength=counts.numel())
            original, reconstruction = to_unit_range(pixel_values), to_unit_range(output.reconstruction)
            psnr.update(reconstruction, original)
            ssim.update(reconstruction, original)
            if lpips is not None:
                # Clamped like the images PSNR and SSIM score (decoders overshoot [-1, 1] a little).
                lpips_total += float(lpips(output.reconstruction.float().clamp(-1, 1), pixel_values.float()).sum())
            if fid is not None:
                if fid_reference is None:
                    fid.update(original, real=True)
                fid.update(reconstruction, real=False)
            num_images += pixel_values.shape[0]
            progress.update(pixel_values.shape[0])
    if num_images == 0:
        raise ValueError("evaluate got no images: the evaluation data is empty.")
    metrics = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), **usage_statistics(counts.cpu())}
    if lpips is not None:
        metrics["lpips"] = lpips_total / num_images
    if fid is not None:
        if num_images < 2:
            raise ValueError("rFID needs at least two images.")
        features = fid.fake_features_sum.numel()
        if num_images <= features:  # a rank-deficient covariance: the number is dominated by the sample size
            logger.warning(
                "rFID of %d images with %d-dimensional features: with no more images than feature dimensions the "
                "covariances are rank-deficient and the rFID is far above its large-sample value (use it to track a "
                "run, never to compare with published numbers).", num_images, features,
            )  # fmt: skip
        metrics["rfid"] = float(fid.compute())
    metrics["num_images"] = num_images
    return metrics


def check_image_size(height: int, width: int, name: str = "the image size") -> None:
    """Raise a ValueError naming the reason when `evaluate` could not score images of this size (SSIM's window).

    Runs the metrics `evaluate` uses on a blank pair of that size (a side above 64 pixels stands in for any larger
    one: only short sides fail, and a blank 100,000-pixel square took 120 GB), so it follows torchmetrics' limits.
    """
    images = torch.zeros(1, 3, min(height, 64), min(width, 64))
    try:
        StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False)(images, images)
        PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False)(images, images)
    except Exception as error:  # noqa: BLE001 - torchmetrics raises ValueError or RuntimeError from conv2d/pad
        raise ValueError(
            f"{name} {height}x{width} is too small for validation: SSIM's Gaussian window (11x11, padded by 5) "
            f"does not fit "
            f"({first_line(error)}); use a larger size."
        ) from None


def first_batches(batches: Iterable, max_batches: int | None) -> Iterable:
    """The first `max_batches` of `batches` (all with None), without drawing one more from the loader."""
    return batches if max_batches is None else itertools.islice(batches, max_batches)


def code_usage_counts(model, batches: Iterable, max_batches: int | None = None) -> torch.Tensor:
    """How often each code is chosen over `batches` (K,), at inference."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    with eval_mode(model):
        for batch in first_batches(batches, max_batches):
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            tokens = model.get_image_tokens(pixel_values.to(device=device, dtype=dtype))
            counts += torch.bincount(tokens.flatten().cpu(), minlength=counts.numel())
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


def psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    """PSNR (dB, [0, 1] scale) of [-1, 1] images (clamped) against their targets, the squared error pooled over
    every pixel given: what `evaluate` and torchmetrics compute for a set (a mean of per-image PSNRs would be
    dominated by flat images), or one image's PSNR for one pair."""
    return psnr_from_mse(float(((to_unit_range(images).double() - to_unit_range(targets).double()) ** 2).mean()))


def detail_box(image: torch.Tensor, size: int) -> tuple[int, int]:
    """(top, left) of the `size` x `size` window of a (3, H, W) image with the most fine detail (gradient energy)."""
    grey = image.float().mean(0, keepdim=True)
    energy = (grey[:, 1:, :-1] - grey[:, :-1, :-1]).abs() + (grey[:, :-1, 1:] - grey[:, :-1, :-1]).abs()
    size = min(size, energy.shape[-2], energy.shape[-1])
    stride = max(1, size // 4)
    windows = torch.nn.functional.avg_pool2d(energy[None], size, stride=stride)[0, 0]
    row, column = divmod(int(windows.flatten().argmax()), windows.shape[1])
    return row * stride, column * stride


def reconstruction_figure(
    originals: list[torch.Tensor],
    reconstructions: list[torch.Tensor],
    zoom_size: int = 64,
    zoom_factor: int = 4,
    caption: str | None = None,
    degraded: list[torch.Tensor] | None = None,
):
    """The picture people judge a tokenizer by, as a PIL image.

    One row per image: the original (left) beside its reconstruction (right) at full size, captioned with the
    reconstruction's PSNR; then a row with a zoomed detail of the first image (the `zoom_size` window with the most
    fine detail, outlined in red above), original beside reconstruction, magnified `zoom_factor` times (nearest).
    Images are (3, H, W) tensors in [-1, 1]; rows may have different sizes. For a restoration model, `degraded` (the
    inputs its `reconstructions` were made from) adds them as the first column, each with its own PSNR against the
    original: degraded input | restored | original.
    """
    from PIL import Image, ImageDraw

    def to_pil(image: torch.Tensor) -> Image.Image:
        array = (to_unit_range(image) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    gap, text_height = 6, 14
    top, left = detail_box(to_unit_range(originals[0]), zoom_size)
    size = min(zoom_size, originals[0].shape[-2], originals[0].shape[-1])
    if degraded is None:
        columns = [(originals, "original"), (reconstructions, "reconstruction")]
    else:
        columns = [(degraded, "degraded input"), (reconstructions, "restored"), (originals, "original")]
    rows = []
    for index, original in enumerate(originals):
        tiles, labels = [], []
        for images, name in columns:
            tiles.append(to_pil(images[index]))
            labels.append(name if images is originals else f"{name}, PSNR {psnr(images[index], original):.1f} dB")
        if index == 0:
            for tile in tiles:
                box = [left, top, left + size - 1, top + size - 1]
                ImageDraw.Draw(tile).rectangle(box, outline=(255, 0, 0), width=2)
        rows.append((tiles, labels))
    crop = (slice(None), slice(top, top + size), slice(left, left + size))
    zoomed = [to_pil(images[0][crop]).resize((size * zoom_factor, size * zoom_factor), Image.NEAREST)
              for images, _ in columns]  # fmt: skip
    rows.append((zoomed, [f"{name}, detail x{zoom_factor}" for _, name in columns]))

    header = text_height + gap if caption else 0
    width = max(sum(tile.width for tile in tiles) + (len(tiles) + 1) * gap for tiles, _ in rows)
    height = header + sum(max(tile.height for tile in tiles) + text_height + gap for tiles, _ in rows) + gap
    figure = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    if caption:
        draw.text((gap, gap), caption, fill=(0, 0, 0))
    y = header + gap
    for tiles, labels in rows:
        x = gap
        for tile, label in zip(tiles, labels):
            draw.text((x, y), label, fill=(0, 0, 0))
            figure.paste(tile, (x, y + text_height))
            x += tile.width + gap
        y += max(tile.height for tile in tiles) + text_height + gap
    return figure


def save_reconstruction_figure(
    originals: list[torch.Tensor], reconstructions: list[torch.Tensor], path: str | Path, **kwargs
) -> Path:
    """Write `reconstruction_figure(originals, reconstructions, **kwargs)` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = reconstruction_figure(originals, reconstructions, **kwargs)
    return replace_file(path, lambda temporary: figure.save(temporary))  # the format of the suffix


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

    from .roles import role_colours

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
        ranges = sorted(code_roles.items(), key=lambda item: item[1][0])  # the role order of config.role_names
        for (name, (start, end)), (_, colour) in zip(ranges, role_colours([name for name, _ in ranges])):
            raw_axis.axvspan(start, end, alpha=0.15, color=colour, label=name)  # the colours of the role maps
        raw_axis.set_xlabel("code id")
        raw_axis.set_ylabel("tokens")
        raw_axis.set_title("usage by role")
        raw_axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return replace_file(path, lambda temporary: figure.savefig(temporary, dpi=100))
    finally:
        plt.close(figure)
