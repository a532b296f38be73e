#!/usr/bin/env python
"""Train a transformer prior (a transformers causal LM) over cdb-vq image tokens.

Sequences are `BOS [class] image tokens EOS` (see `cdb_tokenizer.tools.priors.PriorVocabulary`); class-conditional
priors are trained with label dropout so that they can sample with classifier-free guidance.

Data: a tokenised data set saved with `save_to_disk` (`cdb-vq tokenize` or `cdb_tokenizer.tools.priors.tokenize_dataset`)
given by `--tokens_dir`, or, with no data flag, the embedded default: random crops of the scikit-image photos, one
class per photo, tokenised on the fly with `--tokenizer`.

    accelerate launch training/train_prior.py --tokenizer outputs/tokenizer --output_dir outputs/prior
    accelerate launch training/train_prior.py --tokens_dir outputs/tokens --tokenizer outputs/tokenizer \\
        --architecture gpt2 --hidden_size 512 --num_layers 12 --num_heads 8 --mixed_precision bf16

The output folder holds the prior (`save_pretrained`), `prior_config.json` (vocabulary layout, tokens per image,
image size, tokenizer id and codebook fingerprint), `metrics.json`, `training_config.json`, sample grids under `samples/`, tracker
logs and `train_log.jsonl` under `logs/`, `checkpoints/checkpoint-<step>`, and a model card, `README.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from cdb_tokenizer.tools.checkpoints import (
    CheckpointWriteError,
    load_custom_state,
    load_training_state,
    save_checkpoint,
)
from cdb_tokenizer.tools.cli import codebook_fingerprint
from cdb_tokenizer.tools.data import check_data_file_names, saved_to_disk
from cdb_tokenizer.tools.files import PRIOR_CONFIG_NAME, output_dir_claims, write_text
from cdb_tokenizer.tools.messages import OneLineErrorParser, first_line, listed, run_script
from cdb_tokenizer.tools.redaction import redact_secrets
from cdb_tokenizer.tools.runs import (
    RunLog,
    TerminationRequest,
    find_checkpoint,
    launch_settings,
    make_accelerator,
    refuse_fp16_without_a_gradient_scaler,
    warn_of_a_warmup_longer_than_the_run,
)
from cdb_tokenizer.tools.steps import derived_seed
from cdb_tokenizer.tools.train_args import FLAG_RANGES, LR_SCHEDULERS, check_in, check_output_dir_flags
from cdb_tokenizer.tools.priors import (
    ARCHITECTURES,
    PriorCollator,
    PriorVocabulary,
    build_prior,
    check_tokens_source,
    drop_class_labels,
    load_prior_tokenizer,
    photo_crops_dataset,
    prior_model_card,
    processor_image_size,
    read_tokens_info,
    sample_images,
    save_image_grid,
    save_prior,
    token_image_size,
    tokenize_dataset,
    validation_bits_per_token,
)
from cdb_tokenizer.tools.priors.token_data import TOKENS_INFO

# train.py's output-folder rule (refuse another run's folder, --overwrite_output_dir) is shared, not copied; run as
# a script, only training/ is on the path.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from training.train import (  # noqa: E402
    ModelSaveError,
    TrainingStopped,
    model_save_errors,
    nothing_left_to_train,
    prepare_output_dir,
    saved_at_step,
    start_logging,
    stop_training,
)

logger = get_logger(__name__)

# Written by this script (and samples.png by sample_prior.py by default), so --overwrite_output_dir deletes them on
# top of train.py's list: a leftover samples.png would stop the next sample_prior.py run.
PRIOR_RUN_FILES = ("samples", PRIOR_CONFIG_NAME, "samples.png", "README.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="Train a causal-LM prior over cdb-vq image tokens.")
    data = parser.add_argument_group("data")
    data.add_argument("--tokens_dir", type=str, default=None,
                      help="A tokenised data set saved with save_to_disk (columns image_tokens[, label]; others, "
                           "such as tokenize's source_index, are not read). "
                           "Without it, the embedded default photos are tokenised with --tokenizer.")
    data.add_argument("--tokenizer", type=str, default=None,
                      help="The cdb-vq tokenizer (folder or Hub id): tokenises the default data, draws the validation "
                           "samples, and is recorded in prior_config.json for sample_prior.py.")
    data.add_argument("--codebook_size", type=int, default=None,
                      help="Codebook size when --tokens_dir is given without --tokenizer.")
    data.add_argument("--train_split", type=str, default="train", help="Split of a saved DatasetDict to train on.")
    data.add_argument("--validation_split", type=float, default=0.05,
                      help="Share held out for validation when the saved data has no validation/test split.")
    data.add_argument("--unconditional", action="store_true", help="Ignore labels: train an unconditional prior.")
    data.add_argument("--num_classes", type=int, default=None,
                      help="Number of classes (default: from the ClassLabel feature, else the largest label + 1).")
    data.add_argument("--label_dropout", type=float, default=0.1,
                      help="Probability of dropping the class token (classifier-free guidance).")
    data.add_argument("--num_crops_per_photo", type=int, default=64, help="Embedded default: training crops per photo.")
    data.add_argument("--num_validation_crops_per_photo", type=int, default=8,
                      help="Embedded default: validation crops per photo (other crops of the same photos).")
    data.add_argument("--tokenize_batch_size", type=int, default=32)
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--architecture", choices=ARCHITECTURES, default="llama")
    model.add_argument("--hidden_size", type=int, default=256)
    model.add_argument("--num_layers", type=int, default=6)
    model.add_argument("--num_heads", type=int, default=8)
    model.add_argument("--intermediate_size", type=int, default=None, help="Default: 4 x hidden_size.")
    model.add_argument("--dropout", type=float, default=0.0)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="outputs/prior")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=32, help="Per device.")
    train.add_argument("--eval_batch_size", type=int, default=64, help="Per device.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimiser steps to train for (default: 1000, or --num_train_epochs' worth).")
    train.add_argument("--num_train_epochs", type=int, default=None,
                       help="Epochs to train for (sets --max_train_steps when that is not given).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=3e-4)
    train.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS,
                       help="transformers' learning-rate schedule.")
    train.add_argument("--lr_warmup_steps", type=int, default=100)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--adam_weight_decay", type=float, default=0.1)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: the accelerate config's.")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep at most this many checkpoints.")
    train.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='A checkpoint folder, or "latest" for the newest in --output_dir.')
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start over in an --output_dir that holds another run: its checkpoints, logs, prior, "
                            "samples and metrics are deleted first.")
    train.add_argument("--report_to", type=str, default="tensorboard",
                       help='"tensorboard", "wandb", "all" or "none".')
    train.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    train.add_argument("--tracker_project_name", type=str, default="cdb-vq-prior")
    train.add_argument("--validation_steps", type=int, default=200)
    train.add_argument("--num_validation_images", type=int, default=16,
                       help="Images sampled at each validation (needs --tokenizer); 0 to skip.")
    train.add_argument("--validation_guidance_scale", type=float, default=1.0,
                       help="Classifier-free guidance scale of the validation samples (class-conditional priors).")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tokens_dir is None and args.tokenizer is None:
        parser.error("give --tokenizer (to tokenise the embedded default photos) or --tokens_dir (a tokenised data set).")
    if args.tokens_dir is not None and args.tokenizer is None and args.codebook_size is None:
        parser.error("with --tokens_dir, give --tokenizer (recommended: sample_prior.py decodes with it) or --codebook_size.")
    for name in ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit", "validation_steps"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}.")
    if not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be in (0, 1), got {args.validation_split}.")
    try:
        check_output_dir_flags(args)  # train.py's rule: never delete the run to resume
    except ValueError as error:
        parser.error(str(error))
    if args.num_classes is not None and args.num_classes < 1:  # 0 was read as "not given"
        parser.error(f"--num_classes must be at least 1 (or --unconditional), got {args.num_classes}.")
    if not 0 <= args.label_dropout <= 1:
        parser.error(f"--label_dropout must be in [0, 1], got {args.label_dropout}.")
    if not 0 <= args.dropout < 1:  # torch refused 2 with a traceback from inside the model
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}.")
    if not 0 <= args.seed < 2**32:  # numpy's range (set_seed seeds it too)
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}.")
    if args.num_validation_images < 0:  # was taken for 0, sampling nothing
        parser.error(f"--num_validation_images must be at least 0 (0: no samples), got {args.num_validation_images}.")
    if not math.isfinite(args.validation_guidance_scale):  # failed at the first validation, after training
        parser.error(f"--validation_guidance_scale must be a finite number, got {args.validation_guidance_scale}.")
    for flag in ("tokenizer", "tokens_dir"):
        if same_folder(args.output_dir, getattr(args, flag)):
            parser.error(f"--output_dir {args.output_dir} is --{flag} {getattr(args, flag)}: the prior's files would "
                         f"replace its input's (with --overwrite_output_dir the tokenizer was deleted); pick another "
                         f"--output_dir.")  # fmt: skip
    for name, interval in FLAG_RANGES.items():  # train.py's ranges, for the flags the two scripts share
        if hasattr(args, name):
            try:
                check_in(name, getattr(args, name), interval)
            except ValueError as error:
                parser.error(str(error))


def same_folder(output_dir: str, source: str | None) -> bool:
    """Whether --output_dir is a local input folder (resolved, so `./tok`, `tok/` and links to it are one). A prior
    kept inside its tokenizer's folder, or around its tokens, is fine: a run writes and deletes only its own files."""
    if source is None or not Path(source).expanduser().exists():
        return False
    return Path(output_dir).expanduser().resolve() == Path(source).expanduser().resolve()


# ---------------------------------------------------------------------------------------------------- data
def load_token_splits(args: argparse.Namespace, accelerator: Accelerator, tokenizer) -> tuple:
    """(train, validation) tokenised data sets from --tokens_dir, or from the embedded default photos."""
    import datasets

    if args.tokens_dir is None:
        model, processor = tokenizer
        with accelerator.main_process_first():
            splits = [
                tokenize_dataset(
                    photo_crops_dataset(crops, seed=args.seed + offset), model, processor,
                    batch_size=args.tokenize_batch_size, device=accelerator.device,
                )
                for offset, crops in ((0, args.num_crops_per_photo), (1, args.num_validation_crops_per_photo))
            ]  # fmt: skip
        return splits[0], splits[1]

    path = Path(args.tokens_dir)
    if not path.exists():
        raise FileNotFoundError(f"--tokens_dir {str(path)!r} does not exist; make it with `cdb-vq tokenize`.")
    if not path.is_dir():  # e.g. a `cdb-vq encode` token file: a prior trains on a tokenised data set
        raise ValueError(f"--tokens_dir {path} is a file, not a folder: make a tokenised data set folder with "
                         f"`cdb-vq tokenize` (`cdb-vq encode` token files are not for training).")  # fmt: skip
    if not saved_to_disk(path):
        # An empty folder, or the images themselves: datasets' "neither a `Dataset` directory nor a `DatasetDict`
        # directory", after a warning that the folder "was made with save_to_disk", said neither.
        raise ValueError(f"--tokens_dir {path} is not a tokenised data set (no state.json or dataset_dict.json): "
                         f"make one with `cdb-vq tokenize --model <tokenizer> --data <images> --out <folder>`.")  # fmt: skip
    if tokenizer is not None:
        check_tokens_source(path, tokenizer[0])  # ids of another codebook would train a prior that decodes noise
    else:
        info = read_tokens_info(path)
        if info is not None and info["codebook_size"] != args.codebook_size:
            raise ValueError(
                f"--codebook_size {args.codebook_size}, but {path} holds the ids of a {info['codebook_size']}-code "
                f"tokenizer (its {TOKENS_INFO}): pass --codebook_size {info['codebook_size']}, or better --tokenizer."
            )
    check_data_file_names(path, f"--tokens_dir {path}")
    try:
        # Any format its state.json sets is reset: the checks and the loop then read what was checked.
        saved = datasets.load_from_disk(str(path)).with_format(None)
    except IndexError:  # datasets' own failure on a split saved with no rows (no shard file to read)
        raise ValueError(f"--tokens_dir {path} holds a split with no rows (datasets cannot load it): tokenise again, "
                         f"leaving out empty splits.") from None  # fmt: skip
    except (FileNotFoundError, PermissionError, IsADirectoryError):  # not a saved data set, or not readable:
        raise  # their own messages name the path, and tokenising again would not help
    except (ValueError, OSError, TypeError) as error:  # a cut Arrow file, a damaged state.json or dataset_info.json
        raise ValueError(f"--tokens_dir {path} is damaged ({type(error).__name__}: {first_line(error)}): tokenise "
                         f"again.") from None  # fmt: skip
    if isinstance(saved, datasets.DatasetDict):
        if args.train_split not in saved:
            raise ValueError(f"--tokens_dir has no split {args.train_split!r}; its splits are {list(saved)}.")
        train = saved[args.train_split]
        # Never the training split itself (--train_split validation): it would score the prior on what it learnt.
        held_out = [name for name in ("validation", "test") if name in saved and name != args.train_split]
        validation = saved[held_out[0]] if held_out else None
    else:
        train, validation = saved, None
    if "image_tokens" not in train.column_names:
        raise ValueError(
            f"--tokens_dir holds columns {train.column_names}, not image_tokens: tokenise images first "
            f"(`cdb-vq tokenize` or cdb_tokenizer.tools.priors.tokenize_dataset)."
        )
    if validation is None:
        if len(train) < 2:
            raise ValueError("the tokenised data set needs at least 2 examples (one for validation).")
        split = train.train_test_split(test_size=args.validation_split, seed=args.seed)
        train, validation = split["train"], split["test"]
    return train, validation


def recorded_fingerprint(args: argparse.Namespace, tokenizer) -> str | None:
    """The codebook fingerprint prior_config.json records, which sample_prior.py checks its tokenizer against:
    --tokenizer's, else the one --tokens_dir records (None when neither is known)."""
    if tokenizer is not None:
        return codebook_fingerprint(tokenizer[0])
    info = read_tokens_info(args.tokens_dir) if args.tokens_dir else None
    return info["codebook_fingerprint"] if info else None


def recorded_image_size(args: argparse.Namespace, num_image_tokens: int) -> tuple[int, int] | None:
    """The image size --tokens_dir records (its grid checked against the sequence length), which prior_config.json
    keeps for sampling; None when it records none."""
    info = read_tokens_info(args.tokens_dir, num_image_tokens) if args.tokens_dir else None
    return tuple(info["image_size"]) if info and "image_size" in info else None


def _labels(name: str, split):
    """The split's `label` column as one Arrow array (no Python lists: cheap on millions of rows)."""
    import pyarrow as pa

    labels = split.with_format("arrow")["label"]
    if not pa.types.is_integer(labels.type):
        raise ValueError(f"the {name} split's label column holds {labels.type}, not integer class ids.")
    return labels


def make_vocabulary(args: argparse.Namespace, train, validation, codebook_size: int) -> PriorVocabulary:
    """The vocabulary: class-conditional when the data have labels (unless --unconditional); `check_split` then
    checks every label against it."""
    import datasets
    import pyarrow.compute as pc

    if not args.unconditional and args.num_classes and "label" not in train.column_names:
        # A class-conditional prior was asked for: training it unconditional (logged as "0 classes") only showed
        # when sample_prior.py --class_labels refused it.
        raise ValueError(
            f"--num_classes {args.num_classes}, but the training data have no label column: tokenise a data set "
            f"with labels (an image folder with one sub-folder per class), or leave out --num_classes."
        )
    if args.unconditional or "label" not in train.column_names:
        return PriorVocabulary(codebook_size)
    feature = train.features["label"]
    other = validation.features.get("label")
    if isinstance(other, datasets.ClassLabel) and isinstance(feature, datasets.ClassLabel) and other != feature:
        # The same ids would name other classes: the validation bits per token scored the prior on the wrong class.
        raise ValueError(
            f"the validation split's classes ({listed(other.names, 8)}) are not the training split's "
            f"({listed(feature.names, 8)}): its labels would name other classes. Encode both with one ClassLabel."
        )
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names if args.num_classes in (None, feature.num_classes) else None
        return PriorVocabulary(codebook_size, args.num_classes or feature.num_classes, names)
    if args.num_classes:
        return PriorVocabulary(codebook_size, args.num_classes)
    splits = [("training", train)] + ([("validation", validation)] if "label" in validation.column_names else [])
    highs = [pc.max(_labels(name, split)).as_py() for name, split in splits]
    highest = max((high for high in highs if high is not None), default=-1)
    labelled = sum(pc.sum(pc.greater_equal(_labels(name, split), 0)).as_py() or 0 for name, split in splits)
    # Far more classes than labelled rows: a stray label (1,000,000 among 0-3 built a 64M-parameter prior); a small
    # subset of a many-class set (labels up to 999 in 200 rows) is not one.
    if highest + 1 > max(10 * labelled, 4096):
        raise ValueError(
            f"the labels go up to {highest}, i.e. {highest + 1} classes for {labelled} labelled rows: a stray label? "
            f"Fix it, or pass --num_classes (or --unconditional)."
        )
    # At least one class, so that data of only unlabelled (-1) rows is refused by check_split, not trained on.
    return PriorVocabulary(codebook_size, max(1, highest + 1))


def token_column(name: str, split):
    """The split's `image_tokens` as one Arrow array, refused unless every row is a non-empty list of integer code
    ids (a float id was truncated, a null failed mid-run in the collator, other types deep in Arrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(split) == 0:
        raise ValueError(f"the {name} split is empty.")
    if "image_tokens" not in split.column_names:
        raise ValueError(f"the {name} split has columns {split.column_names}, not image_tokens.")
    tokens = split.with_format("arrow")["image_tokens"]
    kind = tokens.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not is_list or not pa.types.is_integer(kind.value_type):
        raise ValueError(f"the {name} split's image_tokens column holds {kind}, not lists of integer code ids.")
    if tokens.null_count:
        raise ValueError(f"the {name} split has {tokens.null_count} row(s) whose image_tokens are null.")
    missing = pc.list_flatten(tokens).null_count
    if missing:
        raise ValueError(f"the {name} split has {missing} null image tokens (code ids) in its sequences.")
    if pc.min(pc.list_value_length(tokens)).as_py() == 0:
        raise ValueError(f"the {name} split has empty token sequences (no image tokens).")
    return tokens


def check_split(name: str, split, num_image_tokens: int, num_classes: int, codebook_size: int) -> None:
    """Refuse a split the collator would fail on mid-run (the validation split: only after training): sequences of
    another length, code ids outside the codebook and, for a class-conditional prior, missing, unlabelled (-1) or
    out-of-range labels."""
    import pyarrow.compute as pc

    tokens = token_column(name, split)
    lengths = pc.min_max(pc.list_value_length(tokens)).as_py()
    if lengths["min"] != num_image_tokens or lengths["max"] != num_image_tokens:
        raise ValueError(
            f"the {name} split has sequences of {lengths['min']} to {lengths['max']} image tokens, not "
            f"{num_image_tokens} (the first training sequence's): tokenise every image at one size with one tokenizer."
        )
    ids = pc.min_max(pc.list_flatten(tokens)).as_py()
    if ids["min"] < 0 or ids["max"] >= codebook_size:
        raise ValueError(
            f"the {name} split has code ids from {ids['min']} to {ids['max']}, outside the {codebook_size}-code "
            f"codebook: the tokens come from another tokenizer, or --codebook_size is wrong."
        )
    if num_classes == 0:
        return
    if "label" not in split.column_names:
        raise ValueError(
            f"the {name} split has no label column, but the prior is class-conditional: pass --unconditional."
        )
    labels = _labels(name, split)
    low, high = pc.min_max(labels).as_py().values()
    if labels.null_count:
        raise ValueError(
            f"the {name} split has {labels.null_count} unlabelled rows: label them or pass --unconditional."
        )
    if low < 0:
        raise ValueError(
            f"the {name} split has label {low} (-1: unlabelled): drop those rows or pass --unconditional."
        )
    if high >= num_classes:
        raise ValueError(
            f"the {name} split has label {high}, but the prior has {num_classes} classes: raise --num_classes."
        )


# ---------------------------------------------------------------------------------------------------- validation
def run_validation(
    accelerator, args, prior, validation_loader, vocabulary, tokenizer, image_size, global_step, log: RunLog
) -> dict[str, float]:
    # The unwrapped model: shards may differ in length, and a DDP forward would sync buffers across processes.
    metrics = validation_bits_per_token(
        accelerator.unwrap_model(prior), validation_loader, vocabulary,
        reduce=lambda totals: accelerator.reduce(totals, "sum"),
    )  # fmt: skip
    logs = {"validation/bits_per_token": metrics["bits_per_token"], "validation/nll": metrics["nll"]}
    logger.info(
        f"step {global_step}: validation {metrics['bits_per_token']:.3f} bits per token "
        f"(uniform: {math.log2(vocabulary.codebook_size):.3f})"
    )
    if tokenizer is not None and args.num_validation_images > 0 and accelerator.is_main_process:
        class_labels = None
        if vocabulary.class_conditional:  # one class per row of the grid
            class_labels = [i % vocabulary.num_classes for i in range(args.num_validation_images)]
        guidance = args.validation_guidance_scale if vocabulary.class_conditional else 1.0
        images = sample_images(
            accelerator.unwrap_model(prior), tokenizer[0], vocabulary, args.num_validation_images,
            class_labels=class_labels, guidance_scale=guidance, seed=args.seed, image_size=image_size,
        )  # fmt: skip
        path = save_image_grid(images, Path(args.output_dir) / "samples" / f"step-{global_step:06d}.png")
        logger.info(f"Wrote validation samples to {path}")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation/samples", ((images + 1) / 2).clamp(0, 1).cpu(), global_step)
    log(logs, step=global_step)
    return metrics


def contiguous_share(num_rows: int, num_processes: int, process_index: int) -> range:
    """The rows one process scores: contiguous shares whose sizes differ by at most one, empty for the last processes
    when there are fewer rows than processes (`Dataset.shard` raises there: 1 validation row on 2 processes)."""
    size, extra = divmod(num_rows, num_processes)
    start = process_index * size + min(process_index, extra)
    return range(start, start + size + (process_index < extra))


# ---------------------------------------------------------------------------------------------------- main
def prepare_prior_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """train.py's rule for --output_dir (refuse another run's folder unless resuming or overwriting), plus this
    script's own files on --overwrite_output_dir (old sample grids must not mix with the new run's)."""
    prepare_output_dir(args, accelerator)
    if args.overwrite_output_dir and accelerator.is_main_process:
        for name in PRIOR_RUN_FILES:
            target = Path(args.output_dir) / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def training_length(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimiser updates per epoch, max_train_steps, epochs) from the batches one process sees per epoch, i.e.
    the length of the *prepared* loader: before `prepare`, P processes would each run only 1/P of the steps."""
    if batches_per_epoch < 1:
        raise ValueError("the training loader has no batches: give more training data or a smaller --train_batch_size.")
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or (args.num_train_epochs or 0) * updates_per_epoch or 1000
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def resume(
    args: argparse.Namespace, accelerator: Accelerator, schedules: list, max_train_steps: int, tokens: dict
) -> int:
    """Load --resume_from_checkpoint and return its step (0 without one), by train.py's rules: this run's learning
    rate and optimiser settings, later checkpoints set aside only when this run trains past this one. A checkpoint
    trained on other tokens than this run's `tokens` (`token_record`) is refused."""
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator)
    if checkpoint is None:
        return 0
    check_checkpoint_tokens(checkpoint, tokens)
    accelerator.print(f"Resuming from checkpoint {checkpoint}")
    return load_training_state(accelerator, checkpoint, args.output_dir, max_train_steps, schedules)


def token_record(
    fingerprint: str | None, num_image_tokens: int | None = None, image_size: tuple[int, int] | None = None
) -> dict:
    """What a checkpoint records of the tokens it trained on: their codebook's fingerprint, length and image size."""
    return {"codebook_fingerprint": fingerprint, "num_image_tokens": num_image_tokens,
            "image_size": list(image_size) if image_size else None}  # fmt: skip


def check_checkpoint_tokens(checkpoint: Path, tokens: dict) -> None:
    """Refuse a checkpoint trained on other tokens than `tokens` (`token_record`), for each value both know (older
    checkpoints hold no length or size). Another codebook of as many codes passed, and the prior went on with other
    codes under the same ids; a llama prior (no position weights) loaded one of another length or grid, and went on
    with other raster positions."""
    state = load_custom_state(checkpoint)[1]
    for key, value in tokens.items():
        trained_on = state.get(key)
        if trained_on is None or value is None or trained_on == value:
            continue
        if key == "codebook_fingerprint":
            what = f"the tokens of another codebook (fingerprint {trained_on}, this run's are {value})"
        else:
            what = f"tokens of {key} {trained_on}, this run's have {value}"
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained on {what}; resume with that run's tokens"
            f"{' and tokenizer' if key == 'codebook_fingerprint' else ''}, or start a new --output_dir."
        )


def write_model_card(args: argparse.Namespace, prior: torch.nn.Module, output_dir: Path, metrics: dict) -> None:
    """The prior's `README.md` (`prior_model_card`), from the `prior_config.json` just saved, showing this step's
    sample grid when validation drew one."""
    prior_config = json.loads((output_dir / PRIOR_CONFIG_NAME).read_text())
    if args.tokens_dir:  # by its name: no local path reaches a card
        data = f"the tokens of `{Path(args.tokens_dir).expanduser().resolve().name}`"
    else:
        data = "random crops of scikit-image's photos, one class per photo (the script's embedded default)"
    grid = Path("samples") / f"step-{metrics['step']:06d}.png"
    samples = grid.as_posix() if (output_dir / grid).is_file() else None
    write_text(output_dir / "README.md", prior_model_card(prior, prior_config, metrics, data, samples))


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite (one device sync). The same on every process: their updates are the same."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def load_data(args: argparse.Namespace, accelerator: Accelerator, tokenizer: tuple | None, codebook_size: int
              ) -> tuple:  # fmt: skip
    """The training and validation token sets, checked against each other and the codebook, with their vocabulary,
    sequence length and image size: (train_set, validation_set, vocabulary, num_image_tokens, image_size)."""
    train_set, validation_set = load_token_splits(args, accelerator, tokenizer)
    num_image_tokens = len(token_column("training", train_set)[0])
    vocabulary = make_vocabulary(args, train_set, validation_set, codebook_size)
    for name, split in (("training", train_set), ("validation", validation_set)):
        check_split(name, split, num_image_tokens, vocabulary.num_classes, codebook_size)
    image_size = recorded_image_size(args, num_image_tokens)  # its grid checked against the tokenizer's already
    if tokenizer is not None:
        tokenizer[0].to(accelerator.device)
        if image_size is None:
            # Token data that record no size (older folders, plain save_to_disk) made at another size than the
            # processor's decode on their square grid; others are refused here, not at the first validation sample.
            image_size = token_image_size(tokenizer[0], num_image_tokens, processor_image_size(tokenizer[1]))
    logger.info(
        f"{len(train_set)} training / {len(validation_set)} validation sequences of {num_image_tokens} image tokens; "
        f"vocabulary {vocabulary.vocab_size} ids ({vocabulary.codebook_size} codes, {vocabulary.num_classes} classes)"
    )
    return train_set, validation_set, vocabulary, num_image_tokens, image_size


def make_loaders(args: argparse.Namespace, accelerator: Accelerator, train_set, validation_set, vocabulary,
                 num_image_tokens: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:  # fmt: skip
    """The training loader (to prepare with the accelerator) and this process's validation loader."""
    train_loader = torch.utils.data.DataLoader(
        # A last short batch is dropped only when every process still gets a full one.
        train_set, batch_size=args.train_batch_size, shuffle=True,
        drop_last=len(train_set) >= args.train_batch_size * accelerator.num_processes,
        # Label dropout is drawn in the loop, per micro-batch (`derived_seed`): the loader reads ahead, so a draw
        # here would come from a random state the checkpoint has already moved past.
        collate_fn=PriorCollator(vocabulary, num_image_tokens),
        num_workers=args.dataloader_num_workers,
        # Its own generator: a new iterator (each epoch, and the first after a resume) then never draws from the
        # global random state, which the prior's dropout draws from.
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    # Each process scores its own contiguous shard and the sums are reduced: every sequence is counted exactly once
    # (a prepared loader would pad the last batches with repeats).
    share = contiguous_share(len(validation_set), accelerator.num_processes, accelerator.process_index)
    validation_shard = validation_set.select(share if share else [])  # select(range(1, 1)) of one row raises too
    validation_loader = torch.utils.data.DataLoader(
        validation_shard, batch_size=args.eval_batch_size, collate_fn=PriorCollator(vocabulary, num_image_tokens),
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # not the global random state, which training draws from
    )  # fmt: skip
    return train_loader, validation_loader


def make_optimizer(args: argparse.Namespace, prior: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on norms and biases)."""
    decay = [p for p in prior.parameters() if p.ndim >= 2]
    no_decay = [p for p in prior.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.adam_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
    )  # fmt: skip


@output_dir_claims()
def main(args: argparse.Namespace) -> dict[str, float]:
    """Train the prior; returns the final validation metrics (also written to `metrics.json`)."""
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    refuse_fp16_without_a_gradient_scaler(accelerator)
    set_seed(args.seed)
    tokenizer = load_prior_tokenizer(args.tokenizer, what="--tokenizer") if args.tokenizer else None
    codebook_size = tokenizer[0].config.codebook_size if tokenizer else args.codebook_size
    fingerprint = recorded_fingerprint(args, tokenizer)  # on the CPU, as saved: before the tokenizer moves
    if args.resume_from_checkpoint not in (None, "latest"):  # before --overwrite_output_dir deletes the run for it
        named = find_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator)
        check_checkpoint_tokens(named, token_record(fingerprint))
    prepare_prior_output_dir(args, accelerator)
    train_set, validation_set, vocabulary, num_image_tokens, image_size = load_data(args, accelerator, tokenizer,
                                                                                    codebook_size)  # fmt: skip

    prior = build_prior(
        vocabulary, num_image_tokens, args.architecture, args.hidden_size, args.num_layers, args.num_heads,
        args.intermediate_size, args.dropout,
    )  # fmt: skip
    logger.info(f"{args.architecture} prior with {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters")

    train_loader, validation_loader = make_loaders(args, accelerator, train_set, validation_set, vocabulary,
                                                   num_image_tokens)  # fmt: skip
    optimizer = make_optimizer(args, prior)

    prior, optimizer, train_loader = accelerator.prepare(prior, optimizer, train_loader)
    # Counted on the prepared loader (one process's share of the batches), then the schedule is built to match.
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(train_loader))
    warn_of_a_warmup_longer_than_the_run(args, max_train_steps)
    lr_scheduler = accelerator.prepare(
        get_scheduler(
            args.lr_scheduler, optimizer.optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,  # stepped once per process
        )
    )  # fmt: skip

    tokens = token_record(fingerprint, num_image_tokens, image_size)
    global_step = resume(args, accelerator, [("prior", optimizer, lr_scheduler)], max_train_steps, tokens)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    if global_step >= max_train_steps:  # the loop would train one more step before checking
        if saved_at_step(output_dir, accelerator, key="step") >= global_step:  # else killed before saving the prior
            return nothing_left_to_train(args, accelerator, global_step, max_train_steps)
        logger.info(f"Nothing left to train at step {global_step}: validating and saving the checkpoint's prior.")
        first_epoch = num_epochs  # the run stopped after its last checkpoint, before saving the prior
    settings = {**vars(args), **launch_settings(args, accelerator)}
    if accelerator.is_main_process:
        training_config = {**settings, "vocabulary": vocabulary.to_dict(), "num_image_tokens": num_image_tokens}
        write_text(output_dir / "training_config.json", json.dumps(redact_secrets(training_config), indent=2, default=str) + "\n")
    # The trackers (no secrets or local paths: see hparams) and logs/train_log.jsonl, as train.py's.
    log = start_logging(args, accelerator, {key: value for key, value in settings.items() if value is not None}, global_step)

    logger.info(f"Training {max_train_steps} steps ({num_epochs} epochs), {accelerator.num_processes} process(es)")
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    metrics: dict[str, float] = {}
    prior.train()

    def write_checkpoint() -> None:  # of the current step
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                        state=tokens)  # fmt: skip

    # A SIGTERM (preemption, `kill`) ends the step, writes its checkpoint and stops, as in train.py.
    with TerminationRequest(accelerator) as termination:
        for epoch in range(first_epoch, num_epochs):
            train_loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
            skip_batches = 0
            micro_batch = 0
            for batch in batches:
                seed = derived_seed(args.seed, global_step, micro_batch, accelerator.process_index)
                # (drop_class_labels draws nothing for an unconditional prior)
                generator = torch.Generator().manual_seed(seed)
                batch["input_ids"] = drop_class_labels(batch["input_ids"], vocabulary, args.label_dropout, generator)
                micro_batch += 1
                learning_rate = lr_scheduler.get_last_lr()[0]  # this step's rate (the schedule moves after it)
                with accelerator.accumulate(prior):
                    loss = prior(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(prior.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step, micro_batch = global_step + 1, 0
                if not weights_are_finite(prior):  # a NaN loss or gradient ends here too, before any checkpoint has it
                    stop_training(accelerator, args, f"the prior's weights became NaN or infinite at step "
                                                     f"{global_step} (loss {loss.item():.4g})")  # fmt: skip
                progress.update(1)
                # Every process's last micro-batch, as validation counts every process's share.
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                logs = {"train/loss": mean_loss, "train/learning_rate": learning_rate}
                progress.set_postfix(loss=f"{logs['train/loss']:.3f}")
                log(logs, step=global_step)
                # The last step too (as train.py): a run shorter than --checkpointing_steps can then be extended, and a
                # finished one resumed without training its last steps again.
                if global_step % args.checkpointing_steps == 0 or global_step >= max_train_steps:
                    write_checkpoint()
                if global_step % args.validation_steps == 0:
                    metrics = run_validation(
                        accelerator, args, prior, validation_loader, vocabulary, tokenizer, image_size, global_step, log
                    )
                    prior.train()
                termination.checkpoint_and_stop_if_requested(
                    global_step, max_train_steps, args.checkpointing_steps,
                    write_checkpoint=write_checkpoint,
                    stop=lambda reason: stop_training(accelerator, args, reason, advice=""),
                )  # fmt: skip
                if global_step >= max_train_steps:
                    break
            if global_step >= max_train_steps:
                break
        termination.warn_if_received("the prior")
    progress.close()

    if not metrics or global_step % args.validation_steps:
        metrics = run_validation(
            accelerator, args, prior, validation_loader, vocabulary, tokenizer, image_size, global_step, log
        )
    metrics = {**metrics, "uniform_bits_per_token": math.log2(vocabulary.codebook_size), "step": global_step}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with model_save_errors(output_dir, global_step):
            save_prior(
                accelerator.unwrap_model(prior), vocabulary, output_dir, num_image_tokens,
                tokenizer=args.tokenizer, image_size=image_size, codebook_fingerprint=fingerprint,
                architecture=args.architecture,
            )  # fmt: skip
            write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            write_model_card(args, accelerator.unwrap_model(prior), output_dir, metrics)
        logger.info(f"Saved the prior to {output_dir}: {metrics['bits_per_token']:.3f} bits per token")
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    # Mistakes in the inputs (a missing folder, another tokenizer's tokens, a Hub id that cannot be reached): one line.
    run_script(lambda: main(parse_args()), TrainingStopped, CheckpointWriteError, ModelSaveError, ValueError, OSError)
