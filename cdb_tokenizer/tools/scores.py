"""Scores that need nothing but the standard library, shared by the CLI (base install) and the evaluation tools."""

from __future__ import annotations

import math


def psnr_from_mse(mse: float) -> float:
    """PSNR (dB) of a mean squared error on the [0, 1] scale (torchmetrics' definition with data_range 1)."""
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


__all__ = ["psnr_from_mse"]
