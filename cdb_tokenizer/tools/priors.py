"""Transformer priors over cdb-vq tokens: tokenised data sets, the prior's vocabulary, training pieces and sampling.

A prior is a plain transformers causal LM (Llama or GPT-2) over sequences

    BOS [class] image_token_1 ... image_token_N EOS

where the image tokens are the tokenizer's raster-order code ids shifted past the special tokens. `PriorVocabulary`
is the one place that knows that layout. Training-only (datasets): never imported by the modeling files.

Example:

```python
>>> from cdb_tokenizer.tools.priors import load_prior, load_tokenizer, sample_images
>>> prior, vocabulary, prior_config = load_prior("outputs/prior")
>>> tokenizer, processor = load_tokenizer(prior_config["tokenizer"])
>>> images = sample_images(prior, tokenizer, vocabulary, num_images=8, class_labels=3, guidance_scale=3.0, seed=0)
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)

from .data import decode_image, sample_photos

logger = logging.getLogger(__name__)

PRIOR_CONFIG_NAME = "prior_config.json"
ARCHITECTURES = ("llama", "gpt2")


# ---------------------------------------------------------------------------------------------------- vocabulary
@dataclass
class PriorVocabulary:
    r"""
    Token layout of a prior: special tokens first, then optional class tokens, then the image tokens.

    Ids: `BOS = 0`, `EOS = 1`, `PAD = 2`; with `num_classes > 0`, the null class (the unconditional token that
    label dropout and classifier-free guidance use) is `3` and class `c` is `4 + c`; image token (code id) `k` is
    `image_token_offset + k`.

    Args:
        codebook_size (`int`): Number of codes of the tokenizer (`config.codebook_size`).
        num_classes (`int`, *optional*, defaults to 0): Number of classes of a class-conditional prior (0: unconditional).
        class_names (`list[str]`, *optional*): A name per class, kept for people reading `prior_config.json`.
    """

    codebook_size: int
    num_classes: int = 0
    class_names: list[str] | None = field(default=None)

    bos_token_id = 0
    eos_token_id = 1
    pad_token_id = 2

    def __post_init__(self):
        if not isinstance(self.codebook_size, int) or self.codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive integer, got {self.codebook_size!r}.")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {self.num_classes!r}.")
        if self.class_names is not None:
            self.class_names = [str(name) for name in self.class_names]
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"got {len(self.class_names)} class names for {self.num_classes} classes.")

    @property
    def class_conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_class_token_id(self) -> int | None:
        """The unconditional class token (None for an unconditional prior)."""
        return 3 if self.class_conditional else None

    @property
    def image_token_offset(self) -> int:
        return 3 + (self.num_classes + 1 if self.class_conditional else 0)

    @property
    def vocab_size(self) -> int:
        return self.image_token_offset + self.codebook_size

    @property
    def prompt_length(self) -> int:
        """Tokens before the first image token: BOS, and the class token of a class-conditional prior."""
        return 2 if self.class_conditional else 1

    def to_prior_ids(self, image_tokens: torch.Tensor | Sequence[int]) -> torch.LongTensor:
        """Code ids in `[0, codebook_size)` -> prior ids (shifted past the special and class tokens)."""
        image_tokens = torch.as_tensor(image_tokens, dtype=torch.long)
        if image_tokens.numel() and (int(image_tokens.min()) < 0 or int(image_tokens.max()) >= self.codebook_size):
            raise ValueError(
                f"image tokens must be code ids in [0, {self.codebook_size}), got values in "
                f"[{int(image_tokens.min())}, {int(image_tokens.max())}]; was the data tokenised with another tokenizer?"
            )
        return image_tokens + self.image_token_offset

    def to_image_tokens(self, prior_ids: torch.Tensor | Sequence[int]) -> torch.LongTensor:
        """Prior ids -> code ids; raises if any id is a special or class token (or outside the vocabulary)."""
        prior_ids = torch.as_tensor(prior_ids, dtype=torch.long)
        invalid = ~self.is_image_token(prior_ids)
        if bool(invalid.any()):
            bad = sorted(set(prior_ids[invalid].tolist()))[:8]
            specials = f"BOS={self.bos_token_id}, EOS={self.eos_token_id}, PAD={self.pad_token_id}"
            if self.class_conditional:
                specials += f", null class={self.null_class_token_id}, classes={self.null_class_token_id + 1}..{self.image_token_offset - 1}"
            raise ValueError(
                f"prior ids {bad} are not image tokens: image tokens are [{self.image_token_offset}, {self.vocab_size}) "
                f"and the ids below are special ({specials})."
            )
        return prior_ids - self.image_token_offset

    def is_image_token(self, prior_ids: torch.Tensor) -> torch.BoolTensor:
        return (prior_ids >= self.image_token_offset) & (prior_ids < self.vocab_size)

    def class_token_ids(self, class_labels: torch.Tensor | Sequence[int] | int) -> torch.LongTensor:
        """Class labels in `[0, num_classes)` -> class token ids."""
        if not self.class_conditional:
            raise ValueError("this prior is unconditional (num_classes=0): it takes no class labels.")
        class_labels = torch.as_tensor(class_labels, dtype=torch.long)
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}), got values in "
                f"[{int(class_labels.min())}, {int(class_labels.max())}]."
            )
        return class_labels + self.null_class_token_id + 1

    def prompt_ids(self, batch_size: int, class_labels: torch.Tensor | Sequence[int] | int | None = None) -> torch.LongTensor:
        """(batch_size, prompt_length) prompts: BOS, then the class token (the null class when no labels are given)."""
        bos = torch.full((batch_size, 1), self.bos_token_id, dtype=torch.long)
        if not self.class_conditional:
            if class_labels is not None:
                raise ValueError("this prior is unconditional (num_classes=0): it takes no class labels.")
            return bos
        if class_labels is None:
            classes = torch.full((batch_size,), self.null_class_token_id, dtype=torch.long)
        else:
            classes = self.class_token_ids(class_labels).reshape(-1)
            if classes.numel() == 1:  # one label for the whole batch
                classes = classes.expand(batch_size)
            if classes.shape[0] != batch_size:
                raise ValueError(f"got {classes.shape[0]} class labels for {batch_size} sequences.")
        return torch.cat([bos, classes[:, None]], dim=1)

    def build_input_ids(
        self, image_tokens: torch.Tensor, class_labels: torch.Tensor | Sequence[int] | None = None
    ) -> torch.LongTensor:
        """Code ids (B, N) -> training sequences (B, prompt_length + N + 1): BOS [class] image tokens EOS."""
        image_tokens = torch.as_tensor(image_tokens, dtype=torch.long)
        if image_tokens.ndim != 2:
            raise ValueError(f"image_tokens must have shape (batch, num_tokens), got {tuple(image_tokens.shape)}.")
        batch_size = image_tokens.shape[0]
        eos = torch.full((batch_size, 1), self.eos_token_id, dtype=torch.long)
        return torch.cat([self.prompt_ids(batch_size, class_labels), self.to_prior_ids(image_tokens), eos], dim=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready layout; the derived ids are written for readers and checked on load."""
        return {
            "codebook_size": self.codebook_size,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "null_class_token_id": self.null_class_token_id,
            "image_token_offset": self.image_token_offset,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PriorVocabulary:
        vocabulary = cls(values["codebook_size"], values.get("num_classes", 0), values.get("class_names"))
        for key, value in values.items():
            if key not in ("codebook_size", "num_classes", "class_names") and getattr(vocabulary, key) != value:
                raise ValueError(f"prior vocabulary {key}={value} does not match this version's layout ({getattr(vocabulary, key)}).")
        return vocabulary


# ---------------------------------------------------------------------------------------------------- tokenizer I/O
def load_tokenizer(
    name_or_path: str, device: str | torch.device | None = None, trust_remote_code: bool = False, **kwargs: Any
):
    """Load a cdb-vq tokenizer (model and image processor) from a folder or a Hub repo id, in eval mode.

    Without `trust_remote_code` (the default) this package's own classes load the weights, so no code that ships with
    the folder or repository runs; with it, `AutoModel` / `AutoImageProcessor` use that code (`auto_map`).
    Without a saved image processor, a `CDBVQImageProcessor` at the model's `config.resolution` is used.
    Extra keyword arguments (e.g. `revision`) go to `from_pretrained`.
    """
    from ..image_processing_cdb_vq import CDBVQImageProcessor
    from ..modeling_cdb_vq import CDBVQModel

    # Only the caller's own `trust_remote_code` is passed on (never a literal True).
    model_class = AutoModel if trust_remote_code else CDBVQModel
    processor_class = AutoImageProcessor if trust_remote_code else CDBVQImageProcessor
    options = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}
    model = model_class.from_pretrained(name_or_path, **options, **kwargs).eval()
    try:
        processor = processor_class.from_pretrained(name_or_path, **options, **kwargs)
    except (OSError, ValueError):
        resolution = model.config.resolution
        processor = CDBVQImageProcessor(size={"height": resolution, "width": resolution})
    if device is not None:
        model.to(device)
    return model, processor


def processor_image_size(processor) -> tuple[int, int] | None:
    """(height, width) of the images `processor` makes, when it makes a fixed size."""
    size = getattr(processor, "size", None) or {}
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if height is None and isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    return (int(height), int(width)) if height and width else None


# ---------------------------------------------------------------------------------------------------- data sets
def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenize_dataset(
    dataset,
    model,
    processor,
    image_column: str = "image",
    label_column: str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    cache_file_name: str | None = None,
):
    r"""
    Map an image data set to token sequences for a prior, with `Dataset.map(batched=True)`.

    Args:
        dataset (`datasets.Dataset`): Images in `image_column`: anything `cdb_tokenizer.tools.data.decode_image` reads
            (PIL images, arrays, undecoded `{"bytes", "path"}` values as `load_image_dataset` gives, paths).
            Unreadable images are skipped with a warning.
        model (`CDBVQModel`): The tokenizer; its `get_image_tokens` gives raster-order code ids.
        processor (`CDBVQImageProcessor`): Turns the images into `pixel_values` (its size sets the token grid).
        image_column (`str`, *optional*, defaults to `"image"`): Column holding the images.
        label_column (`str`, *optional*): Column holding integer class labels, kept as `label`. When `None`, a
            `label` column is kept if the data set has one.
        batch_size (`int`, *optional*, defaults to 32): Images per `map` batch.
        device (`str` or `torch.device`, *optional*): Where the tokenizer runs; defaults to CUDA when present. The
            model is moved back afterwards.
        cache_file_name (`str`, *optional*): Arrow file to cache the result in. As everywhere in `datasets`, an
            existing file of that name is loaded as is: delete it after changing the tokenizer or the data.

    Returns:
        `datasets.Dataset` with `image_tokens` (list of ints, length h * w) and, with labels, `label` (a `ClassLabel`
        when the source column is one). Without `cache_file_name` the result is cached by `datasets` under a
        fingerprint of the data, the tokenizer's weights and config, and the processor.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"tokenize_dataset expects a datasets.Dataset, got {type(dataset).__name__}"
            + ("; pick a split first, e.g. dataset['train']." if isinstance(dataset, datasets.DatasetDict) else ".")
        )
    if image_column not in dataset.column_names:
        raise ValueError(f"image column {image_column!r} not found; the data set has columns {dataset.column_names}.")
    if label_column is None and "label" in dataset.column_names and image_column != "label":
        label_column = "label"
    elif label_column is not None and label_column not in dataset.column_names:
        raise ValueError(f"label column {label_column!r} not found; the data set has columns {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError("the data set is empty: there is nothing to tokenise.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")

    features = {"image_tokens": datasets.List(datasets.Value("int32"))}
    if label_column is not None:
        label_feature = dataset.features[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            features["label"] = label_feature
        elif isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")):
            features["label"] = datasets.Value("int64")
        else:
            raise ValueError(
                f"label column {label_column!r} must hold integer class labels, got {label_feature}; "
                f"encode it first, e.g. dataset.class_encode_column({label_column!r})."
            )

    device = torch.device(device) if device is not None else _default_device()
    original_device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    fingerprint = hashlib.sha256(
        "|".join(
            [dataset._fingerprint, model.config.to_json_string(), _weights_fingerprint(model),
             processor.to_json_string(), image_column, str(label_column)]
        ).encode()
    ).hexdigest()[:32]  # fmt: skip

    def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
        images = [decode_image(value) for value in batch[image_column]]
        readable = [index for index, image in enumerate(images) if image is not None]
        if len(readable) < len(images):  # an unreadable file is skipped (and counted), not a crash mid-run
            skipped[0] += len(images) - len(readable)
            logger.warning("Skipping %d unreadable image(s).", len(images) - len(readable))
        output: dict[str, list] = {"image_tokens": []}
        if label_column is not None:
            output["label"] = [batch[label_column][index] for index in readable]
        if readable:
            pixel_values = processor([images[index] for index in readable], return_tensors="pt").pixel_values
            tokens = model.get_image_tokens(pixel_values.to(device=device, dtype=dtype))
            output["image_tokens"] = tokens.cpu().tolist()
        return output

    skipped = [0]
    model.to(device).eval()
    try:
        tokenized = dataset.map(
            tokenize_batch,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            features=datasets.Features(features),
            cache_file_name=cache_file_name,
            new_fingerprint=fingerprint,
            desc="tokenizing",
        )
    finally:
        model.to(original_device).train(was_training)
    if len(tokenized) == 0:
        raise ValueError(f"none of the {len(dataset)} images in column {image_column!r} could be read.")
    return tokenized


def photo_crops_dataset(
    num_crops_per_photo: int = 64,
    side_range: tuple[float, float] = (0.25, 0.5),
    seed: int = 0,
    source: str = "skimage",
):
    """The embedded default image data set: random square crops of the photos that ship in pip packages.

    Each crop's side is a random share (uniform in `side_range`) of its photo's shorter side, and its `label` is the photo's index
    in `sample_photos(source)` (a `ClassLabel`, 16 classes for scikit-image), so a class-conditional prior learns one
    class per photo. A different `seed` gives different crops of the same photos (use it for a validation split).
    """
    import datasets

    low, high = side_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"side_range must satisfy 0 < low <= high <= 1, got {side_range}.")
    if num_crops_per_photo < 1:
        raise ValueError(f"num_crops_per_photo must be at least 1, got {num_crops_per_photo}.")
    photos = sample_photos(source)
    rng = random.Random(seed)
    images, labels = [], []
    for index, photo in enumerate(photos):
        width, height = photo.size
        for _ in range(num_crops_per_photo):
            side = max(1, round(min(width, height) * rng.uniform(low, high)))
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
            images.append(photo.crop((left, top, left + side, top + side)))
            labels.append(index)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"photo_{i}" for i in range(len(photos))])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class PriorCollator:
    r"""
    Turns tokenised examples (`image_tokens`, optional `label`) into a causal-LM batch: `input_ids`
    (BOS [class] image tokens EOS), `attention_mask` and `labels` (the prompt is masked with -100, so the loss covers
    the image tokens and EOS).

    Args:
        vocabulary (`PriorVocabulary`): The token layout.
        num_image_tokens (`int`): Tokens per image; every example must have exactly this many.
        label_dropout (`float`, *optional*, defaults to 0.0): Probability of replacing the class token with the null
            class (classifier-free guidance training). Use 0 for validation.
        generator (`torch.Generator`, *optional*): Random source for label dropout.
    """

    vocabulary: PriorVocabulary
    num_image_tokens: int
    label_dropout: float = 0.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PriorCollator got an empty batch.")
        lengths = {len(example["image_tokens"]) for example in examples}
        if lengths != {self.num_image_tokens}:
            raise ValueError(
                f"every example must have {self.num_image_tokens} image tokens, got lengths {sorted(lengths)}; "
                f"tokenise all images at one size (the processor's size) with the same tokenizer."
            )
        image_tokens = torch.stack([torch.as_tensor(example["image_tokens"], dtype=torch.long) for example in examples])
        class_labels = None
        if self.vocabulary.class_conditional:
            if any(example.get("label") is None for example in examples):
                raise ValueError("a class-conditional prior needs a `label` for every example.")
            class_labels = torch.as_tensor([int(example["label"]) for example in examples])
        input_ids = self.vocabulary.build_input_ids(image_tokens, class_labels)
        if class_labels is not None and self.label_dropout > 0:
            drop = torch.rand(len(examples), generator=self.generator) < self.label_dropout
            input_ids[drop, 1] = self.vocabulary.null_class_token_id
        labels = input_ids.clone()
        labels[:, : self.vocabulary.prompt_length] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def build_prior(
    vocabulary: PriorVocabulary,
    num_image_tokens: int,
    architecture: str = "llama",
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 8,
    intermediate_size: int | None = None,
    dropout: float = 0.0,
) -> PreTrainedModel:
    """A freshly initialised causal LM over `vocabulary`, sized for BOS [class] + `num_image_tokens` + EOS.

    `architecture` is `"llama"` (rotary positions, SwiGLU) or `"gpt2"` (learned positions). `intermediate_size`
    defaults to 4 x `hidden_size`. The generation config is set to sample exactly one image per call.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}.")
    intermediate_size = intermediate_size or 4 * hidden_size
    max_length = vocabulary.prompt_length + num_image_tokens + 1
    special = {
        "bos_token_id": vocabulary.bos_token_id,
        "eos_token_id": vocabulary.eos_token_id,
        "pad_token_id": vocabulary.pad_token_id,
    }
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocabulary.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_length,
            attention_dropout=dropout,
            **special,
        )
    else:
        config = GPT2Config(
            vocab_size=vocabulary.vocab_size,
            n_embd=hidden_size,
            n_inner=intermediate_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_length,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **special,
        )
    prior = AutoModelForCausalLM.from_config(config)
    prior.generation_config = GenerationConfig(
        max_new_tokens=num_image_tokens, min_new_tokens=num_image_tokens, do_sample=True, **special
    )
    return prior


@torch.no_grad()
def validation_bits_per_token(
    prior: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    vocabulary: PriorVocabulary,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean negative log-likelihood of the image tokens (not EOS) over `batches`, in bits per token and nats.

    `reduce` sums a tensor across processes (e.g. `lambda t: accelerator.reduce(t, "sum")`). A uniform prior over
    the codebook scores `log2(codebook_size)` bits per token.
    """
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            logits = prior(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
            targets = input_ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            mask = vocabulary.is_image_token(targets)
            totals += torch.stack([nll[mask].double().sum(), mask.sum().double()])
    finally:
        prior.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    if totals[1] == 0:
        raise ValueError("validation_bits_per_token got no image tokens: the validation data is empty.")
    nats = float(totals[0] / totals[1])
    return {"bits_per_token": nats / math.log(2), "nll": nats, "num_tokens": int(totals[1])}


# ---------------------------------------------------------------------------------------------------- saving
def save_prior(
    prior: PreTrainedModel,
    vocabulary: PriorVocabulary,
    output_dir: str | Path,
    num_image_tokens: int,
    tokenizer: str | None = None,
    image_size: tuple[int, int] | None = None,
    **extra: Any,
) -> Path:
    """`prior.save_pretrained(output_dir)` plus `prior_config.json`: vocabulary layout, tokens per image, the
    tokenizer's folder or Hub id (what `sample_prior.py` decodes with) and the image size the tokens came from."""
    output_dir = Path(output_dir)
    prior.save_pretrained(output_dir)
    prior_config = {
        "vocabulary": vocabulary.to_dict(),
        "num_image_tokens": num_image_tokens,
        "tokenizer": tokenizer,
        "image_size": list(image_size) if image_size else None,
        **extra,
    }
    (output_dir / PRIOR_CONFIG_NAME).write_text(json.dumps(prior_config, indent=2) + "\n")
    return output_dir


def load_prior(
    name_or_path: str | Path, device: str | torch.device | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, PriorVocabulary, dict[str, Any]]:
    """Load a prior saved by `save_prior` (a folder or Hub repo id): (model in eval mode, vocabulary, prior config)."""
    from huggingface_hub import hf_hub_download

    path = Path(name_or_path)
    if path.is_dir():
        config_file = path / PRIOR_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {path} is not a prior saved by train_prior.py / save_prior.")
    else:
        config_file = hf_hub_download(str(name_or_path), PRIOR_CONFIG_NAME, revision=kwargs.get("revision"))
    prior_config = json.loads(Path(config_file).read_text())
    vocabulary = PriorVocabulary.from_dict(prior_config["vocabulary"])
    prior = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
    if prior.config.vocab_size != vocabulary.vocab_size:
        raise ValueError(f"the prior's vocab_size {prior.config.vocab_size} does not match prior_config.json ({vocabulary.vocab_size}).")
    if device is not None:
        prior.to(device)
    return prior, vocabulary, prior_config


# ---------------------------------------------------------------------------------------------------- sampling
class ImageTokenLogitsProcessor(LogitsProcessor):
    """Keeps generation on image tokens: every id outside `[image_token_offset, vocab_size)` gets `-inf`."""

    def __init__(self, vocabulary: PriorVocabulary):
        self.vocabulary = vocabulary

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.vocabulary.image_token_offset : self.vocabulary.vocab_size] = True
        return scores.masked_fill(~allowed, float("-inf"))


@torch.no_grad()
def sample_image_tokens(
    prior: PreTrainedModel,
    vocabulary: PriorVocabulary,
    num_images: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    class_labels: Sequence[int] | torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    seed: int | None = None,
    num_image_tokens: int | None = None,
) -> torch.LongTensor:
    r"""
    Sample code ids (num_images, num_image_tokens) from a prior with `generate`.

    Args:
        temperature (`float`, *optional*, defaults to 1.0): Softmax temperature; 0 means greedy decoding.
        top_k (`int`, *optional*): Keep only the k most likely tokens at each step.
        top_p (`float`, *optional*): Nucleus sampling: keep the smallest set of tokens with this total probability.
        class_labels (`int` or sequence of `int`, *optional*): One label for all images or one per image, for a
            class-conditional prior; without labels a class-conditional prior samples unconditionally (null class).
        guidance_scale (`float`, *optional*, defaults to 1.0): Classifier-free guidance scale
            `uncond + s * (cond - uncond)` on log-probabilities, with the null class as the unconditional branch
            (transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`). 1 disables it; needs `class_labels`.
        seed (`int`, *optional*): Makes sampling reproducible without touching the global random state.
        num_image_tokens (`int`, *optional*): Tokens per image; defaults to `prior.generation_config.max_new_tokens`
            (set by `build_prior`).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    num_image_tokens = num_image_tokens or prior.generation_config.max_new_tokens
    if not num_image_tokens:
        raise ValueError("pass num_image_tokens: the prior's generation config does not say how many tokens an image has.")
    if prior.config.vocab_size != vocabulary.vocab_size:
        raise ValueError(f"the prior's vocab_size {prior.config.vocab_size} does not match the vocabulary's {vocabulary.vocab_size}.")
    guided = guidance_scale != 1.0
    if guided and (not vocabulary.class_conditional or class_labels is None):
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a class-conditional prior and class_labels.")

    device = next(prior.parameters()).device
    input_ids = vocabulary.prompt_ids(num_images, class_labels).to(device)
    generate_kwargs: dict[str, Any] = {}
    if guided:
        generate_kwargs["negative_prompt_ids"] = vocabulary.prompt_ids(num_images).to(device)
        generate_kwargs["negative_prompt_attention_mask"] = torch.ones_like(generate_kwargs["negative_prompt_ids"])
    generation_config = GenerationConfig(
        max_new_tokens=num_image_tokens,
        min_new_tokens=num_image_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=top_k,
        top_p=top_p,
        guidance_scale=guidance_scale if guided else None,
        bos_token_id=vocabulary.bos_token_id,
        eos_token_id=vocabulary.eos_token_id,
        pad_token_id=vocabulary.pad_token_id,
    )
    was_training = prior.training
    prior.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            output = prior.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([ImageTokenLogitsProcessor(vocabulary)]),
                **generate_kwargs,
            )
    finally:
        prior.train(was_training)
    return vocabulary.to_image_tokens(output[:, input_ids.shape[1] :].cpu())


@torch.no_grad()
def sample_images(
    prior: PreTrainedModel,
    tokenizer_model,
    vocabulary: PriorVocabulary,
    num_images: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    class_labels: Sequence[int] | torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    seed: int | None = None,
    image_size: tuple[int, int] | None = None,
    num_image_tokens: int | None = None,
) -> torch.FloatTensor:
    """Sample images (num_images, 3, H, W) in [-1, 1]: `sample_image_tokens`, then the tokenizer's
    `decode_image_tokens`. `image_size` (height, width) in pixels picks the token grid; by default the tokenizer's
    resolution, or a square grid. See `sample_image_tokens` for the sampling arguments."""
    tokens = sample_image_tokens(
        prior, vocabulary, num_images, temperature=temperature, top_k=top_k, top_p=top_p,
        class_labels=class_labels, guidance_scale=guidance_scale, seed=seed, num_image_tokens=num_image_tokens,
    )  # fmt: skip
    if vocabulary.codebook_size != tokenizer_model.config.codebook_size:
        raise ValueError(
            f"the prior was trained on {vocabulary.codebook_size} codes but the tokenizer has "
            f"{tokenizer_model.config.codebook_size}: decode with the tokenizer the prior was trained on."
        )
    height, width = image_size if image_size else (None, None)
    device = next(tokenizer_model.parameters()).device
    return tokenizer_model.decode_image_tokens(tokens.to(device), height=height, width=width)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, 3, H, W) in [-1, 1] as one PNG grid (`nrow` images per row, default about square)."""
    from torchvision.utils import save_image

    from .evaluation import to_unit_range

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    save_image(to_unit_range(images), path, nrow=nrow, padding=2, pad_value=1.0)
    return path


__all__ = [
    "ImageTokenLogitsProcessor",
    "PriorCollator",
    "PriorVocabulary",
    "build_prior",
    "load_prior",
    "load_tokenizer",
    "photo_crops_dataset",
    "processor_image_size",
    "sample_image_tokens",
    "sample_images",
    "save_image_grid",
    "save_prior",
    "tokenize_dataset",
    "validation_bits_per_token",
]
