"""The frozen CLIP teacher (open_clip) and the semantic prototypes built from it (training-only).

`load_clip_teacher` resolves the teacher's weights from the local caches first and touches the network only when
it can be reached, so an offline run never hangs on a download: when the weights cannot be had it logs one line
and returns `None`, and training goes on without the semantic terms.

The teacher gives *patch features in the joint image-text space*: the patch tokens of the vision transformer go
through the same `ln_post` and projection as the pooled token, so they compare to text embeddings. Prototypes are
either CLIP text embeddings of labels (`text_prototypes`) or k-means centres of patch features (`kmeans_prototypes`),
saved as safetensors with their labels in the metadata.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import string
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .downloads import hub_offline, reachable
from .files import file_sha256
from .messages import first_line
from ..modeling_cdb_vq import flatten_grid
from ..quantization_cdb_vq import kmeans

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."

# A tiny open_clip model for tests and offline experiments: a 4-layer ViT (width 128, patch 4) on 32x32 inputs and a
# 2-layer text tower, joint space of 32 dimensions. Build it with `build_clip_model(TINY_CLIP_CONFIG)` or write it
# with `save_clip_config` and pass the JSON path as the model name.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

HF_HUB_PREFIX = "hf-hub:"
# OpenAI's original CLIP files are TorchScript archives: code, not just tensors; their Hub copies are plain weights.
TORCHSCRIPT_HOSTS = ("openaipublic.azureedge.net", "openaipublic.blob.core.windows.net")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class TeacherUnavailableError(RuntimeError):
    """The teacher's weights are neither cached nor downloadable right now."""


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------


class CLIPTeacher(nn.Module):
    """A frozen open_clip model that gives patch features and text embeddings in its joint space.

    Args:
        model: An open_clip `CLIP` / `CustomTextCLIP` whose vision tower is a `VisionTransformer`.
        tokenizer: The open_clip tokenizer of its text tower.
        mean, std: The image normalisation the weights were trained with.
        name: A description for logs.
        interpolation: How images are resized to the tower's input: "bicubic" (OpenAI's and LAION's) or "bilinear",
            as the weights' open_clip preprocessing config says.
    """

    def __init__(self, model: nn.Module, tokenizer=None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, name: str = "clip", interpolation: str = "bicubic"):  # fmt: skip
        super().__init__()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise ValueError(_not_a_vit(name, type(visual).__name__))
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(_ATTENTIONAL_POOL.format(name=name))
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.weights_digest: str | None = None  # the checkpoint's content digest, set by `load_clip_teacher`
        self.interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"  # open_clip's "random": bicubic
        self.register_buffer("mean", torch.tensor(mean or OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPTeacher:
        # The teacher stays frozen in eval mode whatever its parent does.
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space."""
        proj = self.model.visual.proj
        return int(proj.shape[1]) if proj is not None else int(self.model.visual.transformer.width)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def native_grid_size(self) -> tuple[int, int]:
        """Patch grid of the vision tower at its input size."""
        return tuple(self.model.visual.grid_size)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def patch_features(self, pixel_values: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch features (B, embed_dim, h, w) of images in [-1, 1], resized to `grid_size` (default: native grid).

        Images are resized to the tower's input size and normalised with its mean and std; patch tokens get the
        final LayerNorm and projection of the pooled token, so they live in the space of `encode_text`.
        """
        visual = self.model.visual
        dtype = visual.conv1.weight.dtype
        images = F.interpolate(pixel_values.float(), size=self.image_size, mode=self.interpolation, antialias=True,
                               align_corners=False)  # fmt: skip
        images = ((images + 1) / 2 - self.mean) / self.std
        tokens = self._patch_tokens(images.to(dtype))
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        grid_height, grid_width = self.native_grid_size
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_height, grid_width).float()
        if grid_size is not None and tuple(grid_size) != (grid_height, grid_width):
            features = F.interpolate(features, size=tuple(grid_size), mode="bilinear", align_corners=False, antialias=True)
        return features

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, width) after the transformer and `ln_post` (the class token is dropped)."""
        visual = self.model.visual
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
        tokens = visual.ln_pre(tokens)
        if getattr(visual.transformer, "batch_first", True):
            tokens = visual.transformer(tokens)
        else:  # open_clip < 2.25 runs its transformer sequence-first
            tokens = visual.transformer(tokens.transpose(0, 1)).transpose(0, 1)
        return visual.ln_post(tokens[:, 1:])

    @torch.no_grad()
    def encode_text(self, labels: Sequence[str], template: str = DEFAULT_TEMPLATE, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (P, embed_dim) of `template.format(label)` for each label."""
        if self.tokenizer is None:
            raise ValueError(f"the CLIP teacher {self.name!r} has no tokenizer, so it cannot embed text.")
        check_prompt_template(template)
        prompts = [template.format(label) for label in labels]
        embeddings = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start : start + batch_size]).to(self.device)
            embeddings.append(self.model.encode_text(tokens, normalize=True).float())
        return torch.cat(embeddings)


def check_prompt_template(template: str) -> None:
    """Refuse a prompt template that `template.format(label)` cannot fill: it needs exactly one `{}` (or `{0}`) where
    the label goes, and no other field (a second one raised a KeyError or IndexError from `format`)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:  # an unmatched brace
        raise ValueError(
            f"the prompt template {template!r} is not a format string ({error}); write a literal brace as {{{{ or }}}}."
        ) from None
    if not (fields == [""] or fields and set(fields) == {"0"}):
        raise ValueError(
            f"the prompt template must hold one '{{}}' where the label goes and no other field, got {template!r}."
        )


# ----------------------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------------------


def build_clip_model(config: dict) -> nn.Module:
    """An open_clip model with random weights from a model config dict (open_clip's JSON layout)."""
    import open_clip

    config = dict(config.get("model_cfg", config))
    custom_text = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
    config.pop("multimodal_cfg", None)
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return model_class(**config)
    except TypeError as error:  # e.g. a transformers config.json given for an open_clip one
        raise ValueError(f"not an open_clip model config ({first_line(error)}).") from None


def save_clip_config(path: str | Path, config: dict | None = None) -> Path:
    """Write an open_clip model config (default `TINY_CLIP_CONFIG`) as JSON, usable as `--clip_model PATH`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config or TINY_CLIP_CONFIG, indent=2))
    return path


def load_clip_teacher(
    model_name: str,
    pretrained: str | None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
) -> CLIPTeacher | None:
    """Load a frozen CLIP teacher, or return `None` (after one logged line) when its weights cannot be had offline.

    Args:
        model_name: An open_clip model name (`"ViT-B-16"`), `"hf-hub:org/repo"` (config and weights from a Hub
            repo in open_clip's layout), or the path of an open_clip model-config JSON file.
        pretrained: Where the weights come from: an open_clip tag (`"openai"`, `"laion2b_s34b_b88k"`), an
            `"hf-hub:org/repo"` holding open_clip weights, a local checkpoint file, or `None` for random weights.
            Ignored when `model_name` is an `hf-hub:` repo.
        device: Where to put the teacher.
        cache_dir: Download cache (default: the Hugging Face cache, and `~/.cache/clip` for URL weights).

    Raises:
        ValueError: unknown model name or tag, or a config file that does not exist (mistakes, not offline-ness).
    """
    import open_clip

    try:
        config, checkpoint, preprocess, description = _resolve(model_name, pretrained, cache_dir)
    except TeacherUnavailableError as error:
        logger.warning("CLIP teacher unavailable, going on without it: %s", error)
        return None
    if preprocess.get("quick_gelu"):
        config = {**config, "quick_gelu": True}
    if checkpoint is not None and "hf_model_name" in config.get("text_cfg", {}):
        # The checkpoint holds the Hugging Face text tower's weights: do not download its pretrained ones first.
        config = {**config, "text_cfg": {**config["text_cfg"], "hf_model_pretrained": False}}
    try:
        model, tokenizer = build_clip_model(config), _make_tokenizer(config)
    except ValueError as error:
        raise ValueError(f"CLIP model config {model_name}: {error}") from None
    except OSError as error:  # a Hugging Face text tower or tokenizer neither cached nor downloadable
        logger.warning("CLIP teacher unavailable, going on without it: %s: %s", description, first_line(error))
        return None
    if checkpoint is not None:
        if "weights_only" not in inspect.signature(open_clip.load_checkpoint).parameters:
            raise RuntimeError(
                f"open-clip-torch {open_clip.__version__} would unpickle {checkpoint} (it cannot load with "
                "weights_only=True); upgrade it: pip install -U open-clip-torch."
            )
        if _is_torchscript(checkpoint):
            logger.warning("CLIP teacher unavailable, going on without it: %s is a TorchScript archive (it carries "
                           "code, which cdb-vq never runs).", checkpoint)  # fmt: skip
            return None
        if not _looks_like_a_checkpoint(checkpoint):  # a mistake (a labels file, a config), not a missing teacher
            raise ValueError(f"the CLIP checkpoint {checkpoint} is not a checkpoint: neither safetensors nor a file "
                             f"of torch.save.")  # fmt: skip
        try:
            open_clip.load_checkpoint(model, checkpoint, weights_only=True)  # tensors only: never runs code
        except Exception as error:
            if type(error).__name__ == "UnpicklingError":  # the file holds more than tensors: never unpickled
                logger.warning("CLIP teacher unavailable, going on without it: %s holds more than tensors (torch "
                               "refused it with weights_only=True), and is never unpickled.", checkpoint)  # fmt: skip
                return None
            # Weights that do not fit the model config are a mistake, not a missing teacher: say what does not fit.
            detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ValueError(f"the CLIP checkpoint {checkpoint} does not fit the model {model_name}: {detail}") from None
    else:
        logger.info("CLIP teacher %s: no pretrained weights given, the weights are random.", description)
    teacher = CLIPTeacher(model, tokenizer, mean=preprocess.get("mean"), std=preprocess.get("std"), name=description,
                          interpolation=preprocess.get("interpolation", "bicubic"))  # fmt: skip
    # Which weights, not only which file name: a resume must not go on with another checkpoint of the same name.
    teacher.weights_digest = file_sha256(checkpoint)[:12] if checkpoint is not None else None
    return teacher.to(device) if device is not None else teacher


_ATTENTIONAL_POOL = "the CLIP teacher {name!r} uses attentional pooling; its patch tokens are not in the joint space."


def _not_a_vit(name: str, tower: str) -> str:
    return f"the CLIP teacher {name!r} needs an open_clip VisionTransformer image tower (patch tokens); got {tower}."


def _check_vision_config(config: dict, name: str) -> None:
    """The `CLIPTeacher` rule, read from the model config: before any weights are fetched (a ResNet teacher was
    refused only after its download, and offline it was "unavailable", hiding the mistake)."""
    vision = config.get("vision_cfg") or {}
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        raise ValueError(_not_a_vit(name, vision.get("timm_model_name") or "a ModifiedResNet (layers per stage)"))
    if vision.get("attentional_pool"):
        raise ValueError(_ATTENTIONAL_POOL.format(name=name))


def _resolve(model_name: str, pretrained: str | None, cache_dir: str | None) -> tuple[dict, str | None, dict, str]:
    """(model config, checkpoint path or None, preprocessing settings, description)."""
    import open_clip

    if model_name.startswith(HF_HUB_PREFIX):
        repo_id = model_name[len(HF_HUB_PREFIX) :]
        config_file = _hub_file(repo_id, ("open_clip_config.json",), cache_dir)
        full_config = json.loads(Path(config_file).read_text())
        _check_vision_config(full_config.get("model_cfg", full_config), model_name)
        checkpoint = _hub_file(repo_id, OPEN_CLIP_WEIGHT_FILES, cache_dir)
        return full_config.get("model_cfg", full_config), checkpoint, full_config.get("preprocess_cfg", {}), model_name

    if model_name.endswith(".json") or os.path.isfile(model_name):
        path = Path(model_name).expanduser()
        if not path.is_file():
            raise ValueError(f"CLIP model config file {model_name!r} does not exist.")
        try:
            full_config = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"CLIP model config file {model_name!r} is not JSON ({first_line(error)}).") from None
        if not isinstance(full_config, dict):
            raise ValueError(f"CLIP model config file {model_name!r} does not hold an open_clip model config.")
        config, preprocess = full_config.get("model_cfg", full_config), full_config.get("preprocess_cfg", {})
    else:
        model_name = model_name.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}; use a name from open_clip.list_models(), 'hf-hub:org/repo', "
                f"or the path of a model-config JSON file."
            )
        preprocess = {}
    # The teacher's name goes to metrics.json, the trackers and the model card: local files by their base name only
    # (a folder such as "C:\\Users\\John Smith" is not cut cleanly out of free text later).
    shown = [Path(text).name if text and os.path.isfile(text) else text for text in (model_name, pretrained)]
    description = f"{shown[0]} ({shown[1] or 'random weights'})"
    _check_vision_config(config, description)
    if pretrained is None:
        return config, None, preprocess, description
    if pretrained.startswith(HF_HUB_PREFIX):
        return config, _hub_file(pretrained[len(HF_HUB_PREFIX) :], OPEN_CLIP_WEIGHT_FILES, cache_dir), preprocess, description
    if os.path.isfile(pretrained):
        return config, pretrained, preprocess, description
    tag_config = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_config:
        looks_like_path = os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise ValueError(f"CLIP checkpoint file {pretrained!r} does not exist.")
        raise ValueError(
            f"{pretrained!r} is neither a checkpoint file nor an open_clip tag of {model_name!r}; "
            f"its tags are {open_clip.list_pretrained_tags_by_model(model_name)}."
        )
    preprocess = {key: tag_config[key] for key in ("mean", "std", "interpolation", "quick_gelu") if key in tag_config}
    return config, _tag_checkpoint(model_name, pretrained, tag_config, cache_dir), preprocess, description


def _tag_checkpoint(model_name: str, tag: str, tag_config: dict, cache_dir: str | None) -> str:
    """The local file of an open_clip pretrained tag: from the caches, or downloaded when the network is reachable."""
    if tag_config.get("file"):
        return tag_config["file"]
    hub_location = tag_config.get("hf_hub", "")
    if hub_location:
        # open_clip writes "org/repo/" (default file name) or "org/repo/file.bin".
        repo_id, filename = os.path.split(hub_location)
        filenames = (filename,) if filename else OPEN_CLIP_WEIGHT_FILES
        try:
            return _hub_file(repo_id, filenames, cache_dir)
        except TeacherUnavailableError:
            if not tag_config.get("url"):
                raise
    url = tag_config.get("url", "")
    if not url:
        raise TeacherUnavailableError(f"open_clip tag {tag!r} of {model_name!r} has no download location.")
    if urlparse(url).hostname in TORCHSCRIPT_HOSTS:
        raise TeacherUnavailableError(
            f"weights of {model_name} {tag!r} are not in the Hugging Face cache ({hub_location or 'no Hub copy'}), and "
            f"its other copy ({url}) is a TorchScript archive, which cdb-vq never loads (it carries code)."
        )
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return str(target)
    if not reachable(url):
        raise TeacherUnavailableError(
            f"weights of {model_name} {tag!r} are in neither the Hugging Face cache nor {str(target.parent)!r}, "
            f"and {urlparse(url).hostname} cannot be reached."
        )
    from open_clip.pretrained import download_pretrained_from_url

    return download_pretrained_from_url(url, cache_dir=str(target.parent))


def _looks_like_a_checkpoint(path: str | Path) -> bool:
    """Whether `path` starts as a checkpoint does: a zip (torch.save), a pickle's protocol mark (an old torch.save)
    a safetensors header (its little-endian length, then `{`), or a NumPy array (open_clip's big_vision `.npy`)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return head.startswith((b"PK\x03\x04", b"\x80", b"\x93NUMPY")) or (len(head) == 9 and head[8:9] == b"{")


def _is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with compiled code, as OpenAI's CLIP .pt files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def _hub_file(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str:
    """The first of `filenames` found in the Hub cache, else downloaded when the Hub can be reached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached
    if hub_offline() or not reachable(_hub_endpoint()):
        raise TeacherUnavailableError(
            f"{repo_id} ({' or '.join(filenames)}) is not in the local Hugging Face cache and the Hub cannot be reached."
        )
    last_error = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - try the next file name, report the last failure
            last_error = error
    raise TeacherUnavailableError(f"could not download {repo_id} ({' or '.join(filenames)}): {last_error}")


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _make_tokenizer(config: dict):
    """The tokenizer of a model config's text tower (CLIP's BPE, shipped with open_clip, unless it names an HF one)."""
    import open_clip

    text_config = config.get("text_cfg", {})
    context_length = text_config.get("context_length", 77)
    if "hf_tokenizer_name" in text_config:
        return open_clip.tokenizer.HFTokenizer(text_config["hf_tokenizer_name"], context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


# ----------------------------------------------------------------------------------------------------------------
# Prototypes
# ----------------------------------------------------------------------------------------------------------------


def read_prototype_labels(path: str | Path) -> list[str]:
    """Labels (or prompts), one a line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prototype label file {str(path)!r} does not exist.")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label and not label.startswith("#")]
    if not labels:
        raise ValueError(f"prototype label file {str(path)!r} holds no labels (one per line).")
    return labels


def text_prototypes(teacher: CLIPTeacher, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """Prototypes (P, embed_dim) from the CLIP text embeddings of `template.format(label)`."""
    return teacher.encode_text(labels, template)


@torch.no_grad()
def kmeans_prototypes(
    teacher: CLIPTeacher,
    batches: Iterable,
    num_prototypes: int,
    max_batches: int | None = None,
    iterations: int = 20,
    seed: int = 0,
    max_entries: int = 2**24,
) -> torch.Tensor:
    """Prototypes (P, embed_dim): k-means centres of the L2-normalised CLIP patch features of `batches`.

    `batches` yields pixel values (B, 3, H, W) in [-1, 1] or dicts with `pixel_values`; patch features are taken
    at the tower's native grid. The centres are L2-normalised.
    """
    samples = []
    for step, batch in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
        features = teacher.patch_features(pixel_values.to(teacher.device))
        samples.append(F.normalize(flatten_grid(features), dim=-1).cpu())
    if not samples:
        raise ValueError("kmeans_prototypes got no images.")
    num_batches, samples = len(samples), torch.cat(samples)
    if num_prototypes > samples.shape[0]:  # k-means would fill the rest with jittered copies: arbitrary prototypes
        raise ValueError(f"kmeans:{num_prototypes} asks for more prototypes than the {samples.shape[0]} teacher "
                         f"patch features of {num_batches} {'batch' if num_batches == 1 else 'batches'}; ask for fewer, or raise "
                         f"--prototype_kmeans_batches.")  # fmt: skip
    centres = kmeans(samples, num_prototypes, iterations, seed, max_entries)
    return F.normalize(centres, dim=-1)


def save_prototypes(path: str | Path, prototypes: torch.Tensor, labels: Sequence[str] | None = None,
                    source: str | None = None, key: str | None = None) -> Path:  # fmt: skip
    """Save prototypes (P, D) as safetensors; labels, a description of their source and a `key` of everything they
    were built from (see `prototype_key`) go in the metadata. Written whole or not at all."""
    from safetensors.torch import save_file

    from .files import replace_file

    if labels is not None and len(labels) != prototypes.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {prototypes.shape[0]} prototypes.")
    metadata = {"labels": labels_metadata(labels)}
    for name, value in (("source", source), ("key", key)):
        if value is not None:
            metadata[name] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"prototypes": prototypes.detach().float().cpu().contiguous()}
    replace_file(path, lambda target: save_file(tensors, str(target), metadata=metadata))
    return path


def labels_metadata(labels: Sequence[str] | None) -> str:
    """The prototypes' labels as their safetensors metadata holds them (strings only fit there): a JSON list, or
    null."""
    return json.dumps(list(labels) if labels is not None else None)


def labels_from_metadata(text: str | None) -> Any:
    """What a `labels` metadata value holds (None when missing, empty or null); a `ValueError` when it is not JSON."""
    return json.loads(text) if text else None


def load_prototypes(path: str | Path) -> tuple[torch.Tensor, list[str] | None]:
    """Prototypes (P, D) and their labels (or None) from a file written by `save_prototypes`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prototype file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if "prototypes" not in names:
                raise ValueError(f"{str(path)!r} has no 'prototypes' tensor (tensors: {names}).")
            prototypes = handle.get_tensor("prototypes")
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{str(path)!r} is not a safetensors prototype file: {first_line(error)}") from None
    if prototypes.ndim != 2 or prototypes.shape[0] == 0 or not prototypes.is_floating_point():
        raise ValueError(
            f"{str(path)!r}: 'prototypes' must be a (P, D) floating-point tensor with P >= 1, "
            f"got shape {tuple(prototypes.shape)} of {prototypes.dtype}."
        )
    if not torch.isfinite(prototypes).all():
        raise ValueError(f"{str(path)!r}: 'prototypes' holds NaN or infinite values.")
    try:
        labels = labels_from_metadata(metadata.get("labels"))
    except ValueError:
        labels = ()
    if labels is not None and (
        not isinstance(labels, list) or len(labels) != len(prototypes) or not all(isinstance(x, str) for x in labels)
    ):
        raise ValueError(f"{str(path)!r}: its 'labels' metadata must be a JSON list of {len(prototypes)} strings.")
    return prototypes, labels


def prototype_source(path: str | Path, field: str = "source") -> str | None:
    """The `source` (e.g. `"text:labels.txt"`), or another metadata `field` such as `key`, recorded by
    `save_prototypes`; None when the file records none or cannot be read (a damaged cache is rebuilt)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(field)
    except (SafetensorError, OSError):
        return None


def prototype_key(spec: str, template: str, teacher_name: str, seed: int, kmeans_batches: int | None, data: str) -> str:
    """A digest of everything `--prototypes` builds from: the spec, the labels file's text (for `text:`), the prompt
    template, the teacher, and for `kmeans:` the seed, the number of batches and a description of the `data` they are
    drawn from. A cache with another key is stale."""
    kind, _, value = spec.partition(":")
    parts = [spec, teacher_name]
    if kind == "text":
        parts += [Path(value).read_text(encoding="utf-8"), template]
    elif kind == "kmeans":
        parts += [str(seed), str(kmeans_batches), data]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


__all__ = [
    "DEFAULT_TEMPLATE",
    "TINY_CLIP_CONFIG",
    "CLIPTeacher",
    "build_clip_model",
    "kmeans_prototypes",
    "load_clip_teacher",
    "load_prototypes",
    "prototype_key",
    "prototype_source",
    "read_prototype_labels",
    "save_clip_config",
    "save_prototypes",
    "text_prototypes",
]
