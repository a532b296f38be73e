"""Checkpoint folders shared by the training scripts (training-only: imports accelerate)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import Accelerator


logger = logging.getLogger(__name__)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """`<output_dir>/checkpoints/checkpoint-<step>` folders of a run, oldest first."""
    folders = [p for p in (Path(output_dir) / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in folders if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` into checkpoints/checkpoint-<step>, keeping at most `total_limit` checkpoints."""
    path = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    if accelerator.is_main_process and total_limit is not None:
        existing = [p for p in checkpoint_dirs(output_dir) if p != path]
        for old in existing[: max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))  # every process writes its own RNG state
    logger.info(f"Saved checkpoint {path}.")
    return path
