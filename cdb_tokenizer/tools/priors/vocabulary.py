"""The token layout of a prior: special tokens, optional class tokens, then the tokenizer's code ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


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
        """Whether sequences start with a class token."""
        return self.num_classes > 0

    @property
    def null_class_token_id(self) -> int | None:
        """The unconditional class token (None for an unconditional prior)."""
        return 3 if self.class_conditional else None

    @property
    def image_token_offset(self) -> int:
        """Prior id of code 0: the special tokens (and class tokens, null class included) come first."""
        return 3 + (self.num_classes + 1 if self.class_conditional else 0)

    @property
    def vocab_size(self) -> int:
        """The prior's vocabulary: special tokens, class tokens and one token per code."""
        return self.image_token_offset + self.codebook_size

    @property
    def prompt_length(self) -> int:
        """Tokens before the first image token: BOS, and the class token of a class-conditional prior."""
        return 2 if self.class_conditional else 1

    def to_prior_ids(self, image_tokens: torch.Tensor | Sequence[int]) -> torch.LongTensor:
        """Code ids in `[0, codebook_size)` -> prior ids (shifted past the special and class tokens)."""
        image_tokens = integer_tensor(image_tokens, "image tokens")
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
        """Which prior ids are codes (not special or class tokens)."""
        return (prior_ids >= self.image_token_offset) & (prior_ids < self.vocab_size)

    def class_token_ids(self, class_labels: torch.Tensor | Sequence[int] | int) -> torch.LongTensor:
        """Class labels in `[0, num_classes)` -> class token ids."""
        if not self.class_conditional:
            raise ValueError("this prior is unconditional (num_classes=0): it takes no class labels.")
        class_labels = integer_tensor(class_labels, "class labels")
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
        image_tokens = integer_tensor(image_tokens, "image tokens")
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
        """The inverse of `to_dict`; a key this version does not know, or a derived id that differs, is refused."""
        vocabulary = cls(values["codebook_size"], values.get("num_classes", 0), values.get("class_names"))
        unknown = sorted(set(values) - set(vocabulary.to_dict()))
        if unknown:
            raise ValueError(f"prior vocabulary has unknown key(s) {unknown}: written by another version of cdb-vq?")
        for key, value in values.items():
            if key not in ("codebook_size", "num_classes", "class_names") and getattr(vocabulary, key) != value:
                raise ValueError(f"prior vocabulary {key}={value} does not match this version's layout ({getattr(vocabulary, key)}).")
        return vocabulary


def integer_tensor(values: torch.Tensor | Sequence[int] | int, what: str) -> torch.LongTensor:
    """`values` as a long tensor; floats (which a cast would truncate: 1.9 became 1), bools and complex numbers are
    refused, naming `what`."""
    tensor = torch.as_tensor(values)
    if tensor.numel() and (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{what} must be integers, got {tensor.flatten()[:8].tolist()} ({tensor.dtype}).")
    return tensor.long()
