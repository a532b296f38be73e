"""Image degradations for restoration training (training side: never imported by the four model files).

A degradation spec names one or more degradations with their strengths, applied left to right:

    gaussian_blur:1.5                     Gaussian blur, sigma in pixels
    motion_blur:9                         linear motion blur, length in pixels, direction drawn per image
    noise:0.05                            additive Gaussian noise, std on the [0, 1] pixel scale
    jpeg:30                               JPEG compression at this quality (1-100)
    downscale:2                           downscale by this factor (area), then back up (bicubic)
    gaussian_blur:0.5-2.0+noise:0.02      '+' composes; LOW-HIGH draws the strength per image, uniformly
    gaussian_blur:0.5-2|motion_blur:3-11  '|' separates alternatives: each image gets one, drawn uniformly

A strength of 0 turns a degradation off (the identity), for every name. Everything random (motion direction,
noise, drawn strengths) comes from one `torch.Generator` seeded by the caller, so a spec and a seed always give the
same images. Inputs are (B, C, H, W) float tensors in [-1, 1]; outputs have the same shape, dtype and device, and
are clamped to [-1, 1].
"""

from __future__ import annotations

import io
import math
import numbers
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEGRADATIONS = ("gaussian_blur", "motion_blur", "noise", "jpeg", "downscale")
# Largest strength each degradation accepts (a blur wider than this is almost surely a typo).
MAX_STRENGTH = {"gaussian_blur": 20.0, "motion_blur": 64.0, "noise": 1.0, "jpeg": 100.0, "downscale": 16.0}


@dataclass(frozen=True)
class Degradation:
    """One named degradation with a strength range [low, high] (low == high for a fixed strength)."""

    name: str
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.name}:{_number(self.low)}" + (f"-{_number(self.high)}" if self.high != self.low else "")


def _number(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))  # never a rounded strength


def _parse_number(text: str) -> float:
    """A plain decimal number ("1.5", "1e-3"): `float` alone also takes "1_0" (10), non-ASCII digits and "nan"."""
    if not re.fullmatch(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text, flags=re.ASCII):
        raise ValueError(text)
    return float(text)


def parse_spec(spec: str) -> list[list[Degradation]]:
    """Parse a spec into its '|'-separated alternatives, each a '+'-chain; raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"a degradation spec must be a non-empty string such as 'gaussian_blur:1.5', got {spec!r}."
        )
    chains = _compact(spec).split("|")
    if not all(chains):
        raise ValueError(
            f"empty alternative in {spec!r}: '|' needs a degradation on each side, e.g. 'gaussian_blur:1|noise:0.05'."
        )
    return [parse_degradations(chain, spec) for chain in chains]


def parse_degradations(spec: str, whole: str | None = None) -> list[Degradation]:
    """Parse one chain such as `'gaussian_blur:1.5+noise:0.02'`; raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"a degradation spec must be a non-empty string such as 'gaussian_blur:1.5', got {whole or spec!r}."
        )
    whole = whole or spec
    degradations = []
    for part in _compact(spec).split("+"):
        if not part:
            raise ValueError(
                f"empty part in {whole!r}: '+' needs a degradation on each side, e.g. 'gaussian_blur:1.5+noise:0.02'."
            )
        name, colon, strength = part.partition(":")
        _check_name(name, whole)
        if not colon or not strength:
            raise ValueError(f"degradation {name!r} needs a strength, e.g. '{name}:{_example(name)}' (got {part!r}).")
        # LOW-HIGH: split at a dash right after a digit or a dot, so that exponents (1e-3) stay numbers.
        match = re.fullmatch(r"(?P<low>.*?[\d.])-(?P<high>.+)", strength)
        low_text, dash, high_text = (match["low"], "-", match["high"]) if match else (strength, "", "")
        try:
            low = _parse_number(low_text)
            high = _parse_number(high_text) if dash else low
        except ValueError:
            raise ValueError(
                f"bad strength {strength!r} for {name}: give a number or LOW-HIGH, e.g. '{name}:{_example(name)}'."
            ) from None
        degradations.append(_check_strength(Degradation(name, low, high), strength))
    return degradations


def _compact(spec: str) -> str:
    """`spec` without its spaces, which may surround '+', '|', ':' and '-' but never split a name or a number
    ('gaussian_blur:1 2' is not 12: refused)."""
    inner = re.search(r"[\w.]\s+[\w.]", spec)
    if inner:
        raise ValueError(
            f"stray space in {spec!r} ({inner.group()!r}): spaces may only surround '+', '|', ':' and '-' (a range "
            f"is LOW-HIGH, e.g. 'gaussian_blur:1-2')."
        )
    return "".join(spec.split())


def _check_name(name: str, where: str) -> None:
    """Refuse a missing or unknown degradation name; `where` is the spec the message quotes."""
    if not name:
        raise ValueError(f"missing degradation name before ':' in {where!r}; known: {', '.join(DEGRADATIONS)}.")
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r} in {where!r}; known: {', '.join(DEGRADATIONS)}.")


def _check_strength(degradation: Degradation, strength: str) -> Degradation:
    """Refuse a strength `degradation.name` does not take; `strength` is the text the message quotes."""
    name, low, high = degradation.name, degradation.low, degradation.high
    limit = MAX_STRENGTH[name]
    for value in (low, high):
        if not math.isfinite(value) or value < 0 or value > limit:
            raise ValueError(f"bad strength {strength!r} for {name}: it must be between 0 and {_number(limit)}.")
    if high < low:
        raise ValueError(f"bad strength {strength!r} for {name}: LOW-HIGH needs LOW <= HIGH.")
    # A range may not start in the "off" values of these two: jpeg:0-30 would draw quality 0 (the harshest JPEG,
    # not off), downscale:0-4 the identity for a quarter of the draws.
    if name == "jpeg" and low < 1 and high > 0:
        raise ValueError(f"bad strength {strength!r} for jpeg: a JPEG quality is 1-100 (0 alone turns it off).")
    if name == "downscale" and low < 1 and high > 0:
        raise ValueError(f"bad strength {strength!r} for downscale: a factor is >= 1 (0 or 1 alone turn it off).")
    return degradation


def _check_chain(chain: list[Degradation]) -> list[Degradation]:
    """A chain given as `Degradation`s instead of text, held to the rules of `parse_degradations`."""
    if not isinstance(chain, (list, tuple)) or not chain or not all(isinstance(d, Degradation) for d in chain):
        raise ValueError(
            f"a degradation spec is a string such as 'gaussian_blur:1.5' or a non-empty list of Degradation, "
            f"got {chain!r}."
        )
    for degradation in chain:
        _check_name(degradation.name, repr(degradation))
        strengths = (degradation.low, degradation.high)
        if not all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in strengths):
            raise ValueError(f"bad strength in {degradation!r}: low and high must be numbers.")
        _check_strength(degradation, str(degradation).partition(":")[2])
    return list(chain)


def _example(name: str) -> str:
    return {"gaussian_blur": "1.5", "motion_blur": "9", "noise": "0.05", "jpeg": "30", "downscale": "2"}[name]


def canonical_spec(spec: str) -> str:
    """The spec in its canonical spelling (what a config records)."""
    return "|".join("+".join(str(d) for d in chain) for chain in parse_spec(spec))


def degrades_nothing(spec: str) -> bool:
    """Whether every strength of the spec turns its degradation off (0, and a downscale factor of 1)."""
    off = {"downscale": (0, 1)}
    return all(d.low == d.high in off.get(d.name, (0,)) for chain in parse_spec(spec) for d in chain)


@torch.no_grad()
def degrade(pixel_values: torch.Tensor, spec: str | list[Degradation], seed: int = 0) -> torch.Tensor:
    """Apply the degradations of `spec` to images (B, C, H, W) in [-1, 1], deterministically under `seed`. The filters
    run on the images' device (a training batch on the GPU stays there; only JPEG goes through PIL on the CPU), and
    every random draw comes from one CPU generator, so the draws are the same on every device."""
    alternatives = parse_spec(spec) if isinstance(spec, str) else [_check_chain(spec)]
    if pixel_values.ndim != 4 or not pixel_values.is_floating_point():
        raise ValueError(
            f"degrade expects float images (batch, channels, height, width), got {tuple(pixel_values.shape)} "
            f"{pixel_values.dtype}."
        )
    if pixel_values.shape[0] == 0:
        return pixel_values.clone()  # nothing to degrade (and torch.stack refuses an empty list)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    # Half precision is computed in float32; float64 stays float64, so that a zero strength is exactly the identity.
    dtype = torch.float64 if pixel_values.dtype == torch.float64 else torch.float32
    images = pixel_values.detach().to(dtype=dtype)
    if len(alternatives) == 1:
        images = _apply_chain(images, alternatives[0], generator)
    else:
        picks = torch.randint(len(alternatives), (images.shape[0],), generator=generator)
        images = images.clone()
        for index, chain in enumerate(alternatives):
            chosen = (picks == index).nonzero().flatten()
            if chosen.numel():
                images[chosen] = _apply_chain(images[chosen], chain, generator)
    return images.clamp(-1, 1).to(dtype=pixel_values.dtype)


def _apply_chain(images: torch.Tensor, chain: list[Degradation], generator: torch.Generator) -> torch.Tensor:
    for degradation in chain:
        strengths = _strengths(degradation, images.shape[0], generator)
        apply = APPLY[degradation.name]
        images = torch.stack([apply(image, float(s), generator) for image, s in zip(images, strengths)])
    return images


def _strengths(degradation: Degradation, count: int, generator: torch.Generator) -> torch.Tensor:
    if degradation.high == degradation.low:
        return torch.full((count,), degradation.low)
    return degradation.low + (degradation.high - degradation.low) * torch.rand(count, generator=generator)


def _filter(image: torch.Tensor, kernel: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel convolution of one image (C, H, W) with a normalised (k, k) kernel, or with the separable kernel
    `kernel[:, None] * columns[None, :]` given as its two (k,) factors; reflect padding (replicate where the image
    is smaller than the kernel's radius)."""
    channels = image.shape[0]
    pad = kernel.shape[0] // 2
    mode = "reflect" if pad < min(image.shape[-2:]) else "replicate"
    padded = F.pad(image[None], (pad, pad, pad, pad), mode=mode)
    if columns is None:
        return F.conv2d(padded, kernel.to(image)[None, None].expand(channels, 1, *kernel.shape), groups=channels)[0]
    # Two passes of k taps instead of one of k x k: 8x fewer products at sigma 2.5.
    rows = F.conv2d(padded, columns.to(image)[None, None, None, :].expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.to(image)[None, None, :, None].expand(channels, 1, -1, 1), groups=channels)[0]


def gaussian_blur(image: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian blur of standard deviation `sigma` pixels (kernel radius 3 sigma, reflect padding), as two
    one-dimensional passes (the Gaussian is separable)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    line = torch.exp(-(x**2) / (2 * sigma**2))
    line = line / line.sum()
    return _filter(image, line, columns=line)


def motion_blur(image: torch.Tensor, length: float, generator: torch.Generator) -> torch.Tensor:
    """A line kernel of `length` pixels in a direction drawn from `generator` (anti-aliased by supersampling)."""
    angle = float(torch.rand((), generator=generator)) * math.pi
    if length <= 0:
        return image
    radius = max(1, math.ceil(length / 2))
    size = 2 * radius + 1
    kernel = torch.zeros(size, size)
    samples = max(2, int(length * 8))
    for t in torch.linspace(-length / 2, length / 2, samples).tolist():
        x, y = radius + t * math.cos(angle), radius + t * math.sin(angle)
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                kernel[y0 + dy, x0 + dx] += w
    return _filter(image, kernel / kernel.sum())


def noise(image: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation `std` on the [0, 1] scale (drawn even at 0, so later draws
    do not depend on the strength)."""
    draw = torch.randn(image.shape, generator=generator)
    if std <= 0:
        return image
    return image + 2 * std * draw.to(image)  # std on the [0, 1] scale is 2 * std on [-1, 1]


def jpeg(image: torch.Tensor, quality: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A JPEG round trip through PIL at `quality` (1-100); 0 is the identity."""
    if quality <= 0:
        return image
    import numpy as np
    from PIL import Image

    if image.shape[0] not in (1, 3):  # JPEG codes colour as RGB only: other channel counts go one greyscale plane at a time
        return torch.cat([jpeg(plane[None], quality) for plane in image])
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    mode = "L" if array.shape[-1] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if mode == "L" else array).save(buffer, format="JPEG", quality=int(round(quality)))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode)).copy()
    decoded = torch.from_numpy(decoded).float()
    decoded = decoded[..., None] if decoded.ndim == 2 else decoded
    return (decoded.permute(2, 0, 1) / 127.5 - 1).to(image)


def downscale(image: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Area-downscaled by `factor`, then bicubic-upscaled back to the image's size (the detail lost stays lost)."""
    if factor <= 1:
        return image
    height, width = image.shape[-2:]
    small = (max(1, round(height / factor)), max(1, round(width / factor)))
    reduced = F.interpolate(image[None], size=small, mode="area")
    return F.interpolate(reduced, size=(height, width), mode="bicubic", align_corners=False)[0]


APPLY = {
    "gaussian_blur": gaussian_blur, "motion_blur": motion_blur, "noise": noise, "jpeg": jpeg, "downscale": downscale,
}  # fmt: skip


__all__ = [
    "DEGRADATIONS", "Degradation", "canonical_spec", "degrade", "degrades_nothing", "parse_degradations", "parse_spec"
]
