"""Transformer priors over cdb-vq tokens, one module per concept:

- `vocabulary`: `PriorVocabulary`, the token layout;
- `token_data`: tokenised data sets (`tokenize_dataset`, `photo_crops_dataset`);
- `model`: batches, building, validating, saving and loading the prior and its tokenizer (`PriorCollator`,
  `build_prior`, `load_prior`, `load_prior_tokenizer`, ...);
- `sampling`: generating image tokens and images (`sample_image_tokens`, `sample_images`, `save_image_grid`).

Loading a tokenizer is not prior code: `cdb_tokenizer.tools.loading.load_tokenizer` (re-exported here);
`load_prior_tokenizer` adds what a prior needs (its codebook checked against the one it was trained on).

A prior is a plain transformers causal LM (Llama or GPT-2) over sequences

    BOS [class] image_token_1 ... image_token_N EOS

where the image tokens are the tokenizer's raster-order code ids shifted past the special tokens. `PriorVocabulary`
is the one place that knows that layout. Training-only (datasets): never imported by the modeling files.

Example:

```python
>>> from cdb_tokenizer.tools.priors import load_prior, load_prior_tokenizer, sample_images
>>> prior, vocabulary, prior_config = load_prior("outputs/prior")
>>> tokenizer, processor = load_prior_tokenizer(prior_config["tokenizer"], prior_config)
>>> images = sample_images(prior, tokenizer, vocabulary, num_images=8, class_labels=3, guidance_scale=3.0, seed=0)
```
"""

from ..loading import load_tokenizer, processor_image_size
from .model import (
    ARCHITECTURES,
    PRIOR_CONFIG_NAME,
    PriorCollator,
    build_prior,
    check_prior_codebook,
    drop_class_labels,
    load_prior,
    load_prior_config,
    load_prior_tokenizer,
    prior_model_card,
    save_prior,
    validation_bits_per_token,
)
from .sampling import ImageTokenLogitsProcessor, sample_image_tokens, sample_images, save_image_grid, token_image_size
from .token_data import check_tokens_source, photo_crops_dataset, read_tokens_info, save_tokens, tokenize_dataset
from .vocabulary import PriorVocabulary


__all__ = [
    "ImageTokenLogitsProcessor",
    "PriorCollator",
    "PriorVocabulary",
    "build_prior",
    "check_prior_codebook",
    "check_tokens_source",
    "drop_class_labels",
    "load_prior",
    "load_prior_config",
    "load_prior_tokenizer",
    "load_tokenizer",
    "photo_crops_dataset",
    "prior_model_card",
    "processor_image_size",
    "read_tokens_info",
    "sample_image_tokens",
    "sample_images",
    "save_image_grid",
    "save_prior",
    "save_tokens",
    "token_image_size",
    "tokenize_dataset",
    "validation_bits_per_token",
]
