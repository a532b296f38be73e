"""Sampling images from a prior: constrained generation of image tokens, classifier-free guidance, decoding and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .model import is_positive_int
from .vocabulary import PriorVocabulary

# Below this, the logits divided by the temperature can overflow (1e-40 made them infinite, and torch's multinomial
# failed); sampling there is greedy in all but name, and 0 says so.
MIN_TEMPERATURE = 1e-4
# The seeds torch's `manual_seed` takes: any 64-bit integer, signed or not.
SEED_RANGE = (-(2**63), 2**64)


class ImageTokenLogitsProcessor(LogitsProcessor):
    """Keeps generation on image tokens: every id outside `[image_token_offset, vocab_size)` gets `-inf`."""

    def __init__(self, vocabulary: PriorVocabulary):
        self.vocabulary = vocabulary

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.vocabulary.image_token_offset : self.vocabulary.vocab_size] = True
        # NaN logits made torch's multinomial fail, and greedy decoding pick code 0.
        if not bool(torch.isfinite(scores[:, allowed]).all()):
            raise ValueError("the prior's logits are not finite (damaged weights?): it cannot be sampled from.")
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
        temperature (`float`, *optional*, defaults to 1.0): Softmax temperature; 0 means greedy decoding, and
            others must be at least `MIN_TEMPERATURE` (below it the scaled logits overflow).
        top_k (`int`, *optional*): Keep only the k most likely tokens at each step.
        top_p (`float`, *optional*): Nucleus sampling: keep the smallest set of tokens with this total probability.
        class_labels (`int` or sequence of `int`, *optional*): One label for all images or one per image, for a
            class-conditional prior; without labels a class-conditional prior samples unconditionally (null class).
        guidance_scale (`float`, *optional*, defaults to 1.0): Classifier-free guidance scale
            `uncond + s * (cond - uncond)` on log-probabilities, with the null class as the unconditional branch
            (transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`). 1 disables it; needs `class_labels`.
        seed (`int`, *optional*): Makes sampling reproducible without touching the global random state; any
            integer torch takes (`SEED_RANGE`).
        num_image_tokens (`int`, *optional*): Tokens per image; defaults to `prior.generation_config.max_new_tokens`
            (set by `build_prior`).
    """
    if not is_positive_int(num_images):
        raise ValueError(f"num_images must be an integer of at least 1, got {num_images!r}.")
    if not math.isfinite(temperature) or temperature < 0:  # NaN was taken for greedy, inf ended inside torch
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}.")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}: the "
                         f"logits divided by it would overflow.")  # fmt: skip
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}.")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and not is_positive_int(top_k):
        raise ValueError(f"top_k must be an integer of at least 1, got {top_k!r}.")
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
    # transformers fills every setting left None from `prior.generation_config` (a saved prior's could set top_p,
    # suppress_tokens, guidance or num_return_sequences): during `generate` the prior carries only the special ids.
    generation_config = GenerationConfig(
        max_new_tokens=num_image_tokens,
        min_new_tokens=num_image_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        # 0, not None, when sampling: transformers reads an unset top_k as its default of 50, which kept only the 50
        # likeliest codes (greedy decoding takes none: it would warn that the flag is ignored).
        top_k=(top_k or 0) if temperature > 0 else None,
        top_p=top_p,
        guidance_scale=guidance_scale if guided else None,
        bos_token_id=vocabulary.bos_token_id,
        eos_token_id=vocabulary.eos_token_id,
        pad_token_id=vocabulary.pad_token_id,
    )
    was_training, saved_generation_config = prior.training, prior.generation_config
    prior.eval()
    prior.generation_config = GenerationConfig(
        bos_token_id=vocabulary.bos_token_id, eos_token_id=vocabulary.eos_token_id, pad_token_id=vocabulary.pad_token_id
    )
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
        prior.generation_config = saved_generation_config
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
    batch_size: int | None = None,
    progress: bool = False,
    return_tokens: bool = False,
) -> torch.FloatTensor | tuple[torch.FloatTensor, torch.LongTensor]:
    """Sample images (num_images, 3, H, W) in [-1, 1], on the CPU: `sample_image_tokens`, then the tokenizer's
    `decode_image_tokens`, `batch_size` images at a time (default: all at once; `progress` shows a bar over the
    batches). `image_size` (height, width) in pixels picks the token grid; by default the tokenizer's resolution. A
    tokenizer with another codebook size, or a grid that does not hold the prior's tokens per image (see
    `token_image_size`), is refused before sampling. See `sample_image_tokens` for the sampling arguments. With
    `return_tokens`, returns `(images, tokens)`: the (num_images, h, w) code ids the images were decoded from.

    Batch k is sampled with the seed `batch_seed(seed, k)` (the first: `seed` itself), so a result depends on the
    seed, the batch size and the class labels of its batch; the same call gives the same images."""
    if not is_positive_int(num_images):
        raise ValueError(f"num_images must be an integer of at least 1, got {num_images!r}.")
    if batch_size is not None and not is_positive_int(batch_size):
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}.")
    if vocabulary.codebook_size != tokenizer_model.config.codebook_size:
        raise ValueError(
            f"the prior was trained on {vocabulary.codebook_size} codes but the tokenizer has "
            f"{tokenizer_model.config.codebook_size}: decode with the tokenizer the prior was trained on."
        )
    height, width = image_size or (tokenizer_model.config.resolution,) * 2
    count = num_image_tokens or prior.generation_config.max_new_tokens
    grid = tokenizer_model.token_grid_size(height, width)
    if count and math.prod(grid) != count:
        raise ValueError(
            f"the prior makes {count} tokens per image, but {height}x{width} images have a {grid[0]}x{grid[1]} token "
            f"grid: pass the image_size the tokens were made at."
        )
    from tqdm.auto import tqdm

    labels = per_image_labels(class_labels, num_images)
    batch_size = batch_size or num_images
    device = next(tokenizer_model.parameters()).device
    images, grids = [], []
    for index, start in enumerate(tqdm(range(0, num_images, batch_size), desc="batches", disable=not progress)):
        count = min(batch_size, num_images - start)
        tokens = sample_image_tokens(
            prior, vocabulary, count, temperature=temperature, top_k=top_k, top_p=top_p,
            class_labels=None if labels is None else labels[start : start + count], guidance_scale=guidance_scale,
            seed=batch_seed(seed, index), num_image_tokens=num_image_tokens,
        )  # fmt: skip
        # On the CPU as they come: the batch size bounds the device's memory, and the grid is saved from the CPU.
        images.append(tokenizer_model.decode_image_tokens(tokens.to(device), height=height, width=width).cpu())
        grids.append(tokens.cpu().view(count, *grid))
    return (torch.cat(images), torch.cat(grids)) if return_tokens else torch.cat(images)


def per_image_labels(class_labels: Sequence[int] | torch.Tensor | int | None, num_images: int) -> torch.Tensor | None:
    """`class_labels` as one label per image (one label is every image's), so that batches can take their share;
    their values are checked when a batch's prompts are built."""
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.numel() == 1:
        return labels.expand(num_images)
    if labels.numel() != num_images:
        raise ValueError(f"got {labels.numel()} class labels for {num_images} images.")
    return labels


def batch_seed(seed: int | None, index: int) -> int | None:
    """The seed of batch `index` of a sampling run: `seed` for the first (a run of one batch samples as with
    `sample_image_tokens(seed=seed)`), a hash of both for the others, so no two batches draw alike."""
    from ..steps import derived_seed

    if seed is None or index == 0:
        return seed
    return derived_seed(seed % 2**64, index)  # as torch reads the seed: -1 and 2**64 - 1 are one, for every batch


def token_image_size(
    tokenizer_model, num_image_tokens: int, image_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(height, width) in pixels to decode `num_image_tokens` tokens per image at: `image_size` (default: the
    tokenizer's resolution) when its token grid holds that many, else the square grid of that many tokens (data
    tokenised at another size), side x downsampling factor pixels. Any other count is refused."""
    height, width = image_size or (tokenizer_model.config.resolution,) * 2
    grid = tokenizer_model.token_grid_size(height, width)
    if math.prod(grid) == num_image_tokens:
        return height, width
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens:
        raise ValueError(
            f"{num_image_tokens} tokens per image fit neither the {height}x{width} images "
            f"({grid[0]}x{grid[1]} tokens) nor a square token grid: tokenise the images at the tokenizer's size."
        )
    factor = tokenizer_model.config.downsampling_factor
    return side * factor, side * factor


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, 3, H, W) in [-1, 1] as one PNG grid (`nrow` images per row, default about square), whatever
    the suffix, whole or not at all, and never through a link or into a device (`replace_file`)."""
    from torchvision.utils import save_image

    from ..evaluation import to_unit_range
    from ..files import replace_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))

    def write(temporary: Path) -> None:
        save_image(to_unit_range(images), temporary, nrow=nrow, padding=2, pad_value=1.0, format="PNG")

    return replace_file(path, write)
