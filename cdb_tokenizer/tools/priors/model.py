"""The prior model: batches of token sequences, building a Llama / GPT-2 causal LM, validation bits per token, saving and loading."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, PreTrainedModel

from ..files import relative_location
from ..loading import is_local_path
from .vocabulary import PriorVocabulary

PRIOR_CONFIG_NAME = "prior_config.json"
ARCHITECTURES = ("llama", "gpt2")


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
        if class_labels is not None:
            input_ids = drop_class_labels(input_ids, self.vocabulary, self.label_dropout, self.generator)
        labels = input_ids.clone()
        labels[:, : self.vocabulary.prompt_length] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def drop_class_labels(
    input_ids: torch.LongTensor, vocabulary: PriorVocabulary, probability: float, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """`input_ids` (B, L) of a class-conditional prior with each row's class token replaced by the null class with
    `probability` (classifier-free guidance training); the draw is on the CPU, from `generator`."""
    if probability <= 0 or not vocabulary.class_conditional:
        return input_ids
    drop = (torch.rand(input_ids.shape[0], generator=generator) < probability).to(input_ids.device)
    input_ids = input_ids.clone()
    input_ids[drop, 1] = vocabulary.null_class_token_id
    return input_ids


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
    local = tokenizer is not None and Path(tokenizer).expanduser().is_dir()
    far_tokenizer = None
    if local:
        # A local tokenizer is recorded relative to the prior's folder ("../tokenizer"): found from any working
        # directory, never mistaken for a Hub id, and no absolute local path in the config (far away: its name only).
        relative = relative_location(tokenizer, output_dir)
        if relative is None:
            far_tokenizer = Path(tokenizer).expanduser().resolve().name
        tokenizer, local = relative, relative is not None
    prior_config = {
        "vocabulary": vocabulary.to_dict(),
        "num_image_tokens": num_image_tokens,
        "tokenizer": tokenizer,
        "tokenizer_relative_to_prior": local,
        "image_size": list(image_size) if image_size else None,
        **({"tokenizer_name": far_tokenizer} if far_tokenizer else {}),
        **extra,
    }
    (output_dir / PRIOR_CONFIG_NAME).write_text(json.dumps(prior_config, indent=2) + "\n")
    return output_dir


def load_prior_config(name_or_path: str | Path, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(`prior_config.json` of a prior saved by `save_prior`, where to load its weights from: the folder or Hub id).
    A mistyped local path is a `FileNotFoundError`, never a Hub lookup."""
    from huggingface_hub import hf_hub_download

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_file = path / PRIOR_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {path} is not a prior saved by train_prior.py / save_prior.")
        prior_config = json.loads(config_file.read_text())
        tokenizer = prior_config.get("tokenizer")
        # Recorded relative to this folder since 2026-11-30 (and marked so); earlier priors kept the path as typed.
        if prior_config.get("tokenizer_relative_to_prior") is True and isinstance(tokenizer, str):
            prior_config["tokenizer"] = str((path / tokenizer).resolve())
        return prior_config, str(path)
    if isinstance(name_or_path, Path) or is_local_path(str(name_or_path)):
        problem = "is not a folder" if path.exists() else "no such folder"
        raise FileNotFoundError(f"prior {str(name_or_path)!r}: {problem} (give the folder train_prior.py wrote).")
    config_file = hf_hub_download(str(name_or_path), PRIOR_CONFIG_NAME, revision=revision)
    return json.loads(Path(config_file).read_text()), str(name_or_path)


def load_prior(
    name_or_path: str | Path, device: str | torch.device | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, PriorVocabulary, dict[str, Any]]:
    """Load a prior saved by `save_prior` (a folder or Hub repo id): (model in eval mode, vocabulary, prior config)."""
    prior_config, source = load_prior_config(name_or_path, revision=kwargs.get("revision"))
    vocabulary = PriorVocabulary.from_dict(prior_config["vocabulary"])
    # A prior is a stock transformers causal LM: no folder's own code runs (nor is the user asked) unless the
    # caller passed trust_remote_code=True.
    kwargs.setdefault("trust_remote_code", False)
    prior = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    if prior.config.vocab_size != vocabulary.vocab_size:
        raise ValueError(f"the prior's vocab_size {prior.config.vocab_size} does not match prior_config.json ({vocabulary.vocab_size}).")
    if device is not None:
        prior.to(device)
    return prior, vocabulary, prior_config
