"""Shared fixtures: tiny configs and real photos, so every test runs on CPU with no network."""

import pytest
import torch

from cdb_tokenizer import CDBVQConfig, CDBVQModel


# One intra-op thread for the whole session: idle OpenMP threads spin and slow tiny models (and the two-process
# tests) many times over, and one setting everywhere keeps float reductions, hence results, reproducible.
torch.set_num_threads(1)

# Tests that run several processes at once (torchrun, mp.spawn) or time signals against a child: under pytest-xdist
# (the README's `-n 2`) they all run on one worker, one at a time, so two of them never share the machine's cores.
SEVERAL_PROCESSES = pytest.mark.xdist_group("several_processes")


TINY_CONFIG = dict(
    resolution=32,
    base_channels=16,
    channel_multipliers=[1, 2, 2],
    num_res_blocks=1,
    norm_num_groups=8,
    latent_dim=16,
    codebook_size=64,
    codebook_dim=8,
    semantic_dim=32,
    num_prototypes=8,
    router_dim=8,
)


def tiny_config(**overrides) -> CDBVQConfig:
    """A CDBVQConfig small enough for CPU tests (32x32 images, 8x8 token grid, 64 codes)."""
    return CDBVQConfig(**{**TINY_CONFIG, **overrides})


def image_folder(root, counts: dict[str, int], broken: dict[str, list[str]] | None = None):
    """`root/<split>/<i>.png` flat grey images (shade 20 * i) for each split's count, plus the `broken` file names
    (not images) per split. Returns `root`."""
    import numpy as np
    from PIL import Image

    for split, count in counts.items():
        folder = root / split
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(np.full((40, 40, 3), index * 20, dtype=np.uint8)).save(folder / f"{index}.png")
        for name in (broken or {}).get(split, []):
            (folder / name).write_bytes(b"not an image")
    return root


def cli_error_line(capsys, command: str) -> str:
    """The one error line of a refused `cdb-vq` command (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith(f"cdb-vq {command}: error: "), err
    return line


def hub_cache(cache, repo_id: str, snapshots: dict, refs: dict[str, str]):
    """Lay out a Hugging Face cache on disk as huggingface_hub writes it: each `snapshots` entry (commit hash ->
    folder) copied to blobs and linked from snapshots/<commit>/, and `refs` (branch -> commit). Returns `cache`."""
    import os
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for commit, folder in snapshots.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in folder.iterdir():
            blob = repo / "blobs" / f"{commit}-{file.name}"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for branch, commit in refs.items():
        (repo / "refs" / branch).write_text(commit)
    return cache


def refit_manifest(checkpoint) -> None:
    """Rewrite a checkpoint's manifest to fit its files as they are now (every file listed, with its size and
    SHA-256), as someone who tampered with them would: the checks behind the manifest are then what a test meets."""
    import json
    from pathlib import Path

    from cdb_tokenizer.tools.checkpoints import MANIFEST, file_records

    checkpoint = Path(checkpoint)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"], manifest["sha256"] = file_records(checkpoint)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def tiny_model(seed: int = 0, **overrides) -> CDBVQModel:
    torch.manual_seed(seed)
    return CDBVQModel(tiny_config(**overrides))


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """Four real photos from scikit-image as a (4, 3, 32, 32) batch in [-1, 1]."""
    from cdb_tokenizer import CDBVQImageProcessor
    from cdb_tokenizer.tools.data import sample_photos

    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    return processor(sample_photos("skimage")[:4], return_tensors="pt").pixel_values


class RunsCode:
    """Pickled, an object that writes `marker` when unpickled: what a hostile weights file would carry. Tests plant
    one and check that loading refuses the file and the marker never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's process-wide state reset before and after the test: earlier tests set it (without mixed
    precision), and an Accelerator of other settings would be refused."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
