"""The prior model: batches of token sequences, building a Llama / GPT-2 causal LM, validation bits per token,
saving and loading (the prior, and the tokenizer it was trained on)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, PreTrainedModel

from ..files import PRIOR_CONFIG_NAME, relative_location, saved_weights, share_safetensors, write_text
from ..loading import load_tokenizer, locate
from ..messages import counted, first_line, listed
from .vocabulary import PriorVocabulary

logger = logging.getLogger(__name__)

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
        # Not cast here: the vocabulary refuses float ids and labels, which a cast would truncate.
        image_tokens = torch.stack([torch.as_tensor(example["image_tokens"]) for example in examples])
        class_labels = None
        if self.vocabulary.class_conditional:
            if any(example.get("label") is None for example in examples):
                raise ValueError("a class-conditional prior needs a `label` for every example.")
            class_labels = torch.as_tensor([example["label"] for example in examples])
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
    prior.generation_config = prior_generation_config(num_image_tokens)
    return prior


def prior_generation_config(num_image_tokens: int) -> GenerationConfig:
    """The generation config a prior carries: one image of `num_image_tokens` tokens and the special ids, nothing
    else. Sampling settings are `sample_image_tokens`' arguments, never read from a saved prior."""
    return GenerationConfig(
        max_new_tokens=num_image_tokens,
        min_new_tokens=num_image_tokens,
        do_sample=True,
        bos_token_id=PriorVocabulary.bos_token_id,
        eos_token_id=PriorVocabulary.eos_token_id,
        pad_token_id=PriorVocabulary.pad_token_id,
    )


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
    codebook_fingerprint: str | None = None,
    **extra: Any,
) -> Path:
    """`prior.save_pretrained(output_dir)` plus `prior_config.json`: vocabulary layout, tokens per image, the
    tokenizer's folder or Hub id (what `sample_prior.py` decodes with), the image size the tokens came from and the
    tokenizer's `codebook_fingerprint` (`cdb_tokenizer.tools.cli.codebook_fingerprint` of the model as saved), which
    `load_prior_tokenizer` checks so that no other tokenizer decodes the prior's tokens."""
    output_dir = Path(output_dir)
    prior.save_pretrained(output_dir)
    share_safetensors(saved_weights(output_dir))
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
        "codebook_fingerprint": codebook_fingerprint,
        **({"tokenizer_name": far_tokenizer} if far_tokenizer else {}),
        **extra,
    }
    write_text(output_dir / PRIOR_CONFIG_NAME, json.dumps(prior_config, indent=2) + "\n")
    return output_dir


def prior_model_card(
    prior: PreTrainedModel, prior_config: dict[str, Any], metrics: dict[str, float], data: str,
    samples: str | None = None,
) -> str:
    """The `README.md` of a prior saved by `save_prior`: what it models, with which tokenizer (as `prior_config`
    records it: a Hub id, or a folder relative to the prior's), how it scored (`metrics` of `train_prior.py`), how
    to sample from it, and the Hub's metadata in a YAML header. `data` names the training data (no local path);
    `samples` is the relative path of a sample grid beside the card."""
    from huggingface_hub import ModelCardData

    vocabulary = PriorVocabulary.from_dict(prior_config["vocabulary"])
    config = prior.config
    size = prior_config.get("image_size")
    image = f"{size[0]}x{size[1]}-pixel image" if size else "image"
    if vocabulary.class_conditional:
        names = vocabulary.class_names
        classes = f"{vocabulary.num_classes} classes" + (f" ({listed(names, 8)})" if names else "")
        kind = f"Class-conditional over {classes}, with a null class for classifier-free guidance."
        labels, python_labels = " --class_labels 0 --guidance_scale 3", ", class_labels=0, guidance_scale=3.0"
    else:
        kind, labels, python_labels = "Unconditional.", "", ""
    metadata = ModelCardData(library_name="transformers", tags=["cdb-vq", "image-tokens", "image-generation"])
    lines = [
        f"---\n{metadata.to_yaml()}\n---",
        "# A transformer prior over cdb-vq image tokens",
        f"A {type(prior).__name__} ({prior.num_parameters():,} parameters: {config.num_hidden_layers} "
        f"layers, hidden size {config.hidden_size}) that models an image as the sequence `BOS [class] image tokens "
        f"EOS`: {prior_config['num_image_tokens']} tokens per {image}, in raster order, from a codebook of "
        f"{vocabulary.codebook_size} codes. {kind}",
        f"Tokenizer: {_tokenizer_text(prior_config)} `sample_prior.py` decodes with it, and refuses a tokenizer whose "
        f"codes differ from the ones the prior was trained on (codebook fingerprint "
        f"`{prior_config.get('codebook_fingerprint')}`).",
        f"Trained with cdb-vq's `training/train_prior.py` for {counted(metrics['step'], 'step')} on {data}. "
        f"Validation: **{metrics['bits_per_token']:.3f} bits per token** (a uniform guess over the codes: "
        f"{math.log2(vocabulary.codebook_size):.2f}).",
        *([f"![samples drawn at the last validation]({samples})"] if samples else []),
        "## Sample",
        f"```bash\npython training/sample_prior.py --prior <this repository or folder> --num_images 16{labels}\n```",
        "or, in Python (cdb-vq installed with its `train` extra):",
        "```python\nfrom cdb_tokenizer.tools.priors import load_prior, load_prior_tokenizer, sample_images\n\n"
        "prior, vocabulary, prior_config = load_prior(\"<this repository or folder>\")\n"
        "tokenizer, processor = load_prior_tokenizer(prior_config[\"tokenizer\"], prior_config)\n"
        f"images = sample_images(prior, tokenizer, vocabulary, num_images=8{python_labels}, seed=0)\n```",
        "`prior_config.json` holds the token layout (`vocabulary`), the tokens per image, the image size and the "
        "tokenizer; the weights are safetensors, and the model is a stock transformers causal LM (no remote code).",
    ]
    return "\n\n".join(lines) + "\n"


def _tokenizer_text(prior_config: dict[str, Any]) -> str:
    """The tokenizer a prior records, in words, with what a user of the prior needs to do to get it."""
    tokenizer = prior_config.get("tokenizer")
    if tokenizer and prior_config.get("tokenizer_relative_to_prior"):
        return (f"the local folder `{tokenizer}` (relative to the prior's folder). Where that folder is not beside "
                f"it (on the Hub), pass `--tokenizer` with the tokenizer's folder or Hub id.")  # fmt: skip
    if tokenizer:
        return f"[`{tokenizer}`](https://huggingface.co/{tokenizer})."
    name = prior_config.get("tokenizer_name")
    return f"a local folder named `{name}`; pass it as `--tokenizer`." if name else "not recorded; pass `--tokenizer`."


def load_prior_config(name_or_path: str | Path, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(`prior_config.json` of a prior saved by `save_prior`, where to load its weights from: the folder or Hub id).
    A mistyped local path is a `FileNotFoundError` (`locate`), never a Hub look-up; a Hub id that cannot be fetched,
    an `OSError` saying why."""
    path = locate(name_or_path, "prior", "Give the folder train_prior.py wrote.")
    if path is None:
        return _read_prior_config(_download_prior_config(str(name_or_path), revision)), str(name_or_path)
    config_file = path / PRIOR_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a prior saved by train_prior.py / save_prior.")
    prior_config = _read_prior_config(config_file)
    tokenizer = prior_config.get("tokenizer")
    # Recorded relative to this folder since 2026-11-30 (and marked so); earlier priors kept the path as typed.
    if prior_config.get("tokenizer_relative_to_prior") is True and isinstance(tokenizer, str):
        prior_config["tokenizer"] = str((path / tokenizer).resolve())
    return prior_config, str(path)


def _download_prior_config(repo_id: str, revision: str | None) -> Path:
    """The Hub repository's `prior_config.json` (from the cache when offline); what went wrong, in one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, PRIOR_CONFIG_NAME, revision=revision))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent class
        problem = "no local folder of that name, and the Hub cannot be reached (offline?) nor was it downloaded before"
    except RepositoryNotFoundError:
        problem = "no local folder of that name, and no Hub repository either (or a private one: log in first)"
    except RevisionNotFoundError:
        problem = f"the Hub repository has no revision {revision!r}"
    except EntryNotFoundError:
        problem = f"the Hub repository has no {PRIOR_CONFIG_NAME}: it is not a prior saved by train_prior.py"
    raise FileNotFoundError(f"prior {repo_id!r}: {problem}.")


def _read_prior_config(config_file: Path) -> dict[str, Any]:
    """`prior_config.json` as a dict with a `vocabulary`; a damaged file is a ValueError naming it."""
    try:
        prior_config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:  # bad JSON or bad UTF-8
        raise ValueError(f"{config_file} is damaged: {first_line(error)}.") from None
    if not isinstance(prior_config, dict) or not isinstance(prior_config.get("vocabulary"), dict):
        raise ValueError(f"{config_file} is damaged: it has no vocabulary (not written by train_prior.py or save_prior?).")
    return prior_config


def load_prior(
    name_or_path: str | Path, device: str | torch.device | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, PriorVocabulary, dict[str, Any]]:
    """Load a prior saved by `save_prior` (a folder or Hub repo id): (model in eval mode, vocabulary, prior config).

    `prior_config.json` is checked against the model beside it, and the prior's generation config is rebuilt from
    it: sampling settings in a saved `generation_config.json` are ignored (with a warning), so that only the
    arguments of `sample_image_tokens` decide how a prior samples."""
    prior_config, source = load_prior_config(name_or_path, revision=kwargs.get("revision"))
    try:
        vocabulary = PriorVocabulary.from_dict(prior_config["vocabulary"])
    except KeyError as error:
        raise ValueError(f"the {PRIOR_CONFIG_NAME} of {source} is damaged: its vocabulary has no {error}.") from None
    # A prior is a stock transformers causal LM: no folder's own code runs (nor is the user asked) unless the
    # caller passed trust_remote_code=True, and its weights are read from safetensors, never unpickled.
    kwargs.setdefault("trust_remote_code", False)
    kwargs.setdefault("use_safetensors", True)
    try:
        prior = _load_prior_weights(source, kwargs)
    except OSError as error:
        hint = " (a prior's weights are read from model.safetensors only)" if kwargs["use_safetensors"] else ""
        raise OSError(f"prior {str(name_or_path)!r}: {first_line(error)}{hint}") from None
    except ValueError as error:
        if kwargs["trust_remote_code"] or "trust_remote_code" not in str(error):
            raise
        # transformers' answer to a model type it does not know that ships its own code: three lines, a Hub URL
        # for a local folder, and a flag the scripts do not have.
        raise ValueError(
            f"prior {str(name_or_path)!r} is a model with its own code (auto_map), which is never run: a prior is a "
            f"stock transformers causal LM (Llama, GPT-2, ...)."
        ) from None
    if prior.config.vocab_size != vocabulary.vocab_size:
        raise ValueError(f"the prior's vocab_size {prior.config.vocab_size} does not match prior_config.json ({vocabulary.vocab_size}).")
    _check_prior_config(prior, vocabulary, prior_config, source)
    prior.generation_config = prior_generation_config(prior_config["num_image_tokens"])
    if device is not None:
        prior.to(device)
    return prior, vocabulary, prior_config


def _load_prior_weights(source: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained`, in eval mode, refusing weights that do not fit the config exactly
    (missing, extra or reshaped tensors, a damaged safetensors header) in one line naming `source`: transformers
    would start missing layers at random and sample noise, with only its LOAD REPORT table, which is held back
    here and shown only when the model loads."""
    from safetensors import SafetensorError

    from ..loading import held_library_logs, quiet_loading_bars, show_log_records

    damaged = f"the weights of prior {source} (model.safetensors) are damaged or do not fit its config.json"
    try:
        with held_library_logs() as records, quiet_loading_bars():
            prior, info = AutoModelForCausalLM.from_pretrained(source, **kwargs, output_loading_info=True)
    except SafetensorError as error:
        raise ValueError(f"{damaged}: {first_line(error)}.") from None
    except RuntimeError as error:  # transformers' own size check, whose message points at the held-back table
        if "ignore_mismatched_sizes" not in str(error) and "size mismatch" not in str(error):
            raise
        raise ValueError(f"{damaged}: some tensors have other shapes than the config gives.") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(key[0] if isinstance(key, tuple) else str(key) for key in info.get(kind) or ())  # (name, shapes)
        if keys:
            words = kind.replace("_keys", "")
            raise ValueError(f"{damaged}: {len(keys)} {words} tensor(s), e.g. {keys[0]}.")
    show_log_records(records)
    return prior.eval()


def _check_prior_config(
    prior: PreTrainedModel, vocabulary: PriorVocabulary, prior_config: dict[str, Any], source: str
) -> None:
    """Refuse a `prior_config.json` that does not fit the model beside it (tokens per image, image size, the
    generation config's length); warn about the generation settings that `load_prior` drops."""
    where = f"the {PRIOR_CONFIG_NAME} of {source}"
    recorded = _settings(prior.generation_config)
    count = prior_config.get("num_image_tokens", recorded.get("max_new_tokens"))
    if not is_positive_int(count):
        raise ValueError(f"{where} is damaged: num_image_tokens must be a positive integer, got {count!r}.")
    prior_config["num_image_tokens"] = count
    positions = getattr(prior.config, "max_position_embeddings", None)  # GPT-2's n_positions under its common name
    if positions is not None and vocabulary.prompt_length + count + 1 > positions:
        raise ValueError(
            f"{where} says {count} tokens per image, but the model has {positions} positions for its "
            f"{vocabulary.prompt_length} prompt tokens, the image tokens and EOS: the files do not belong together."
        )
    if recorded.get("max_new_tokens", count) != count:
        raise ValueError(
            f"{where} says {count} tokens per image, but its generation_config.json makes "
            f"{recorded['max_new_tokens']}: the files do not belong together."
        )
    image_size = prior_config.get("image_size")
    if image_size is not None and not is_image_size(image_size):
        raise ValueError(f"{where} is damaged: image_size must be [height, width] in pixels, got {image_size!r}.")
    expected = _settings(prior_generation_config(count))
    ignored = sorted(key for key, value in recorded.items() if expected.get(key) != value)
    if ignored:
        logger.warning(
            "%s: ignoring %s in its generation_config.json (sampling settings are sample_image_tokens' arguments).",
            source, ", ".join(ignored),
        )  # fmt: skip


def _settings(generation_config: GenerationConfig) -> dict[str, Any]:
    """What a generation config sets, beyond transformers' defaults."""
    settings = generation_config.to_diff_dict()
    settings.pop("transformers_version", None)
    return settings


def is_positive_int(value: Any) -> bool:
    """A positive int, and not a bool (which Python counts as one), as a JSON record or an argument must hold."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_image_size(value: Any) -> bool:
    """[height, width] in pixels, as `prior_config.json` and `cdb_vq_tokens.json` record it."""
    return isinstance(value, list) and len(value) == 2 and all(is_positive_int(side) for side in value)


def load_prior_tokenizer(
    name_or_path: str,
    prior_config: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    what: str = "tokenizer",
    hint: str = "",
):
    """`load_tokenizer` (model and image processor) for a prior: a mistyped folder is refused at once (`locate`, whose
    messages name `what` and end with the sentence `hint`) and a loading error names the tokenizer. With `prior_config`, a
    tokenizer with another codebook than the prior's is refused (`check_prior_codebook`), on the CPU, where the
    fingerprint was taken; the model then moves to `device`."""
    folder = locate(name_or_path, what, hint)
    try:
        model, processor = load_tokenizer(str(folder) if folder else name_or_path)
    except OSError as error:  # transformers' several lines on a missing file or a Hub that cannot be reached
        raise OSError(f"{what} {name_or_path!r}: {first_line(error)}") from None
    if prior_config is not None:
        check_prior_codebook(prior_config, model, f"{what} {name_or_path!r}")
    if device is not None:
        model.to(device)
    return model, processor


def check_prior_codebook(prior_config: dict[str, Any], model, name: str = "the tokenizer") -> None:
    """Refuse a tokenizer (`name` in messages) whose codebook is not the one `prior_config` records
    (`codebook_fingerprint`): the prior's tokens would index other codes, and decode to noise. A prior that records
    none (saved by an earlier version, or trained on token data that recorded none) is only warned about."""
    from ..cli import codebook_fingerprint

    recorded = prior_config.get("codebook_fingerprint")
    if recorded is None:
        logger.warning(
            "%s records no codebook fingerprint (an older prior, or trained on token data that recorded none): %s "
            "cannot be checked against the tokenizer the prior was trained on.", PRIOR_CONFIG_NAME, name
        )
        return
    fingerprint = codebook_fingerprint(model)
    if fingerprint != recorded:
        trained_size = (prior_config.get("vocabulary") or {}).get("codebook_size")
        size = model.config.codebook_size
        sizes = f" ({size} codes, the prior was trained on {trained_size})" if trained_size not in (None, size) else ""
        raise ValueError(
            f"{name} has codebook fingerprint {fingerprint}{sizes}, but the prior was trained on a tokenizer with "
            f"{recorded} (another tokenizer, or this one retrained since): its images would be noise. Use the "
            f"prior's tokenizer."
        )
