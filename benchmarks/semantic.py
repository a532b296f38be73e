"""Semantic benchmark: does CLIP guidance put meaning into the tokens, at no cost in reconstruction?

No pretrained CLIP weights can be downloaded here, so the benchmark brings its own teacher: a tiny open_clip ViT
trained contrastively on Fashion-MNIST with captions made from the labels ("a photo of a {label}."), saved as an
open_clip checkpoint with its model-config JSON and passed to `training/train.py` exactly as a user would pass a real
one (`--clip_model CONFIG.json --clip_pretrained CKPT --prototypes text:LABELS`). The tokenizers of `--cases` (by
default all five of `CASES`, which `--help` lists: `nearest` and `cdb` without semantic terms, `cdb` with CLIP
guidance and semantic alignment, the same losses with `nearest`, and a steered variant) are trained at equal budget
and each is measured on the test split:

- reconstruction PSNR;
- linear-probe accuracy: a logistic regression on the mean-pooled quantized features (trained on a sample of the
  training split, scored on the test split);
- prototype agreement: the share of an image's tokens whose code's prototype label (`model.code_prototype_labels()`)
  is the image's label (chance is 1 / number of classes).

Fashion-MNIST comes from a local folder of IDX files (Debian's `dataset-fashion-mnist` package installs them under
/usr/share/datasets/fashion-mnist) or, where the Hub is reachable, through `datasets`.

    python benchmarks/semantic.py                       # the full default run (about 35 minutes on 2 CPU cores)
    python benchmarks/semantic.py --teacher_steps 900 --max_train_steps 1200      # longer (about 45 minutes)
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import command_line, environment_summary, load_line, load_summary, timestamp
from tqdm.auto import tqdm

from cdb_tokenizer.tools.files import replace_file, write_text
from cdb_tokenizer.tools.messages import run_script
from cdb_tokenizer.tools.teacher import DEFAULT_TEMPLATE


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_HUB_DATASET = "zalando-datasets/fashion_mnist"
# Class names as captions use them ("a photo of a {label}"), in label-id order.
FASHION_MNIST_LABELS = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
TEACHER_NAME = "fashion-mnist-clip-tiny"


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledImages:
    """Greyscale images (N, H, W) uint8, their label ids (N,) int64 and the class names."""

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int | None, seed: int = 0) -> "LabelledImages":
        """A random subset of `count` images (all of them when `count` is None or too large)."""
        if count is None or count >= len(self):
            return self
        picks = np.sort(np.random.default_rng(seed).permutation(len(self))[:count])
        return LabelledImages(self.images[picks], self.labels[picks], self.label_names)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed (`.gz`) or plain, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}).")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), file has {len(data)}.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist_idx(folder: str | Path, split: str) -> LabelledImages:
    """Fashion-MNIST `split` ("train" or "test") from a folder of IDX files (`*-ubyte` or `*-ubyte.gz`)."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} does not exist; install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist) or pass the folder that holds the IDX files."
        )
    paths = [_find_idx_file(folder, stem) for stem in IDX_FILES[split]]
    missing = [stem for stem, path in zip(IDX_FILES[split], paths) if path is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} lacks the IDX file(s) {missing} (plain or .gz).")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"IDX files in {folder} do not match: images {images.shape}, labels {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_LABELS)):
        raise ValueError(f"labels in {paths[1]} must be in [0, {len(FASHION_MNIST_LABELS)}), got [{labels.min()}, {labels.max()}].")
    return LabelledImages(np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64), FASHION_MNIST_LABELS)


class DataUnavailableError(RuntimeError):
    """Fashion-MNIST is neither in the local folder nor loadable from the Hub (one line, not a traceback)."""


def load_fashion_mnist_hub(dataset_name: str, split: str) -> LabelledImages:
    """Fashion-MNIST `split` through `datasets` (columns `image` and `label`)."""
    import datasets

    dataset = datasets.load_dataset(dataset_name, split=split)
    images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in dataset["image"]])
    return LabelledImages(images, np.asarray(dataset["label"], dtype=np.int64), FASHION_MNIST_LABELS)


# Held out of the training images by each tokenizer's train.py run, to validate on.
VALIDATION_IMAGES = 256


def load_fashion_mnist(
    split: str, data_dir: str | Path | None = DEFAULT_FASHION_MNIST_DIR, dataset_name: str | None = DEFAULT_HUB_DATASET
) -> LabelledImages:
    """Fashion-MNIST `split`: from the local IDX folder `data_dir` when it exists, else from the Hub through `datasets`.

    The local folder is tried first so that an offline machine never waits on the Hub; pass `data_dir=None` to use
    the Hub only, or `dataset_name=None` to use the folder only.
    """
    if data_dir is not None and Path(data_dir).is_dir():
        return load_fashion_mnist_idx(data_dir, split)
    if dataset_name is None:
        return load_fashion_mnist_idx(data_dir, split)  # raises the missing-folder error
    try:
        return load_fashion_mnist_hub(dataset_name, split)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user: no data
        where = f"the folder {data_dir} does not exist and " if data_dir is not None else ""
        raise DataUnavailableError(
            f"Fashion-MNIST is not available: {where}the Hub data set {dataset_name!r} could not be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Install Debian's "
            f"dataset-fashion-mnist package (IDX files under {DEFAULT_FASHION_MNIST_DIR}) or pass --fashion_mnist_dir."
        ) from error


def to_pixel_values(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """Greyscale uint8 images (N, 28, 28) -> RGB float (N, 3, size, size) in [-1, 1], zero-padded (black) to `size`."""
    pixels = torch.from_numpy(np.asarray(images)).float().div(127.5).sub(1.0)
    pad = size - pixels.shape[-1]
    if pad < 0 or pad % 2:
        raise ValueError(f"cannot pad {pixels.shape[-1]}x{pixels.shape[-2]} images evenly to {size}x{size}.")
    pixels = F.pad(pixels, (pad // 2,) * 4, value=-1.0)
    return pixels[:, None].expand(-1, 3, -1, -1).contiguous()


def write_imagefolder(data: LabelledImages, folder: str | Path, size: int = 32) -> Path:
    """Write the images as RGB PNGs of `size` x `size` in one subfolder per class (an `imagefolder` data set)."""
    from PIL import Image

    folder = Path(folder)
    pixels = to_pixel_values(data.images, size).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    for name in data.label_names:
        (folder / _safe_name(name)).mkdir(parents=True, exist_ok=True)
    for index, (array, label) in enumerate(zip(tqdm(pixels, desc="writing imagefolder", leave=False), data.labels)):
        Image.fromarray(array).save(folder / _safe_name(data.label_names[label]) / f"{index:06d}.png")
    return folder


def _safe_name(label: str) -> str:
    return label.replace("/", "-").replace(" ", "_")


# ----------------------------------------------------------------------------------------------------------------
# The teacher: a tiny open_clip model trained on captions made from the labels
# ----------------------------------------------------------------------------------------------------------------


def teacher_model_config(
    image_size: int = 32, patch_size: int = 4, layers: int = 4, width: int = 128, embed_dim: int = 64
) -> dict:
    """open_clip model config of the tiny teacher.

    The vision tower pools by averaging its patch tokens (`pool_type="avg"`), so each projected patch token lives in
    the space the contrastive loss aligns with the text: the patch features a tokenizer learns from carry meaning.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size, "patch_size": patch_size, "layers": layers, "width": width,
            "head_width": 32, "pool_type": "avg",
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": width // 32, "layers": 2},
    }  # fmt: skip


def create_teacher(model_config: dict):
    """An untrained open_clip model from `model_config`, and its tokenizer (CLIP's BPE)."""
    import open_clip

    from cdb_tokenizer.tools.teacher import build_clip_model

    tokenizer = open_clip.SimpleTokenizer(context_length=model_config["text_cfg"]["context_length"])
    return build_clip_model(model_config), tokenizer


def teacher_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> the teacher's input: [0, 1] normalised with open_clip's default (OpenAI) mean and std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=pixel_values.device).view(1, 3, 1, 1)
    return ((pixel_values + 1) / 2 - mean) / std


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP's symmetric loss when captions repeat: each image against the distinct captions, each caption against
    the batch's images with all images of its class as positives (duplicate captions would otherwise be negatives)."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ text_features.t()  # (B, C)
    image_to_text = F.cross_entropy(logits, labels)
    log_probabilities = logits.t().log_softmax(-1)  # (C, B): each caption over the images
    positives = F.one_hot(labels, text_features.shape[0]).t().float()
    present = positives.sum(-1) > 0
    text_to_image = -((log_probabilities * positives).sum(-1)[present] / positives.sum(-1)[present]).mean()
    return (image_to_text + text_to_image) / 2


def train_teacher(
    data: LabelledImages,
    model_config: dict,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    show_progress: bool = True,
):
    """Train the tiny open_clip teacher contrastively on `data` with captions `DEFAULT_TEMPLATE` ("a photo of a {label}.").

    Augmentation: random shifts of up to 2 pixels and horizontal flips. Returns the model (eval mode) and its tokenizer.
    """
    torch.manual_seed(seed)
    model, tokenizer = create_teacher(model_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    pixels = to_pixel_values(data.images, model_config["vision_cfg"]["image_size"])
    labels = torch.from_numpy(data.labels)
    caption_tokens = tokenizer([DEFAULT_TEMPLATE.format(name) for name in data.label_names])
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="training the CLIP teacher", disable=not show_progress)
    for _ in progress:
        picks = torch.randint(len(labels), (batch_size,), generator=generator)
        batch = augment(pixels[picks], generator)
        image_features = model.encode_image(teacher_pixels(batch))
        text_features = F.normalize(model.encode_text(caption_tokens), dim=-1)
        loss = contrastive_loss(image_features, text_features, labels[picks], model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), tokenizer


def augment(pixel_values: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts (up to `max_shift` pixels, filled with black) and horizontal flips of a batch in [-1, 1]."""
    batch, _, height, width = pixel_values.shape
    padded = F.pad(pixel_values, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(2 * max_shift + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.stack([padded[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(shifts.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


@torch.no_grad()
def zero_shot_accuracy(teacher, data: LabelledImages, batch_size: int = 500) -> float:
    """Share of `data` whose nearest caption (`DEFAULT_TEMPLATE`, the prompt of text prototypes) is its own class's.

    `teacher` is a `cdb_tokenizer.tools.teacher.CLIPTeacher`, so the accuracy is that of the checkpoint as train.py loads it.
    """
    text_features = teacher.encode_text(list(data.label_names), DEFAULT_TEMPLATE)
    pixels = to_pixel_values(data.images, teacher.image_size[0])
    predictions = []
    for batch in pixels.split(batch_size):
        images = ((batch.to(teacher.device) + 1) / 2 - teacher.mean) / teacher.std
        image_features = F.normalize(teacher.model.encode_image(images).float(), dim=-1)
        predictions.append((image_features @ text_features.t()).argmax(-1).cpu())
    return float((torch.cat(predictions).numpy() == data.labels).mean())


@torch.no_grad()
def teacher_patch_agreement(teacher, data: LabelledImages, batch_size: int = 500) -> float:
    """Share of the teacher's patch features whose nearest caption is their image's class.

    The same measure as `prototype_agreement`, on the teacher's own patches: what a tokenizer that copied the
    teacher's patch semantics perfectly would reach.
    """
    text_features = teacher.encode_text(list(data.label_names), DEFAULT_TEMPLATE)
    labels = torch.from_numpy(data.labels)
    hits = []
    for batch, batch_labels in zip(to_pixel_values(data.images, teacher.image_size[0]).split(batch_size), labels.split(batch_size)):
        features = teacher.patch_features(batch.to(teacher.device)).flatten(2).transpose(1, 2)  # (B, patches, D)
        nearest = (F.normalize(features, dim=-1) @ text_features.t()).argmax(-1).cpu()
        hits.append((nearest == batch_labels[:, None]).float().mean(dim=1))
    return float(torch.cat(hits).mean())


def save_teacher(model, model_config: dict, folder: str | Path, name: str = TEACHER_NAME) -> tuple[Path, Path]:
    """Save the teacher as open_clip expects it; returns (model-config JSON, checkpoint).

    Writes `{name}.json` (the model config: `open_clip.add_model_config(path)` registers it as `name`, then
    `open_clip.create_model(name, pretrained=checkpoint)` loads the weights), `open_clip_model.safetensors`, and
    `open_clip_config.json`, so `open_clip.create_model("local-dir:FOLDER")` loads the folder too.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(model_config, indent=2))
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_config, "preprocess_cfg": {}}, indent=2)
    )
    checkpoint_path = folder / "open_clip_model.safetensors"
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()}, checkpoint_path)
    return config_path, checkpoint_path


def load_teacher(config_path: str | Path, checkpoint_path: str | Path):
    """Load a saved teacher exactly as train.py does (`--clip_model CONFIG.json --clip_pretrained CKPT`)."""
    from cdb_tokenizer.tools.teacher import load_clip_teacher

    return load_clip_teacher(str(config_path), str(checkpoint_path))


# ----------------------------------------------------------------------------------------------------------------
# Measuring a tokenizer
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_split(
    model, pixel_values: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tokens (N, h * w) and mean-pooled quantized features (N, codebook_dim) of images in [-1, 1], and the prototype
    nearest (by cosine) each token's predicted semantic feature (N, h * w), or None for a model without either."""
    was_training = model.training
    model.eval()
    tokens, pooled, head_prototypes = [], [], []
    prototypes = F.normalize(model.quantizer.prototypes.float(), dim=-1) if model.quantizer.has_prototypes else None
    try:
        for batch in tqdm(pixel_values.split(batch_size), desc="encoding", leave=False):
            output = model.encode(batch.to(next(model.parameters()).device))
            tokens.append(output.image_tokens.flatten(1).cpu())
            pooled.append(output.quantized.float().mean(dim=(2, 3)).cpu())
            if prototypes is not None and output.semantic_features is not None:
                features = F.normalize(output.semantic_features.float().flatten(2).transpose(1, 2), dim=-1)
                head_prototypes.append((features @ prototypes.t()).argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(tokens), torch.cat(pooled), torch.cat(head_prototypes) if head_prototypes else None


def prototype_agreement(image_tokens: torch.Tensor, code_labels: list[str | None], image_labels: list[str]) -> float:
    """Share of tokens whose code's prototype label is their image's label, averaged over images.

    Args:
        image_tokens: (N, L) code ids of N images.
        code_labels: the prototype label of each code (`model.code_prototype_labels()`); None counts as a miss.
        image_labels: the label of each image.
    """
    image_tokens = torch.as_tensor(image_tokens)
    if image_tokens.ndim != 2 or image_tokens.shape[0] != len(image_labels):
        raise ValueError(f"image_tokens must be (num_images={len(image_labels)}, tokens), got {tuple(image_tokens.shape)}.")
    if all(label is None for label in code_labels):
        raise ValueError("no code has a labelled prototype: train with --prototypes text:LABELS_FILE.")
    if image_tokens.numel() and int(image_tokens.max()) >= len(code_labels):
        raise ValueError(f"image_tokens hold code ids up to {int(image_tokens.max())} but only {len(code_labels)} code labels were given.")
    names = sorted({label for label in code_labels if label is not None} | set(image_labels))
    index = {name: i for i, name in enumerate(names)}
    code_label_ids = torch.tensor([index[label] if label is not None else -1 for label in code_labels])
    image_label_ids = torch.tensor([index[label] for label in image_labels])
    hits = code_label_ids[image_tokens] == image_label_ids[:, None]
    return float(hits.float().mean(dim=1).mean())


def majority_code_labels(image_tokens: torch.Tensor, image_labels, codebook_size: int, label_names) -> list[str | None]:
    """Label each code by the most frequent label of the images whose tokens use it (None for unused codes).

    Fitted on one set of images and scored with `prototype_agreement` on another, it gives the agreement of the best
    code labelling: how much class information the token ids carry, whatever labels the model stores.
    """
    image_tokens = torch.as_tensor(image_tokens)
    labels = torch.as_tensor(np.asarray(image_labels), dtype=torch.long)[:, None].expand_as(image_tokens)
    counts = torch.zeros(codebook_size, len(label_names), dtype=torch.long)
    counts.index_put_((image_tokens.flatten(), labels.flatten()), torch.ones(image_tokens.numel(), dtype=torch.long), accumulate=True)
    return [label_names[int(best)] if total > 0 else None for best, total in zip(counts.argmax(-1), counts.sum(-1))]


def linear_probe_accuracy(
    train_features, train_labels, test_features, test_labels, max_iter: int = 1000, seed: int = 0
) -> float:
    """Test accuracy of a logistic regression (on standardised features) fitted to the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_features, test_features = np.asarray(train_features, dtype=np.float64), np.asarray(test_features, dtype=np.float64)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {train_features.shape} and {test_features.shape}.")
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the linear probe needs at least two classes in its training labels.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    probe.fit(train_features, np.asarray(train_labels))
    return float(probe.score(test_features, np.asarray(test_labels)))


@torch.no_grad()
def measure_tokenizer(
    model, test: LabelledImages, probe_train: LabelledImages, batch_size: int = 500, resolution: int = 32
) -> dict[str, float]:
    """PSNR, usage, linear-probe accuracy and prototype agreement of a trained tokenizer on the test split."""
    from cdb_tokenizer.tools.evaluation import evaluate

    test_pixels = to_pixel_values(test.images, resolution)
    metrics = evaluate(model, test_pixels.split(batch_size), show_progress=False)
    test_tokens, test_pooled, head_prototypes = encode_split(model, test_pixels, batch_size)
    train_tokens, train_pooled, _ = encode_split(model, to_pixel_values(probe_train.images, resolution), batch_size)
    test_label_names = [test.label_names[i] for i in test.labels]
    best_labels = majority_code_labels(train_tokens, probe_train.labels, model.config.codebook_size, test.label_names)
    head_agreement = None
    if head_prototypes is not None and model.config.prototype_labels:
        head_agreement = prototype_agreement(head_prototypes, model.config.prototype_labels, test_label_names)
    return {
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "utilization": metrics["utilization"],
        "perplexity": metrics["perplexity"],
        "linear_probe_accuracy": linear_probe_accuracy(train_pooled, probe_train.labels, test_pooled, test.labels),
        "prototype_agreement": prototype_agreement(test_tokens, model.code_prototype_labels(), test_label_names),
        "best_labelling_agreement": prototype_agreement(test_tokens, best_labels, test_label_names),
        "head_agreement": head_agreement,
        "num_test_images": len(test),
        "num_probe_train_images": len(probe_train),
        "codebook_size": model.config.codebook_size,
        "codebook_dim": model.config.codebook_dim,
        "token_grid": resolution // model.config.downsampling_factor,
    }


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------

NO_SEMANTIC_TERMS = ("--semantic_distillation_weight", "0", "--token_alignment_weight", "0", "--code_alignment_weight", "0")
# The router lets CLIP pick the code: the learned and semantic terms (the cosine of the predicted CLIP feature to each
# code's prototype) re-rank 32 candidates instead of 8, with a swing of 8 logits instead of 0.5.
STEERED_ROUTER = ("--router_candidates", "32", "--router_logit_bound", "8")
# Every case gets the same teacher and text prototypes (so every code is tied to a labelled prototype at the codebook's
# k-means initialisation, and agreement is defined for all); only the assignment rule, the router's weights and the
# semantic loss weights differ. Semantic loss weights, where on, are CDBVQConfig's defaults.
@dataclass(frozen=True)
class Case:
    name: str
    train_flags: tuple[str, ...]
    note: str
    guided: bool = False


CASES = {
    "nearest": Case("nearest", ("--assignment", "nearest", *NO_SEMANTIC_TERMS), "nearest-neighbour assignment, semantic loss weights 0"),
    "cdb": Case("cdb", ("--assignment", "cdb", *NO_SEMANTIC_TERMS), "CDB router with its default weights, semantic loss weights 0"),
    "cdb_clip": Case(
        "cdb + CLIP", ("--assignment", "cdb"),
        "CDB router with its default weights; semantic distillation, token and code alignment on", guided=True,
    ),
    # The same losses without the router: what of cdb + CLIP's gains is the losses' and what the router's.
    "nearest_clip": Case(
        "nearest + CLIP", ("--assignment", "nearest"),
        "nearest-neighbour assignment; semantic distillation, token and code alignment on", guided=True,
    ),
    "cdb_clip_steered": Case(
        "cdb + CLIP, steered router", ("--assignment", "cdb", *STEERED_ROUTER),
        f"as cdb + CLIP, with `{' '.join(STEERED_ROUTER)}`", guided=True,
    ),
}  # fmt: skip


def train_command(args: argparse.Namespace, case: str, data_dir: Path, teacher_config: Path, teacher_checkpoint: Path,
                  labels_file: Path) -> list[str]:  # fmt: skip
    """The train.py command line of one case, as a user would type it."""
    return [
        sys.executable, str(REPO_ROOT / "training" / "train.py"), "--overwrite_output_dir",  # each case starts afresh
        "--train_data_dir", str(data_dir), "--model_preset", "tiny", "--resolution", str(args.resolution),
        "--random_crop_scale", "0.8", "1.0",
        "--clip_model", str(teacher_config), "--clip_pretrained", str(teacher_checkpoint),
        "--prototypes", f"text:{labels_file}",
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate), "--disc_weight", "0", "--lpips_weight", "0",
        "--num_validation_images", str(VALIDATION_IMAGES), "--validation_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(args.max_train_steps), "--checkpoints_total_limit", "1", "--report_to", "none",
        "--seed", str(args.seed), "--output_dir", str(Path(args.output_dir) / "tokenizers" / case),
        *CASES[case].train_flags, *args.train_args,
    ]  # fmt: skip


def reusable(command: list[str]) -> bool:
    """Whether `--reuse_tokenizers` may measure the tokenizer in `command`'s output folder instead of training it:
    yes when one is there and train.py trained it with the flags `command` gives (its `training_config.json` against
    train.py's own parse of `command`); none there: no; one trained otherwise: exits, naming the flags that differ."""
    model_dir = Path(command[command.index("--output_dir") + 1])
    if not (model_dir / "model.safetensors").is_file():
        return False
    from cdb_tokenizer.tools.train_args import parse_args as parse_train_args

    saved_path = model_dir / "training_config.json"
    if not saved_path.is_file():
        raise SystemExit(
            f"--reuse_tokenizers: {model_dir} has no training_config.json, so its training flags cannot be checked "
            "against this run's; train it afresh (drop --reuse_tokenizers) or remove the folder."
        )
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(json.dumps(vars(parse_train_args(command[2:])), default=str))  # as train.py wrote it
    # `model_config` is a path flag in the parse and the model's config in the file; the model config is compared
    # through `model_config_dict`, the one the flags build.
    differ = sorted(key for key in (wanted.keys() & saved.keys()) - {"model_config"} if wanted[key] != saved[key])
    if differ:
        shown = "; ".join(f"{key}: trained with {saved[key]!r}, this run {wanted[key]!r}" for key in differ)
        raise SystemExit(
            f"--reuse_tokenizers: {model_dir} was trained with other flags than this run gives it ({shown}); drop "
            "--reuse_tokenizers to train it afresh, or rerun with the flags it was trained with."
        )
    return True


def run_training(command: list[str], log_path: Path, num_threads: int | None) -> float:
    """Run train.py, its output going to `log_path`; returns the wall time. Fails with the log's tail."""
    env = dict(os.environ)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"train.py failed (exit {result.returncode}); the end of {log_path}:\n{tail}")
    return time.time() - start


def get_teacher(args: argparse.Namespace, train: LabelledImages, test: LabelledImages) -> tuple[Path, Path, dict]:
    """Train (or reuse, with --reuse_teacher) the teacher; returns its config, checkpoint and a summary."""
    folder = Path(args.output_dir) / "teacher"
    config_path, checkpoint_path = folder / f"{TEACHER_NAME}.json", folder / "open_clip_model.safetensors"
    summary_path = folder / "summary.json"
    if args.reuse_teacher and summary_path.is_file() and checkpoint_path.is_file():
        print(f"Reusing the teacher in {folder}.")
        return config_path, checkpoint_path, json.loads(summary_path.read_text())
    model_config = teacher_model_config(
        image_size=args.resolution, layers=args.teacher_layers, width=args.teacher_width, embed_dim=args.teacher_embed_dim
    )
    start = time.time()
    model, _ = train_teacher(
        train.subset(args.num_teacher_images, args.seed), model_config, steps=args.teacher_steps,
        batch_size=args.teacher_batch_size, learning_rate=args.teacher_learning_rate, seed=args.seed,
    )  # fmt: skip
    train_time = time.time() - start
    config_path, checkpoint_path = save_teacher(model, model_config, folder)
    teacher = load_teacher(config_path, checkpoint_path)  # the saved checkpoint, loaded as train.py loads it
    summary = {
        "zero_shot_accuracy": zero_shot_accuracy(teacher, test), "patch_agreement": teacher_patch_agreement(teacher, test),
        "train_seconds": round(train_time, 1),
        "steps": args.teacher_steps, "batch_size": args.teacher_batch_size, "model_config": model_config,
    }  # fmt: skip
    write_text(summary_path, json.dumps(summary, indent=2))  # whole or absent: --reuse_teacher reads it
    return config_path, checkpoint_path, summary


def prepare_train_images(args: argparse.Namespace, train: LabelledImages) -> Path:
    """The imagefolder train.py trains on: `--num_train_images` of the training split as RGB PNGs (written once)."""
    subset = train.subset(args.num_train_images, args.seed)
    folder = Path(args.output_dir) / f"train_images_{len(subset)}_seed{args.seed}_{args.resolution}px"
    marker = folder / ".complete"
    if not marker.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_imagefolder(subset, folder, args.resolution)
        marker.touch()
    return folder


def save_token_label_maps(
    models: dict, test: LabelledImages, path: Path, resolution: int, teacher=None, count: int = 8
) -> Path:
    """A picture: one test image per class; for each tokenizer, its token grid coloured by each token's prototype
    label; and, given the `teacher`, its own patches coloured by their nearest caption (what tokens can inherit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(test.label_names)
    picks = [int(np.flatnonzero(test.labels == label)[0]) for label in range(min(count, len(names))) if (test.labels == label).any()]
    pixels = to_pixel_values(test.images[picks], resolution)
    columns = {}
    for case, model in models.items():
        tokens, _, _ = encode_split(model, pixels)
        code_labels = [names.index(label) if label in names else len(names) for label in model.code_prototype_labels()]
        columns[case] = torch.tensor(code_labels)[tokens].view(len(picks), *model.token_grid_size(resolution, resolution))
    if teacher is not None:
        with torch.no_grad():
            features = F.normalize(teacher.patch_features(pixels.to(teacher.device)), dim=1)
            columns["CLIP teacher's\npatches"] = torch.einsum("bdhw,pd->bphw", features, teacher.encode_text(names)).argmax(1).cpu()
    # tab10 without its grey (which reads as "nothing"), then light grey for codes without a label.
    palette = [colour for i, colour in enumerate(plt.get_cmap("tab10").colors) if i != 7] + [plt.get_cmap("tab20b").colors[0]]
    colours = ListedColormap(palette[: len(names)] + [(0.85, 0.85, 0.85)])
    figure, axes = plt.subplots(len(picks), len(columns) + 1, figsize=(1.6 * len(columns) + 3.2, 1.6 * len(picks)), squeeze=False)
    for column, (title, label_maps) in enumerate(columns.items(), start=1):
        axes[0][column].set_title(title.replace(", ", ",\n"), fontsize=8)
        for row in range(len(picks)):
            axes[row][column].imshow(label_maps[row].numpy(), cmap=colours, vmin=-0.5, vmax=len(names) + 0.5)
    for row, index in enumerate(picks):
        axes[row][0].imshow(test.images[index], cmap="gray")
        axes[row][0].set_ylabel(names[test.labels[index]], fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][0].set_title("test image", fontsize=8)
    figure.legend(handles=[Patch(color=colours(i), label=name) for i, name in enumerate(names)], loc="center right", fontsize=7)
    figure.suptitle("prototype label of each token's code", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1 - 1.5 / figure.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return replace_file(path, lambda temporary: figure.savefig(temporary, dpi=80))
    finally:
        plt.close(figure)


def targets(results: dict[str, dict], num_classes: int) -> list[tuple[str, str, float, str, bool]]:
    """The issue's targets for each CLIP-guided case against nearest: (case, what, measured, needed, met)."""
    baseline = results.get("nearest")
    if baseline is None:
        return []
    chance = 1.0 / num_classes
    rows = []
    for case, result in results.items():
        if not CASES[case].guided:
            continue
        probe_gain = 100 * (result["linear_probe_accuracy"] - baseline["linear_probe_accuracy"])
        agreement_gain = 100 * (result["prototype_agreement"] - baseline["prototype_agreement"])
        psnr_change = result["psnr"] - baseline["psnr"]
        name = CASES[case].name
        rows += [
            (name, "linear probe minus nearest's (points)", probe_gain, ">= +20", probe_gain >= 20),
            (name, "prototype agreement minus nearest's (points)", agreement_gain, f">= +{200 * chance:.0f} (2x chance)", agreement_gain >= 200 * chance),
            (name, "test PSNR minus nearest's (dB)", psnr_change, ">= -0.5", psnr_change >= -0.5),
        ]  # fmt: skip
    return rows


def write_report(path: Path, args: argparse.Namespace, teacher: dict, results: dict[str, dict], command: str,
                 picture: Path | None, total_seconds: float, started: str, load: str) -> Path:  # fmt: skip
    """The markdown report (written whole): the table, the teacher's accuracy, the targets, the exact command, when
    it started and on what machine under what load (`load`: `common.load_summary`'s line)."""
    num_classes = len(FASHION_MNIST_LABELS)
    vision = teacher["model_config"]["vision_cfg"]
    first = next(iter(results.values()))
    lines = [
        "# Semantic benchmark: does CLIP guidance put meaning into the tokens?",
        "",
        f"Fashion-MNIST, {first['num_test_images']} test images of 10 classes, padded to {args.resolution}x{args.resolution} "
        f"RGB. No CLIP weights can be downloaded here, so the teacher is a tiny open_clip ViT ({vision['layers']} layers, "
        f"width {vision['width']}, patch {vision['patch_size']}, average-pooled patches, joint space "
        f"{teacher['model_config']['embed_dim']}) trained by this script for {teacher['steps']} steps of "
        f"{teacher['batch_size']} training images ({teacher['train_seconds'] / 60:.1f} min) on the captions "
        f"\"a photo of a {{label}}.\". **Its zero-shot accuracy on the test split: {100 * teacher['zero_shot_accuracy']:.1f}%** "
        f"(chance {100 / num_classes:.0f}%). Its own patch features agree with their image's label "
        f"{100 * teacher['patch_agreement']:.1f}% of the time (the share of patches whose nearest caption is the "
        f"image's class): the ceiling of what tokens can inherit from it. It is saved as an open_clip checkpoint "
        f"and given to `training/train.py` as a user gives a real CLIP: `--clip_model CONFIG.json --clip_pretrained "
        f"CKPT --prototypes text:labels.txt`.",
        "",
        f"Tokenizers: `train.py`'s tiny preset at {args.resolution}x{args.resolution} ({first['token_grid']}x"
        f"{first['token_grid']} tokens, {first['codebook_size']} codes of {first['codebook_dim']} dimensions), {args.max_train_steps} steps of {args.train_batch_size} images drawn from {args.num_train_images} "
        f"training images, no GAN, no LPIPS, the same flags and seed except those listed per row. Every run gets the "
        f"same teacher and prototypes, so each code is tied to a labelled prototype (the prototype nearest to the mean "
        f"CLIP feature of the latents the code wins, followed through training unless `--no-retie_prototypes`).",
        "",
        "| tokenizer | PSNR (dB) | SSIM | linear probe | prototype agreement | best-labelling agreement | semantic head agreement | codes used | perplexity | train.py time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, result in results.items():
        head = result.get("head_agreement")
        lines.append(
            f"| {CASES[case].name} | {result['psnr']:.2f} | {result['ssim']:.3f} | "
            f"{100 * result['linear_probe_accuracy']:.1f}% | {100 * result['prototype_agreement']:.1f}% | "
            f"{100 * result['best_labelling_agreement']:.1f}% | {'-' if head is None else f'{100 * head:.1f}%'} | "
            f"{100 * result['utilization']:.0f}% | "
            f"{result['perplexity']:.0f} | {result['train_seconds'] / 60:.1f} min |"
        )
    lines += [""] + [f"- **{CASES[case].name}**: {CASES[case].note}." for case in results] + [""]
    lines += [
        f"Measures, all on the test split: **PSNR**, **SSIM**, **codes used** and **perplexity** from "
        f"`cdb_tokenizer.tools.evaluation.evaluate`. **Linear probe**: accuracy of a logistic regression (scikit-learn, "
        f"standardised inputs) on the mean-pooled quantized features ({first['codebook_dim']} numbers per image), "
        f"fitted on {first['num_probe_train_images']} training images. **Prototype agreement**: the share of an "
        f"image's tokens whose code's prototype label (`model.code_prototype_labels()`) is the image's label, "
        f"averaged over images; chance is {100 / num_classes:.0f}%. **Best-labelling agreement**: the same, with each "
        f"code labelled by the most frequent class among the probe's training images that use it: how much class the "
        f"token ids carry, whatever labels the model stores. **Semantic head agreement**: the share of tokens whose "
        f"predicted semantic feature (the head the router reads) is nearest the prototype of the image's class: a "
        f"router that follows the head cannot agree more than its head does.",
        "",
    ]
    checks = targets(results, num_classes)
    if checks:
        lines += ["## Targets (CLIP-guided cdb against nearest)", "", "| tokenizer | target | measured | needed | met |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {case} | {what} | {value:+.2f} | {needed} | {'yes' if met else '**no**'} |" for case, what, value, needed, met in checks]
        lines += ["", "\"2x chance\" is read as a margin of twice the chance level (20 points with 10 classes).", ""]
    if picture is not None:
        lines += [f"![token label maps]({picture.name})", ""]
    lines += [
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"Started {started}; total wall time {total_seconds / 60:.1f} min on {os.cpu_count()} CPU cores with "
        f"{torch.get_num_threads()} torch thread(s) (other jobs shared the machine, so times are upper bounds). "
        f"Longer runs: raise `--max_train_steps`, `--teacher_steps` and `--num_train_images`; flags after `--` go to "
        f"every train.py run.",
        "",
        f"Measured on: {environment_summary()}.",
        "",
        load,
        "",
    ]
    return write_text(path, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--fashion_mnist_dir", default=DEFAULT_FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST IDX files (plain or .gz); 'none' to use the Hub only.")
    data.add_argument("--dataset_name", default=DEFAULT_HUB_DATASET, help="Hub data set used when the folder does not exist; 'none' to use the folder only.")
    data.add_argument("--num_train_images", type=int, default=20000, help="Training-split images written as the imagefolder train.py trains on.")
    data.add_argument("--num_probe_images", type=int, default=5000, help="Training-split images the linear probe is fitted on.")
    data.add_argument("--num_test_images", type=int, default=None, help="Test-split images measured (default: all 10,000).")
    data.add_argument("--resolution", type=int, default=32, help="Image size (28x28 images are padded).")
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher_steps", type=int, default=450, help="Contrastive training steps of the teacher.")
    teacher.add_argument("--teacher_batch_size", type=int, default=64)
    teacher.add_argument("--teacher_learning_rate", type=float, default=1e-3)
    teacher.add_argument("--teacher_layers", type=int, default=4)
    teacher.add_argument("--teacher_width", type=int, default=128)
    teacher.add_argument("--teacher_embed_dim", type=int, default=64)
    teacher.add_argument("--num_teacher_images", type=int, default=None, help="Training-split images the teacher sees (default: all).")
    teacher.add_argument("--reuse_teacher", action="store_true", help="Reuse the teacher already in --output_dir.")
    tokenizer = parser.add_argument_group("tokenizers (train.py)")
    tokenizer.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="Which tokenizers to train: " + "; ".join(f"{key}: {case.note}" for key, case in CASES.items()) + ".")
    tokenizer.add_argument("--max_train_steps", type=int, default=400)
    tokenizer.add_argument("--train_batch_size", type=int, default=32)
    tokenizer.add_argument("--learning_rate", type=float, default=1e-3)
    tokenizer.add_argument("--reuse_tokenizers", action="store_true", help="Measure tokenizers already trained in --output_dir instead of training them.")
    parser.add_argument("--output_dir", default="outputs/semantic_benchmark", help="Teacher, images, tokenizers and logs (not the report).")
    parser.add_argument("--report", default=str(REPO_ROOT / "benchmarks" / "results" / "semantic.md"), help="Where the markdown report goes.")
    parser.add_argument(
        "--num_threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads here and in every train.py run (default: half the cores; on a shared machine, busy-waiting "
        "threads that outnumber the free cores slow each step down many times over).",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="After '--': extra train.py flags for every tokenizer.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.train_args = [flag for flag in args.train_args if flag != "--"]
    args.fashion_mnist_dir = None if str(args.fashion_mnist_dir).lower() == "none" else args.fashion_mnist_dir
    args.dataset_name = None if str(args.dataset_name).lower() == "none" else args.dataset_name
    if args.num_train_images <= VALIDATION_IMAGES:  # train.py holds its validation images out of them
        parser.error(f"--num_train_images must be above {VALIDATION_IMAGES}, the images each tokenizer's "
                             f"train.py run holds out for validation; got {args.num_train_images}.")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the teacher summary and each tokenizer's measures (also in results.json)."""
    from transformers import AutoModel

    import cdb_tokenizer  # noqa: F401 - registers the Auto classes

    args = parse_args(argv)
    command = command_line(argv, script=__file__)
    start, started = time.time(), timestamp()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    load_before = load_line()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    train = load_fashion_mnist("train", args.fashion_mnist_dir, args.dataset_name)
    test = load_fashion_mnist("test", args.fashion_mnist_dir, args.dataset_name).subset(args.num_test_images, args.seed)
    teacher_config, teacher_checkpoint, teacher = get_teacher(args, train, test)
    print(f"Teacher zero-shot accuracy on {len(test)} test images: {100 * teacher['zero_shot_accuracy']:.1f}%")
    labels_file = output_dir / "labels.txt"
    labels_file.write_text("\n".join(train.label_names) + "\n")
    data_dir = prepare_train_images(args, train)
    probe_train = train.subset(args.num_probe_images, args.seed + 1)

    results, models = {}, {}
    commands = {case: train_command(args, case, data_dir, teacher_config, teacher_checkpoint, labels_file)
                for case in args.cases}  # fmt: skip
    reused = {case: reusable(command) for case, command in commands.items()} if args.reuse_tokenizers else {}
    for case, train_args in commands.items():  # not `command_line`: that is the function that wrote `command`
        model_dir = Path(train_args[train_args.index("--output_dir") + 1])
        if not reused.get(case):
            print(f"Training '{CASES[case].name}': {' '.join(train_args[1:])}")
            model_dir.mkdir(parents=True, exist_ok=True)
            run_training(train_args, model_dir / "train.log", args.num_threads)
        model = AutoModel.from_pretrained(model_dir).eval()
        results[case] = measure_tokenizer(model, test, probe_train, resolution=args.resolution)
        results[case]["train_seconds"] = json.loads((model_dir / "metrics.json").read_text())["wall_time_seconds"]
        models[CASES[case].name] = model
        print(f"{CASES[case].name}: " + ", ".join(f"{key} {'-' if value is None else f'{value:.4g}'}" for key, value in results[case].items()))

    report = Path(args.report)
    picture = save_token_label_maps(models, test, report.with_name(report.stem + "_token_labels.png"), args.resolution,
                                    teacher=load_teacher(teacher_config, teacher_checkpoint))  # fmt: skip
    write_text(output_dir / "results.json", json.dumps({"teacher": teacher, "tokenizers": results}, indent=2))
    load = load_summary(load_before)
    write_report(report, args, teacher, results, command, picture, time.time() - start, started, load)
    print(f"Wrote {report} and {picture}.")
    return {"teacher": teacher, "tokenizers": results}


if __name__ == "__main__":
    # Missing or damaged data, bad flags: one line (CDB_VQ_DEBUG=1 shows where).
    run_script(main, DataUnavailableError, FileNotFoundError, ValueError)
