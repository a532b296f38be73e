"""Code roles on the training side: the three-role preset and role-map pictures (never imported by the model files).

A codebook split into named ranges (`CDBVQConfig.code_roles`) gets a role head that adds a log-prior over the
ranges to the router; with `role_supervision_weight > 0` that head is trained toward a target role per token from
fixed image signals (see `cdb_tokenizer.quantization_cdb_vq.role_targets`):

- `texture`: cells whose Laplacian energy reaches `role_texture_threshold` (edges, fine detail);
- `colour`: other cells whose chroma reaches `role_colour_threshold` (saturated, smooth colour);
- `structure`: the rest (low-pass energy dominates: smooth shading, flat grey areas).
"""

from __future__ import annotations

import colorsys
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .files import replace_file

THREE_ROLES = ("structure", "texture", "colour")
RGB = tuple[float, float, float]
# Overlay colours of role-map pictures (RGB in [0, 1]) by name, in the order other roles take them: the three roles
# of the preset always get blue, red and green, which come last so that another role reuses one only when no other
# named colour is left (and never one that a role of the same model holds).
NAMED_COLOURS = {
    "orange": (1.0, 0.6, 0.0),
    "purple": (0.6, 0.25, 0.9),
    "cyan": (0.0, 0.85, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.95, 0.15, 0.75),
    "brown": (0.55, 0.3, 0.1),
    "grey": (0.5, 0.5, 0.5),
    "pink": (1.0, 0.65, 0.75),
    "blue": (0.15, 0.45, 1.0),
    "red": (1.0, 0.25, 0.1),
    "green": (0.1, 0.85, 0.25),
}
ROLE_COLOURS = {"structure": "blue", "texture": "red", "colour": "green"}


def three_role_ranges(
    codebook_size: int, shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
) -> dict[str, list[int]]:
    """`code_roles` for the structure / texture / colour preset: three consecutive ranges tiling `codebook_size`
    codes in proportion to `shares` (equal thirds by default; the remainder goes to structure), at least one code
    each."""
    if codebook_size < 3:
        raise ValueError(f"three roles need at least 3 codes, got codebook_size {codebook_size}.")
    if len(shares) != 3 or any(share <= 0 for share in shares):
        raise ValueError(f"shares must be three positive numbers, got {shares!r}.")
    # One code per role first, then the rest by share: every role gets a code whatever the shares. For equal shares
    # this is floor(codebook_size / 3) per role, as a plain proportional split gives.
    total, rest = sum(shares), codebook_size - len(shares)
    sizes = [1 + int(rest * share / total) for share in shares]
    sizes[0] += codebook_size - sum(sizes)
    ranges, start = {}, 0
    for name, size in zip(THREE_ROLES, sizes):
        ranges[name] = [start, start + size]
        start += size
    return ranges


def role_colours(role_names: list[str]) -> list[tuple[str, RGB]]:
    """The overlay colour of each of a model's roles, as (colour name, RGB in [0, 1]), in the order of `role_names`.

    Every role gets its own colour: `structure`, `texture` and `colour` theirs (`ROLE_COLOURS`), the other roles, in
    order, the named colours that no role of the model holds, then, past those, generated colours named by their hex
    code (distinct, but with a dozen roles or more some are hard to tell apart at a glance).
    """
    taken = {ROLE_COLOURS[name] for name in role_names if name in ROLE_COLOURS}
    free = (name for name in NAMED_COLOURS if name not in taken)
    generated = _generated_colours()
    colours = []
    for role in role_names:
        name = ROLE_COLOURS.get(role) or next(free, None)
        colours.append((name, NAMED_COLOURS[name]) if name else next(generated))
    return colours


def _generated_colours() -> Iterator[tuple[str, RGB]]:
    """Endless distinct colours named by hex code, spread over hue and brightness (a 2-D low-discrepancy sequence)."""
    seen = set()
    for index in itertools.count(1):
        hue, brightness = (index * 0.7548776662) % 1.0, (index * 0.5698402910) % 1.0
        rgb = tuple(round(channel * 255) for channel in colorsys.hsv_to_rgb(hue, 0.85, 0.45 + 0.5 * brightness))
        name = "#{:02x}{:02x}{:02x}".format(*rgb)
        if name not in seen:
            seen.add(name)
            yield name, tuple(channel / 255 for channel in rgb)


def role_map_overlay(
    pixel_values: torch.Tensor, role_map: torch.Tensor, role_names: list[str], alpha: float = 0.45
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] with each token's role as a translucent colour: (B, 3, H, W) in [0, 1]."""
    if role_map.ndim != 3 or role_map.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"role_map must be (batch, h, w) for {pixel_values.shape[0]} images, got {tuple(role_map.shape)}."
        )
    images = ((pixel_values.detach().float().cpu() + 1) / 2).clamp(0, 1)
    palette = torch.tensor([rgb for _, rgb in role_colours(role_names or ["all"])])
    colours = palette[role_map.cpu().clamp(0, len(palette) - 1)].permute(0, 3, 1, 2)  # B, 3, h, w
    colours = F.interpolate(colours, size=images.shape[-2:], mode="nearest")
    return (1 - alpha) * images + alpha * colours


def role_map_figure(
    pixel_values: torch.Tensor, role_map: torch.Tensor, role_names: list[str], columns: int = 4
) -> torch.Tensor:
    """A grid (3, H', W') in [0, 1]: each image beside its role overlay, with a colour legend strip on top."""
    overlay = role_map_overlay(pixel_values, role_map, role_names)
    images = ((pixel_values.detach().float().cpu() + 1) / 2).clamp(0, 1)
    pairs = torch.cat([images, overlay], dim=-1)  # B, 3, H, 2W
    count, _, height, width = pairs.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    pad = 2
    grid = torch.ones(3, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, top : top + height, left : left + width] = pairs[i]
    legend = torch.ones(3, 12, grid.shape[-1])
    colours = role_colours(role_names or ["all"])
    block = max(1, grid.shape[-1] // len(colours))
    gap = min(2, (block - 1) // 2)  # narrow bars keep at least one pixel of colour
    for i, (_, rgb) in enumerate(colours):
        legend[:, 2:10, i * block + gap : (i + 1) * block - gap] = torch.tensor(rgb)[:, None, None]
    return torch.cat([legend, grid], dim=1)


def save_role_map(
    pixel_values: torch.Tensor, role_map: torch.Tensor, role_names: list[str], path: str | Path, columns: int = 4
) -> Path:
    """Write `role_map_figure` as a PNG; the legend's order is `role_names` (left to right)."""
    from PIL import Image

    figure = role_map_figure(pixel_values, role_map, role_names, columns)
    array = (figure.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(path, lambda temporary: Image.fromarray(array).save(temporary))


def role_legend(role_names: list[str]) -> str:
    """One line naming each role's overlay colour, left to right in the legend: "structure: blue, texture: red"."""
    return ", ".join(f"{role}: {colour}" for role, (colour, _) in zip(role_names, role_colours(role_names)))


__all__ = [
    "THREE_ROLES",
    "role_colours",
    "role_legend",
    "role_map_figure",
    "role_map_overlay",
    "save_role_map",
    "three_role_ranges",
]
