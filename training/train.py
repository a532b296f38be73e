#!/usr/bin/env python
"""Train a cdb-vq image tokenizer with 🤗 Accelerate.

With no data flags it trains a tiny tokenizer on random crops of the photos that ship with scikit-image, checks it
on crops of scikit-learn's two photos, and writes the model, its image processor, a reconstruction grid, a
codebook-usage plot and `metrics.json` to `--output_dir`, on a CPU in a few minutes:

    python training/train.py --output_dir outputs/demo

A real run on your own images, on every GPU of every machine `accelerate config` describes:

    accelerate launch training/train.py --train_data_dir path/to/images --output_dir outputs/cdb-vq \
        --mixed_precision bf16 --train_batch_size 16 --lpips_weight 1.0

Flags follow the diffusers training scripts; `--config run.yaml` takes the same names as keys, and every field of
`CDBVQConfig` is a flag too (`--assignment`, `--codebook_size`, ...). The flags, presets and their checks live in
`cdb_tokenizer/tools/train_args.py`; this file reads top to bottom: data -> model -> step -> loop -> save.
See docs/training.md and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

from cdb_tokenizer import CDBVQConfig, CDBVQImageProcessor, CDBVQModel
from cdb_tokenizer.modeling_cdb_vq import flatten_grid
from cdb_tokenizer.tools.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    complete_checkpoints,
    decided_by_main_process,
    load_custom_state,
    load_training_state,
    save_checkpoint,
    set_aside_later_checkpoints,
    write_failure,
)
from cdb_tokenizer.tools.data import (
    EpochSampler,
    SplitNotFoundError,
    StreamingTrainImages,
    TrainImages,
    WithoutImages,
    collate_images,
    decode_image,
    fixed_crops,
    image_key,
    load_image_dataset,
    sample_photos,
    skipped_image_message,
    train_transform,
)
from cdb_tokenizer.tools.degradations import canonical_spec, degrade
from cdb_tokenizer.tools.evaluation import (
    code_usage_counts,
    eval_mode,
    evaluate,
    psnr,
    reconstruction_grid,
    save_reconstruction_figure,
    save_usage_plot,
)
from cdb_tokenizer.tools.files import (
    claim_output_dir,
    create_folders,
    file_sha256,
    output_dir_claims,
    saved_weights,
    share_safetensors,
    write_text,
)
from cdb_tokenizer.tools.losses import LPIPSUnavailableError, PatchDiscriminator, TokenizerLoss, cached_lpips, load_lpips
from cdb_tokenizer.tools.messages import counted, first_line, listed, run_script
from cdb_tokenizer.tools.redaction import public_value, redact_secrets
from cdb_tokenizer.tools.roles import role_map_figure, save_role_map
from cdb_tokenizer.tools.runs import (
    EMAWeights,
    RunLog,
    TerminationRequest,
    find_checkpoint,
    launch_settings,
    make_accelerator,
    refuse_fp16_without_a_gradient_scaler,
    tracker_init_kwargs,
    warn_of_a_warmup_longer_than_the_run,
)
from cdb_tokenizer.tools.steps import TrainingParts, derived_seed, restart_dead_codes, training_step
from cdb_tokenizer.tools.train_args import parse_args, resumes_its_own_run
from cdb_tokenizer.tools.teacher import (
    kmeans_prototypes,
    load_clip_teacher,
    load_prototypes,
    prototype_key,
    prototype_source,
    read_prototype_labels,
    save_prototypes,
    text_prototypes,
)

logger = get_logger(__name__, log_level="INFO")


class TrainingStopped(RuntimeError):
    """Training stopped before the end (e.g. losses that stay NaN); checkpoints written so far are intact."""


class ModelSaveError(RuntimeError):
    """The final model could not be written (a full disk); the last checkpoint is complete, and a resume saves it."""


class UploadFailed(RuntimeError):
    """--push_to_hub could not upload the model, which is saved in --output_dir."""


# The seed of what validation scores (a sample of the validation split, the images held out of the training split,
# the demo's crops): the same images whatever --seed, so runs of several seeds, and resumes, are scored alike.
VALIDATION_SAMPLE_SEED = 0


class OutputDirInUse(ValueError):
    """--output_dir holds another run, and neither --resume_from_checkpoint nor --overwrite_output_dir was given."""


# What marks an output folder as holding a run, and what --overwrite_output_dir deletes (nothing else that lies
# there: config.json and the remote-code files are replaced by save_pretrained at the end of the new run).
RUN_MARKERS = ("checkpoints", "training_config.json", "metrics.json", "model.safetensors")
PROTOTYPES_FILE = "prototypes.safetensors"  # the built prototypes, cached for resumes and published with the model
RUN_FILES = RUN_MARKERS + (
    "reconstructions.png", "codebook_usage.png", PROTOTYPES_FILE, "role_map.png", "restorations.png"
)


# ----------------------------------------------------------------------------------------------------------------
# Run setup: threads, the Accelerator, the output folder, the networks a run borrows
# ----------------------------------------------------------------------------------------------------------------


def set_num_threads(args: argparse.Namespace) -> int:
    """Apply --num_threads (else OMP_NUM_THREADS, else `default_num_threads()`) to torch; returns the number."""
    if args.num_threads is not None:
        threads = args.num_threads
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = default_num_threads()
    threads = max(1, threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def default_num_threads() -> int:
    """CPU threads for torch when neither --num_threads nor OMP_NUM_THREADS says: this process's share of the cores
    it may run on, less the cores other jobs keep busy now (1-minute load average), and at least one. On a shared
    machine idle OpenMP threads spin while they wait for a busy core, so more threads than idle cores is slower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:
        idle = cores
    return max(1, min(share, int(idle + 0.5)))


def refuse_sharded_training(accelerator: Accelerator | None) -> None:
    """FSDP and DeepSpeed shard the weights the quantizer rewrites inside its forward (k-means init, EMA codes,
    restarts): a sharded run would lose those updates or crash in them, and its checkpoints could not be resumed
    (they are read with pickle: `refuse_pickled_states`). Say so before any work, also where accelerate would
    silently fall back to DDP (on CPUs) although the config asked for FSDP or DeepSpeed. Called before the
    Accelerator is made (`None`: the launcher's settings; accelerate fails on DeepSpeed not being installed) and
    after."""
    for kind, variable in ((DistributedType.FSDP, "ACCELERATE_USE_FSDP"), (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED")):
        asked = os.environ.get(variable, "false").lower() in ("1", "true", "yes")
        if asked or (accelerator is not None and accelerator.distributed_type == kind):
            name = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed"
            raise ValueError(
                f"train.py does not support {name}: the quantizer updates its codebook inside the forward pass, which "
                f"sharded parameters would lose. Use DDP (`accelerate config`: multi-GPU / multi-node, no {name}); the "
                f"tokenizer (~70M parameters at the default config) fits one GPU whole."
            )


def hub_model_id(args: argparse.Namespace) -> str:
    """--hub_model_id, else the output folder's name (as transformers' Trainer does; `.` is the current folder's)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def setup_run(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator and seed, and its output folder (refusing one that holds another run)."""
    refuse_sharded_training(None)
    accelerator = make_accelerator(args, Path(args.output_dir), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    refuse_sharded_training(accelerator)
    if args.push_to_hub:  # a missing token or a bad repo id must not wait for the end of the training
        from cdb_tokenizer.tools.publishing import check_push_settings

        check_push_settings(hub_model_id(args), args.hub_token)
    if accelerator.mixed_precision == "fp16" and args.disc_weight > 0:
        # Both optimisers share accelerate's one gradient scaler: clipping unscales it twice (an error) and each
        # step's update() rescales the other's gradients. bf16 needs no scaler.
        raise ValueError("--mixed_precision fp16 cannot train the discriminator (--disc_weight > 0); use bf16.")
    refuse_fp16_without_a_gradient_scaler(accelerator)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    if args.hub_token:
        logger.warning("--hub_token shows in the process list and the shell history (or sits in its --config file); "
                       "prefer `hf auth login` or HF_TOKEN. It is not written to training_config.json or the trackers.")  # fmt: skip
    return accelerator


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Create and claim --output_dir, refusing one that a running process holds, or that holds another run unless
    the user said to resume or to start over."""
    output_dir = Path(args.output_dir)

    def claim() -> str | None:
        try:
            created = create_folders(output_dir)
        except OSError as error:
            reason = error.strerror or first_line(error)
            raise ValueError(f"--output_dir {output_dir} cannot be created: {reason}.") from error
        if not os.access(output_dir, os.W_OK | os.X_OK):  # found now, not after the data and the k-means are loaded
            raise ValueError(
                f"--output_dir {output_dir} cannot be written to (a read-only file system, or no permission)."
            )
        return claim_output_dir(output_dir, created=created)

    refusal = decided_by_main_process(accelerator, claim)  # the main process's word (or error), on every process
    if refusal is not None:
        raise OutputDirInUse(refusal)
    if args.resume_from_checkpoint not in (None, "latest"):
        # A named checkpoint is checked before this folder's run is refused or deleted for it: the folder itself,
        # a typo or a missing path is no checkpoint, whatever --overwrite_output_dir says. A bare name
        # (`checkpoint-800`) is one of --output_dir's: the path found is the one used from here on.
        args.resume_from_checkpoint = str(find_checkpoint(args.resume_from_checkpoint, output_dir, accelerator))
    found = [name for name in RUN_MARKERS if (output_dir / name).exists()] if output_dir.is_dir() else []
    log_file = output_dir / args.logging_dir / "train_log.jsonl"
    if log_file.is_file():
        found.append(str(Path(args.logging_dir) / "train_log.jsonl"))
    if found and args.overwrite_output_dir:
        accelerator.wait_for_everyone()  # every process has looked before the main process deletes
        if accelerator.is_main_process:
            logger.warning(f"--overwrite_output_dir: deleting the previous run's {', '.join(found)} in {output_dir}.")
            for name in RUN_FILES:
                target = output_dir / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
            logging_dir = (output_dir / args.logging_dir).resolve()
            if logging_dir.is_dir() and output_dir.resolve() in logging_dir.parents:
                shutil.rmtree(logging_dir)
            else:
                log_file.unlink(missing_ok=True)
    elif found and args.resume_from_checkpoint is None:
        raise OutputDirInUse(
            f"--output_dir {output_dir} holds another run ({listed(found, 4)}). "
            f"Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over (its "
            f"checkpoints, logs and model are deleted), or choose another --output_dir."
        )
    elif found and not resumes_its_own_run(args):
        # Another folder's checkpoint would continue here, setting this run's later checkpoints aside and
        # overwriting its model.
        raise OutputDirInUse(
            f"--output_dir {output_dir} holds another run ({listed(found, 4)}), "
            f"and --resume_from_checkpoint {args.resume_from_checkpoint} is a checkpoint of another folder. Choose "
            f"another --output_dir to continue it in, or pass --overwrite_output_dir to replace this run with it."
        )
    elif found and args.resume_from_checkpoint == "latest" and not complete_checkpoints(output_dir)[0]:
        if (output_dir / "model.safetensors").exists():
            raise OutputDirInUse(
                f"--output_dir {output_dir} holds a finished model but no complete checkpoint to resume: a new run would "
                f"overwrite it. Pass --overwrite_output_dir to start over, or choose another --output_dir."
            )
    accelerator.wait_for_everyone()


def load_teacher(args: argparse.Namespace, accelerator: Accelerator):
    """The CLIP teacher of `--clip_model`, or None; every process has it or none does (each loads it on its own, and
    a process without it would skip the semantic losses and the barriers of the prototypes: a hang)."""
    if args.clip_model is None:
        return None
    teacher = load_clip_teacher(args.clip_model, args.clip_pretrained, device=accelerator.device, cache_dir=args.cache_dir)
    loaded = gather_object([teacher is not None])
    if any(loaded) and not all(loaded):
        missing = [rank for rank, has_teacher in enumerate(loaded) if not has_teacher]
        raise ValueError(
            f"the CLIP teacher ({args.clip_model}) loaded on some processes but not on process(es) {missing}: put its "
            f"weights where every machine finds them (--cache_dir, HF_HOME), or pass --clip_model none."
        )
    return teacher


def load_lpips_modules(args: argparse.Namespace, accelerator: Accelerator) -> tuple:
    """(the LPIPS loss module with --lpips_weight, else None; the LPIPS validation metric: that module, or LPIPS
    when its weights happen to be at hand, else None). The loss module needs its weights: without, this stops."""
    lpips_module = None
    if args.lpips_weight > 0:
        lpips_module = load_lpips(args.lpips_network, required=True).to(accelerator.device)
    return lpips_module, lpips_module or _optional_lpips(args.lpips_network, accelerator)


def _optional_lpips(network: str, accelerator: Accelerator):
    """LPIPS for validation when its weights happen to be at hand (never downloads)."""
    try:
        module = cached_lpips(network)
    except LPIPSUnavailableError as error:  # a damaged file at the cache path: validation goes on without LPIPS
        logger.warning(f"Validating without LPIPS: {error}")
        return None
    return module.to(accelerator.device) if module is not None else None


def _validation_fid(args, accelerator: Accelerator):
    """The rFID metric `--validation_fid` asks for, or None (one logged line when the Inception weights are missing)."""
    if args.validation_fid is None:
        return None
    from cdb_tokenizer.tools.evaluation import RandomFeatureExtractor, optional_fid_metric

    if args.validation_fid == "random":
        logger.info("rFID with a small random feature extractor: a smoke test of the path, not comparable to Inception FIDs.")
        return optional_fid_metric(device=accelerator.device, feature_extractor=RandomFeatureExtractor())
    return optional_fid_metric(args.fid_weights, device=accelerator.device)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, accelerator: Accelerator):
    """The training images (a map-style source or a stream), the held-out validation pixel values (N, 3, R, R) and
    how many validation images could not be read."""
    if args.train_data_dir is None and args.dataset_name is None:
        logger.info("No data flags: training on crops of scikit-image's photos and colour wheel, validating on scikit-learn's photos.")
        crops_per_photo = math.ceil(args.num_validation_images / 2)
        validation = fixed_crops(sample_photos("sklearn"), args.resolution, crops_per_photo,
                                 seed=VALIDATION_SAMPLE_SEED, crop_scale=tuple(args.random_crop_scale))  # fmt: skip
        validation = validation[: args.num_validation_images]
        return sample_photos("demo"), validation, 0
    source = {
        "train_data_dir": args.train_data_dir, "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name, "image_column": args.image_column,
        "streaming": args.streaming, "cache_dir": args.cache_dir,
    }  # fmt: skip
    with accelerator.main_process_first():
        train = load_image_dataset(split="train", **source)
        validation = _validation_split(args, source)
    # Validation scores a sample, not the first N: files come sorted, and a class-sorted split gave the first classes
    # only. Under a fixed seed, so that runs of other seeds (or a resume with another) are scored on the same images.
    if validation is not None and args.streaming:
        validation = validation.shuffle(seed=VALIDATION_SAMPLE_SEED, buffer_size=args.shuffle_buffer_size)
    elif validation is not None and len(validation) > args.num_validation_images:
        validation = validation.shuffle(seed=VALIDATION_SAMPLE_SEED, keep_in_memory=True)
        validation = validation.select(range(args.num_validation_images))
    if validation is None:  # hold images out of the training split
        if args.streaming:
            # Held out by content, not by position: a stream split over processes or loader workers skips per
            # shard, so `skip(n)` dropped other images than the n held out (and trained on some of those).
            sample = train.shuffle(seed=VALIDATION_SAMPLE_SEED, buffer_size=args.shuffle_buffer_size)
            validation = list(sample.take(args.num_validation_images))
            held_out = {image_key(item[args.image_column]) for item in validation}
            train = train.filter(WithoutImages(held_out, args.image_column))
        else:
            if len(train) <= args.num_validation_images:
                raise ValueError(
                    f"the training split has {counted(len(train), 'image')}, too few to hold out "
                    f"{args.num_validation_images} for validation: add images, lower --num_validation_images, or give "
                    f"a validation split (a validation/ folder beside train/)."
                )
            held_out = train.train_test_split(test_size=args.num_validation_images, seed=VALIDATION_SAMPLE_SEED)
            train, validation = held_out["train"], held_out["test"]
    if args.max_train_samples is not None:
        train = train.take(args.max_train_samples) if args.streaming else train.select(range(min(args.max_train_samples, len(train))))
    return train, *_validation_pixels(args, validation)


def _validation_split(args: argparse.Namespace, source: dict):
    names = [args.validation_split] if args.validation_split else ["validation", "test"]
    for name in names:
        try:
            return load_image_dataset(split=name, **source)
        except SplitNotFoundError:
            if args.validation_split:
                raise
    return None


def _validation_pixels(args: argparse.Namespace, validation) -> tuple[torch.Tensor, int]:
    processor = CDBVQImageProcessor(size={"height": args.resolution, "width": args.resolution})
    images, unreadable = [], 0
    for item in itertools.islice(validation, args.num_validation_images):
        errors = []
        image = decode_image(item[args.image_column], errors=errors)
        if image is None:
            unreadable += 1
            logger.warning(f"Skipping unreadable validation image {skipped_image_message(item[args.image_column], errors)}.")
            continue
        images.append(image)
    if unreadable:
        logger.warning(f"Skipped {unreadable} unreadable validation images.")
    if not images:
        raise ValueError("no readable validation images.")
    return processor(images, return_tensors="pt").pixel_values, unreadable


@dataclass
class Validation:
    """The held-out images (N, 3, R, R), how many could not be read, and the optional LPIPS and rFID metrics."""

    pixel_values: torch.Tensor
    skipped_images: int
    lpips: torch.nn.Module | None = None
    fid: object | None = None


def build_train_loader(args: argparse.Namespace, train, accelerator: Accelerator):
    """A DataLoader of this process's augmented training batches and its (resumable) sampler."""
    transform = train_transform(args.resolution, tuple(args.random_crop_scale), flip=args.random_flip)
    loader_kwargs = {
        "batch_size": args.train_batch_size, "collate_fn": collate_images, "drop_last": True,
        "num_workers": args.dataloader_num_workers, "pin_memory": torch.cuda.is_available(),
        # Its own generator: every new iterator (each epoch, and the first one after a resume) draws its workers'
        # base seed from it rather than from the global RNG, which would shift the dropout masks of a resumed run.
        "generator": torch.Generator().manual_seed(args.seed),
    }  # fmt: skip
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(train, rank=accelerator.process_index, world_size=accelerator.num_processes)
        dataset = StreamingTrainImages(shard, transform, args.seed, args.image_column, args.shuffle_buffer_size,
                                       process_index=accelerator.process_index)  # fmt: skip
        return torch.utils.data.DataLoader(dataset, **loader_kwargs), None
    dataset = TrainImages(train, transform, args.seed, args.image_column)
    sampler = EpochSampler(len(dataset), args.train_batch_size, args.seed, accelerator.num_processes, accelerator.process_index)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, **loader_kwargs), sampler


def batch_stream(loader, sampler: EpochSampler | None, start_batch: int = 0) -> Iterator[dict]:
    """Training batches forever, epoch after epoch, starting `start_batch` batches into the run."""
    if sampler is not None:
        epoch, skip = divmod(start_batch, sampler.batches_per_epoch)
    else:  # a stream has no known length: replay and drop the batches already seen
        epoch, skip = 0, 0
    to_drop = 0 if sampler is not None else start_batch
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch, skip)
        loader.dataset.set_epoch(epoch)
        produced = False
        for batch in loader:
            produced = True
            if to_drop:
                to_drop -= 1
                continue
            yield batch
        if not produced:
            raise ValueError("the training data produced no batch (fewer images than one batch?).")
        epoch, skip = epoch + 1, 0


def total_train_steps(args: argparse.Namespace, sampler: EpochSampler | None) -> int:
    """--max_train_steps, else what --num_train_epochs makes of the data (decided once the data is known; args stay
    as parsed)."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    # Rounded up, and at least one: a floor gave fewer epochs than asked, and 0 steps (an untrained model, saved
    # without a word) when an epoch held fewer batches than one accumulation window.
    return max(1, math.ceil(args.num_train_epochs * sampler.batches_per_epoch / args.gradient_accumulation_steps))


# ----------------------------------------------------------------------------------------------------------------
# Model: prototypes, weights, the codebook's k-means start
# ----------------------------------------------------------------------------------------------------------------


def build_prototypes(args: argparse.Namespace, teacher, train_loader, sampler, accelerator: Accelerator):
    """(prototypes, labels) from `--prototypes`, cached in the output folder; (None, None) without them, or without
    a teacher (the codes could not be tied to them: the ties, and the labels a published model shows, would be
    arbitrary)."""
    if args.prototypes is None:
        return None, None
    if teacher is None:
        logger.warning(f"--prototypes {args.prototypes} needs the CLIP teacher, which is unavailable: training without prototypes.")
        return None, None
    kind, _, value = args.prototypes.partition(":")
    if kind not in ("text", "kmeans"):
        return load_prototypes(args.prototypes)
    cache, key = Path(args.output_dir) / PROTOTYPES_FILE, prototype_cache_key(args, accelerator)
    # Only a cache of the same labels, template, teacher (and k-means settings and data): one left by a run with
    # others, e.g. one that stopped before writing anything else, used to be taken as it was. The main process
    # decides for all (a read error on one process alone would send it down the other branch: mismatched barriers).
    cached = decided_by_main_process(accelerator, lambda: cache.is_file() and prototype_source(cache, "key") == key)
    if cached:
        logger.info(f"Using the prototypes cached in {cache}.")
        return load_prototypes(cache)
    if accelerator.is_main_process:
        if kind == "text":
            labels = read_prototype_labels(value)
            prototypes = text_prototypes(teacher, labels, args.prototype_template)
        else:
            labels = None
            if sampler is not None:
                sampler.set_epoch(0)
            batches = (batch["pixel_values"] for batch in train_loader)
            with accelerator.autocast():
                prototypes = kmeans_prototypes(teacher, batches, int(value), max_batches=args.prototype_kmeans_batches, seed=args.seed)
        save_prototypes(cache, prototypes, labels, source=args.prototypes, key=key)
        logger.info(f"Built {prototypes.shape[0]} prototypes ({args.prototypes}) and saved them to {cache}.")
    accelerator.wait_for_everyone()
    return load_prototypes(cache)  # every process reads the same file, so every process has the same prototypes


def prototype_cache_key(args: argparse.Namespace, accelerator: Accelerator) -> str:
    """Everything the built prototypes depend on (see `prototype_key`)."""
    data = (f"{args.train_data_dir or args.dataset_name} {args.resolution} {args.train_batch_size} "
            f"{args.max_train_samples} {accelerator.num_processes}")  # what k-means clusters  # fmt: skip
    return prototype_key(args.prototypes, args.prototype_template, f"{args.clip_model} {args.clip_pretrained}",
                         args.seed, args.prototype_kmeans_batches, data)  # fmt: skip


def keep_prototype_file_with_the_model(args: argparse.Namespace, accelerator: Accelerator, model: CDBVQModel) -> None:
    """After a resume, the output folder's prototypes file (which is published) holds the checkpoint's prototypes:
    a resume may rebuild it from other data (`kmeans:N` over other batches), while the model keeps the prototypes
    it was trained with."""
    cache = Path(args.output_dir) / PROTOTYPES_FILE
    quantizer = model.quantizer
    if not accelerator.is_main_process or not quantizer.has_prototypes or not cache.is_file():
        return
    prototypes = quantizer.prototypes.detach().float().cpu()
    cached, _ = load_prototypes(cache)
    if cached.shape != prototypes.shape or not torch.equal(cached, prototypes):
        save_prototypes(cache, prototypes, model.config.prototype_labels, source=args.prototypes,
                        key=prototype_cache_key(args, accelerator))  # fmt: skip
        logger.info(f"Rewrote {cache} with the prototypes of the checkpoint (the model's own).")


def build_model(args: argparse.Namespace, teacher, prototypes: torch.Tensor | None, labels) -> CDBVQModel:
    config = dict(args.model_config_dict)
    if teacher is not None and config.get("semantic_dim") != teacher.embed_dim:
        logger.info(f"semantic_dim set to the CLIP teacher's width, {teacher.embed_dim}.")
        config["semantic_dim"] = teacher.embed_dim
    if prototypes is not None:
        if teacher is None and prototypes.shape[1] != config.get("semantic_dim", CDBVQConfig().semantic_dim):
            config["semantic_dim"] = prototypes.shape[1]
        if prototypes.shape[1] != config.get("semantic_dim"):
            raise ValueError(f"the prototypes have {prototypes.shape[1]} dimensions but semantic_dim is {config['semantic_dim']}.")
        config["num_prototypes"] = prototypes.shape[0]
    model = CDBVQModel(CDBVQConfig(**config))
    if prototypes is not None:
        model.set_prototypes(prototypes, labels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@torch.no_grad()
def initialize_codebook(args, model: CDBVQModel, batches, accelerator: Accelerator, teacher=None) -> None:
    """k-means initialisation of the codebook from the latents of the first training batches (all processes).

    With a teacher and prototypes, each code is then tied to the prototype closest to the mean CLIP feature of the
    latents it won, so the router's semantic term and the code-alignment loss start from a sensible map.
    """
    config = model.config
    tokens_per_batch = (args.resolution // config.downsampling_factor) ** 2 * args.train_batch_size * accelerator.num_processes
    num_batches = args.kmeans_init_batches or max(1, min(64, math.ceil(4 * config.codebook_size / tokens_per_batch)))
    use_prototypes = teacher is not None and model.quantizer.has_prototypes
    latents, features, signals = [], [], []
    with eval_mode(model), accelerator.autocast():
        for index, batch in enumerate(itertools.islice(batches, num_batches)):
            pixel_values = batch["pixel_values"].to(accelerator.device)
            # Restoration: the codes start from latents of what the encoder will see (step -1: before training).
            degraded = degraded_inputs(args, pixel_values, -1, index, accelerator.process_index)
            encoded = model.encode(pixel_values if degraded is None else degraded, return_dict=True)
            latents.append(flatten_grid(encoded.latents).float())
            if encoded.signal_features is not None:  # with code roles: each range starts on latents of its kind
                signals.append(flatten_grid(encoded.signal_features).float())
            if use_prototypes:
                grid = encoded.latents.shape[-2:]
                features.append(flatten_grid(teacher.patch_features(pixel_values, grid_size=grid)).float())
    latents = torch.cat(latents)
    model.quantizer.initialize_codebook(latents, iterations=args.kmeans_init_iterations, seed=args.seed,
                                        signal_features=torch.cat(signals) if signals else None)  # fmt: skip
    logger.info(f"Initialised the codebook by k-means of {latents.shape[0] * accelerator.num_processes} latents ({num_batches} batches per process).")
    if use_prototypes:
        code_to_prototype = model.quantizer.tie_codes_to_prototypes(latents, torch.cat(features))
        model.set_prototypes(model.quantizer.prototypes.clone(), model.config.prototype_labels, code_to_prototype)


def save_run_config(args: argparse.Namespace, accelerator: Accelerator, model: CDBVQModel, max_train_steps: int,
                    skipped_validation_images: int) -> dict:  # fmt: skip
    """Write training_config.json (the parsed flags, what the run decided, the model config; no secrets) from the
    main process; returns the run's configuration without the model config (for the trackers)."""
    # A relative folder (`data/saved`) reads like a Hub id: the model card must not link it as one.
    local = bool(args.dataset_name) and Path(args.dataset_name).expanduser().is_dir()
    # The teacher and the prototypes decide these two (see `build_model`): record the model's, not the flags'.
    decided = {name: getattr(model.config, name) for name in ("semantic_dim", "num_prototypes")}
    run_config = {**vars(args), **decided, "model_config_dict": {**args.model_config_dict, **decided},
                  **launch_settings(args, accelerator), "max_train_steps": max_train_steps,
                  "skipped_validation_images": skipped_validation_images, "dataset_is_local": local}  # fmt: skip
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "training_config.json", redact_secrets({**run_config, "model_config": model.config.to_dict()}))
    return run_config


def write_json(path: Path, values: dict) -> None:
    write_text(path, json.dumps(values, indent=2, default=str) + "\n")  # whole: never half a metrics file


# ----------------------------------------------------------------------------------------------------------------
# Step: the loss, the optimisers and what one step works with (the step itself: cdb_tokenizer/tools/steps.py)
# ----------------------------------------------------------------------------------------------------------------


def build_loss(args, lpips_module) -> TokenizerLoss:
    """The pixel-space losses of the run (the quantizer and semantic terms come with the model's output)."""
    return TokenizerLoss(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, lpips_weight=args.lpips_weight, lpips=lpips_module,
        disc_weight=args.disc_weight, disc_start=args.disc_start, disc_loss=args.disc_loss,
        adaptive_disc_weight=args.adaptive_disc_weight, high_frequency_weight=args.high_frequency_weight,
    )  # fmt: skip


def build_training_parts(args: argparse.Namespace, model: CDBVQModel, accelerator: Accelerator, loss_module: TokenizerLoss,
                         teacher, max_train_steps: int) -> TrainingParts:  # fmt: skip
    """What each training step works with: AdamW and the learning-rate schedule of the model and, with
    --disc_weight, of a PatchGAN discriminator, all prepared by accelerate, with the loss and the teacher."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        logger.info(f"--scale_lr: learning rate {args.learning_rate:g} x the global batch = {learning_rate:g}")
    warn_of_a_warmup_longer_than_the_run(args, max_train_steps)
    optimizer = _adamw(args, [p for p in model.parameters() if p.requires_grad], learning_rate)
    scheduler = _scheduler(args, optimizer, accelerator, max_train_steps)
    discriminator = disc_optimizer = disc_scheduler = None
    if args.disc_weight <= 0:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        discriminator = PatchDiscriminator(model.config.num_channels, args.disc_base_channels, args.disc_num_layers)
        disc_optimizer = _adamw(args, discriminator.parameters(), args.disc_learning_rate or learning_rate)
        # Stepped from --disc_start only, so its schedule spans the steps it trains (over all of them, a cosine
        # ended at a tenth of its peak).
        disc_scheduler = _scheduler(args, disc_optimizer, accelerator, max(max_train_steps - args.disc_start, 1))
        model, discriminator, optimizer, disc_optimizer, scheduler, disc_scheduler = accelerator.prepare(
            model, discriminator, optimizer, disc_optimizer, scheduler, disc_scheduler
        )
    unwrapped = accelerator.unwrap_model(model)
    return TrainingParts(
        accelerator, model, optimizer, loss_module, unwrapped=unwrapped, scheduler=scheduler,
        discriminator=discriminator, disc_optimizer=disc_optimizer, disc_scheduler=disc_scheduler, teacher=teacher,
        grid_size=unwrapped.token_grid_size(args.resolution, args.resolution), max_grad_norm=args.max_grad_norm,
    )  # fmt: skip


def _adamw(args, parameters, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)  # fmt: skip


def _scheduler(args, optimizer, accelerator: Accelerator, max_train_steps: int):
    from transformers import get_scheduler

    # accelerate steps a prepared scheduler once per process, so count in process-steps (as diffusers does).
    return get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )  # fmt: skip


def degraded_inputs(args, pixel_values: torch.Tensor, step: int, micro_batch: int, process_index: int) -> torch.Tensor | None:
    """Restoration (`--degradation`): what the encoder sees, the batch degraded under a seed a resumed run draws
    again; None otherwise (the encoder sees the batch)."""
    if not args.degradation:
        return None
    return degrade(pixel_values, args.degradation, seed=derived_seed(args.seed, step, micro_batch, process_index))


def accumulated_step(args: argparse.Namespace, parts: TrainingParts, batches: Iterator[dict], state: RunState):
    """One optimisation step over --gradient_accumulation_steps batches: (the mean of each loss term, the first
    non-finite term or None, the last batch's model output)."""
    step_terms, bad_term = {}, None
    for micro_batch in range(args.gradient_accumulation_steps):
        batch = next(batches)
        state.skipped_ids.update(batch["skipped_ids"])
        state.unshared_skips = state.unshared_skips or bool(batch["skipped_ids"])
        inputs = degraded_inputs(args, batch["pixel_values"], state.step, micro_batch, parts.accelerator.process_index)
        terms, bad_term, output = training_step(parts, batch["pixel_values"], state.step, bad_term, inputs)
        for name, value in terms.items():
            step_terms[name] = step_terms.get(name, 0.0) + float(value.detach()) / args.gradient_accumulation_steps
    return step_terms, bad_term, output


# ----------------------------------------------------------------------------------------------------------------
# Loop: resume, logs, validation, checkpoints
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What the loop counts and a checkpoint keeps (in its JSON state), so that a resumed run counts on."""

    step: int = 0
    # Unreadable training images, by name: counted once however often the data passes over them.
    skipped_ids: set[str] = field(default_factory=set)
    nonfinite_steps: int = 0
    # Non-finite steps in a row up to now (--max_nonfinite_steps stops the run): a resumed run counts on.
    nonfinite_in_a_row: int = 0
    # What decides where a resumed run re-enters the data (checked on resume).
    data_order: dict = field(default_factory=dict)
    # What the run trains the model to do beyond its config's shape (checked on resume).
    objective: dict = field(default_factory=dict)
    # What lays out the learning-rate schedule (a resume with other values warns).
    schedule: dict = field(default_factory=dict)
    # Wall time of the sessions before this one, up to the checkpoint it resumed from (a resumed run counts on).
    earlier_seconds: float = 0.0
    session_start: float = field(default_factory=time.time)
    # Whether this process met unreadable images that the others have not been told of (not checkpointed).
    unshared_skips: bool = False

    @classmethod
    def from_checkpoint(cls, step: int, saved: dict, data_order: dict, objective: dict, schedule: dict) -> RunState:
        skipped = set(saved.get("skipped_image_ids", []))
        nonfinite = (int(saved.get("nonfinite_steps", 0)), int(saved.get("nonfinite_in_a_row", 0)))
        earlier = saved.get("wall_time_seconds", 0.0)  # absent from checkpoints of older versions
        earlier = float(earlier) if isinstance(earlier, (int, float)) and math.isfinite(earlier) and earlier > 0 else 0.0
        return cls(step, skipped, *nonfinite, data_order, objective, schedule, earlier)

    def wall_time_seconds(self) -> float:
        """Wall time of the run so far, over every session (each up to the checkpoint the next one resumed from)."""
        return self.earlier_seconds + time.time() - self.session_start

    def share_skipped_ids(self, accelerator: Accelerator) -> None:
        """Every process's unreadable images, on every process (each only meets those of its own batches)."""
        if accelerator.num_processes > 1:
            self.skipped_ids = set().union(*gather_object([sorted(self.skipped_ids)]))
        self.unshared_skips = False

    def to_checkpoint(self, ema: EMAWeights | None) -> dict:
        return {"step": self.step, "skipped_image_ids": sorted(self.skipped_ids), "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "ema_weights_decay": ema.decay if ema is not None else None,
                "ema_weights_updates": ema.updates if ema is not None else None, "data_order": self.data_order,
                "schedule": self.schedule,
                "objective": self.objective, "wall_time_seconds": round(self.wall_time_seconds(), 1)}  # fmt: skip


def data_order(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    order = {"train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
             "num_processes": accelerator.num_processes, "seed": args.seed, "max_train_samples": args.max_train_samples,
             "validation_seed": VALIDATION_SAMPLE_SEED}  # fmt: skip
    if args.streaming:  # a stream's order also depends on how it is sharded and shuffled
        order.update(dataloader_num_workers=args.dataloader_num_workers, shuffle_buffer_size=args.shuffle_buffer_size)
    return order


def training_objective(args: argparse.Namespace, teacher) -> dict:
    """What the model learns to do beyond its config's shape: restoration's degradation (which the saved config
    records, and `cdb-vq restore` relies on), the CLIP teacher (without it the semantic terms, prototypes and
    `semantic_dim` would differ) and the prototypes (a resume restores their embeddings from the checkpoint, so
    edited labels would name other embeddings). Loss weights may change on resume, as learning rates may."""
    return {"restoration_degradation": args.model_config_dict.get("restoration_degradation"),
            "teacher": teacher.name if teacher is not None else None,
            # The name gives local files by their base name: their content tells two `epoch_5.pt` apart.
            "teacher_weights": getattr(teacher, "weights_digest", None),
            "prototypes": _prototypes_identity(args) if teacher is not None else None}  # fmt: skip


def _prototypes_identity(args: argparse.Namespace) -> str | None:
    """`--prototypes` as what it gives the model, not where it is read from: text labels and their template, a
    file's content (both by digest), or `kmeans:N` (whose data and process count may change on resume)."""
    if args.prototypes is None:
        return None
    kind, _, value = args.prototypes.partition(":")
    if kind == "text":
        content = json.dumps([read_prototype_labels(value), args.prototype_template]).encode()
        return f"text labels and template {hashlib.sha256(content).hexdigest()[:12]}"
    if kind == "kmeans":
        return args.prototypes
    return f"file {file_sha256(args.prototypes)[:12]}"


def changed_settings(saved: dict | None, now: dict) -> list[str]:
    """`key old -> new` for each setting of `now` that a checkpoint's `saved` records otherwise."""
    return [f"{key} {saved[key]!r} -> {now[key]!r}" for key in now if saved and key in saved and saved[key] != now[key]]


def refuse_another_objective(saved: dict | None, now: dict) -> None:
    """A resume must train what the checkpoint trained: without --degradation a restoration run would go on with
    clean inputs and save a model whose config no longer says it restores, without a word. (Checkpoints written
    before this check record nothing, and are not checked.)"""
    changed = changed_settings(saved, now)
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint: the checkpoint was trained with other settings ({', '.join(changed)}); resume "
            f"with the --degradation, the CLIP teacher and the --prototypes (labels and --prototype_template) it was "
            f"trained with (a teacher whose weights cannot be had here is unavailable), or start over with "
            f"--overwrite_output_dir."
        )


def learning_rate_schedule(args: argparse.Namespace, max_train_steps: int) -> dict:
    """What lays out the schedule beside its peak (another --learning_rate is said by `keep_optimizer_settings`)."""
    return {"lr_scheduler": args.lr_scheduler, "lr_warmup_steps": args.lr_warmup_steps,
            "max_train_steps": max_train_steps}  # fmt: skip


def warn_if_schedule_changed(saved: dict | None, now: dict, step: int, learning_rate: float) -> None:
    """A resume with another schedule (a longer run, another warm-up) goes on from the checkpoint's step of the new
    schedule: the learning rate jumps at the resume. Allowed (it is how a finished run is extended), but said."""
    changed = changed_settings(saved, now)
    if changed:
        logger.warning(f"Resuming with {', '.join(changed)}: the learning-rate schedule is laid out anew for them, and "
                       f"goes on from step {step} at rate {learning_rate:.3g}.")  # fmt: skip


def warn_if_data_order_changed(saved: dict | None, now: dict) -> None:
    """A resume with another batch size, accumulation, process count or seed re-enters the data elsewhere than the
    checkpoint left it: say so (it is allowed, e.g. to resume on other hardware)."""
    changed = changed_settings(saved, now)
    if changed:
        logger.warning(f"Resuming with {', '.join(changed)}: the run re-enters the data at another batch than the "
                       f"checkpoint left it, and its losses will not match an uninterrupted run's.")  # fmt: skip
    if saved and "validation_seed" not in saved and saved.get("seed", VALIDATION_SAMPLE_SEED) != VALIDATION_SAMPLE_SEED:
        logger.warning(
            f"The checkpoint was written before validation images were drawn under a fixed seed: with --seed "
            f"{saved['seed']} the images held out of a training split (and the demo's crops) are now others, so "
            f"validation may score images the run trained on. Data with a validation split is unaffected."
        )


def check_training_state(path: Path, state: dict) -> None:
    """Refuse a checkpoint's JSON state whose fields `RunState.from_checkpoint` could not use (a checkpoint comes
    from anyone): one line naming the field, not a traceback from deep in the resume."""
    damaged = "the checkpoint is damaged or tampered with"
    for key in ("objective", "data_order", "schedule"):
        if not isinstance(state.get(key) or {}, dict):
            raise CheckpointError(f"{path}: its training state's {key!r} is not a JSON object; {damaged}.")
    skipped = state.get("skipped_image_ids", [])
    if not isinstance(skipped, list) or not all(isinstance(image_id, str) for image_id in skipped):
        raise CheckpointError(f"{path}: its training state's 'skipped_image_ids' is not a list of image ids; {damaged}.")
    for key in ("nonfinite_steps", "nonfinite_in_a_row"):
        value = state.get(key, 0)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{path}: its training state's {key!r} is {value!r}, not a count of steps; {damaged}.")


def resume(accelerator: Accelerator, args, max_train_steps: int, schedules: list, objective: dict) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Load the checkpoint `--resume_from_checkpoint` names: (its step, its custom tensors, its JSON state).

    `latest` is the newest *complete* checkpoint (one whose manifest matches its files); incomplete ones (a run
    killed while writing) are skipped and named. Returns (0, {}, {}) when there is nothing to resume.
    """
    path = find_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator)
    if path is None:
        return 0, {}, {}
    tensors, state = load_custom_state(path)  # safetensors and JSON: nothing is unpickled
    check_training_state(path, state)
    refuse_another_objective(state.get("objective"), objective)  # before the weights: their shapes may differ too
    refuse_a_discriminator_the_checkpoint_lacks(path, schedules)
    # The later checkpoints are set aside once the whole resume is accepted (the EMA weights are checked after this).
    step = load_training_state(accelerator, path, args.output_dir, max_train_steps, schedules, set_aside=False)
    logger.info(f"Resumed from {path} (step {step}).")
    return step, tensors, state


def refuse_a_discriminator_the_checkpoint_lacks(path: Path, schedules: list) -> None:
    """Refuse to resume a run without a discriminator into one with it: accelerate looked for the second model's file
    and the error blamed a damaged checkpoint. (The other way round, the checkpoint's discriminator is left unread.)"""
    if "discriminator" in [name for name, _, _ in schedules] and not any(
        (Path(path) / name).is_file() for name in ("model_1.safetensors", "pytorch_model_1.bin")
    ):
        raise CheckpointError(
            f"cannot resume from {path}: it was written without a discriminator (--disc_weight 0), and this run "
            f"trains one; resume with --disc_weight 0, or start a new run with --disc_weight and --disc_start (the "
            f"step from which it trains)."
        )


def _schedules(parts: TrainingParts) -> list[tuple[str, torch.optim.Optimizer, object]]:
    pairs = [("model", parts.optimizer, parts.scheduler), ("discriminator", parts.disc_optimizer, parts.disc_scheduler)]
    return [(name, optimizer, scheduler) for name, optimizer, scheduler in pairs if optimizer is not None]


def resume_or_initialize(args: argparse.Namespace, parts: TrainingParts, ema: EMAWeights | None, train_loader,
                         sampler: EpochSampler | None, max_train_steps: int) -> RunState:  # fmt: skip
    """Resume from --resume_from_checkpoint (weights, optimisers, EMA and the loop's counts), or start afresh with
    the k-means initialisation of the codebook (and of its EMA copy)."""
    order, objective = data_order(args, parts.accelerator), training_objective(args, parts.teacher)
    schedule = learning_rate_schedule(args, max_train_steps)
    step, tensors, saved = resume(parts.accelerator, args, max_train_steps, _schedules(parts), objective)
    if step > 0:
        if ema is not None:
            ema.load_tensors(tensors, saved, source=args.resume_from_checkpoint)
        elif any(name.startswith("ema/") for name in tensors):  # a requeue that forgot the flag changes the model saved
            logger.warning("The checkpoint holds a weight EMA (it was written with --use_ema), which this run without "
                           "--use_ema drops: the saved model will be the raw weights. Pass --use_ema to keep it.")  # fmt: skip
        warn_if_data_order_changed(saved.get("data_order"), order)
        warn_if_schedule_changed(saved.get("schedule"), schedule, step, parts.scheduler.get_last_lr()[0])
        keep_prototype_file_with_the_model(args, parts.accelerator, parts.unwrapped)
        if step < max_train_steps:  # a run that trains past an earlier checkpoint abandons the later ones
            set_aside_later_checkpoints(parts.accelerator, args.output_dir, step)
    else:
        model = parts.unwrapped
        initialize_codebook(args, model, batch_stream(train_loader, sampler), parts.accelerator, parts.teacher)
        if ema is not None:
            ema.copy_rows(model, "quantizer.codebook.weight", torch.arange(model.config.codebook_size))
    return RunState.from_checkpoint(step, saved, order, objective, schedule)


def saved_at_step(output_dir: str | Path, accelerator: Accelerator, key: str = "steps") -> int:
    """The step of the model saved in `output_dir` (its metrics.json, written after the model, records it under
    `key`), or -1 if none is: a run killed between its final checkpoint and the end of saving has no metrics.json, or
    an earlier run's. Read by the main process for all (processes that disagreed would part ways)."""

    def read() -> int:
        try:
            step = json.loads((Path(output_dir) / "metrics.json").read_text()).get(key, -1)
        except (OSError, ValueError, AttributeError):
            return -1
        return step if isinstance(step, int) else -1

    return decided_by_main_process(accelerator, read)


def nothing_left_to_train(args: argparse.Namespace, accelerator: Accelerator, step: int, max_train_steps: int) -> dict:
    """A resume at or past --max_train_steps: say so and leave the model as it is; returns its saved metrics."""
    output_dir = Path(args.output_dir)
    logger.info(f"Nothing left to train: the checkpoint is at step {step} and --max_train_steps is "
                f"{max_train_steps}. The model in {output_dir} is left as it is (raise --max_train_steps to go on).")  # fmt: skip
    accelerator.end_training()
    metrics_file = output_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def hparams(run_config: dict) -> dict:
    """Tracker-friendly copy of the run's configuration (scalars only), without secrets (--hub_token, ...) and with
    every local path cut to its last part (trackers such as W&B upload what they are given)."""
    public = public_value(run_config)
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in public.items()}


def start_logging(args: argparse.Namespace, accelerator: Accelerator, run_config: dict, step: int) -> RunLog:
    """Start the trackers (with the run's configuration) and the run log, whose lines after `step` are dropped, as
    TensorBoard's events are: a resumed run trains those steps again, and they are never logged twice."""
    if accelerator.is_main_process:
        tracker_options = tracker_init_kwargs(args.report_to, step)
        accelerator.init_trackers(args.tracker_project_name, config=hparams(run_config), init_kwargs=tracker_options)
    log = RunLog(accelerator, Path(args.output_dir) / args.logging_dir / "train_log.jsonl")
    if accelerator.is_main_process:
        log.truncate_after(step)
    return log


def log_start(args: argparse.Namespace, parts: TrainingParts, max_train_steps: int, threads: int) -> None:
    model, teacher = parts.unwrapped, parts.teacher
    logger.info(
        f"Training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({args.model_preset} preset, "
        f"{model.config.assignment} assignment, {model.config.codebook_size} codes) for {max_train_steps} "
        f"steps on {parts.accelerator.num_processes} process(es), {args.train_batch_size} images each x "
        f"{args.gradient_accumulation_steps} accumulation; teacher: {teacher.name if teacher else 'none'}; "
        f"{threads} CPU thread(s) per process."
    )


def train_loop(args: argparse.Namespace, parts: TrainingParts, ema: EMAWeights | None, batches: Iterator[dict],
               validation: Validation, log: RunLog, state: RunState, max_train_steps: int) -> tuple[dict, float | None]:  # fmt: skip
    """Train from `state.step` to `max_train_steps`: steps (a NaN step is skipped, too many in a row stop the run),
    weight EMA, dead-code restarts, logs, validation and checkpoints. A SIGTERM (preemption) ends the step, writes
    its checkpoint and stops the run (`TrainingStopped`). Returns the last validation metrics ({} when none ran) and
    the seconds per step (None when no step was trained)."""
    accelerator = parts.accelerator
    progress = tqdm(range(max_train_steps), initial=state.step, desc="steps", disable=not accelerator.is_main_process)
    metrics, first_step, loop_start = {}, state.step, time.time()
    with TerminationRequest(accelerator) as termination:
        while state.step < max_train_steps:
            metrics = loop_step(args, parts, ema, batches, validation, log, state, max_train_steps, progress) or metrics
            termination.checkpoint_and_stop_if_requested(
                state.step, max_train_steps, args.checkpointing_steps,
                write_checkpoint=lambda: save_run_checkpoint(args, accelerator, state, ema),
                stop=lambda reason: stop_training(accelerator, args, reason, advice=""),
            )  # fmt: skip
        termination.warn_if_received("its model")
    progress.close()
    trained = state.step - first_step  # none after a resume that only has its model left to save
    return metrics, (time.time() - loop_start) / trained if trained else None


def loop_step(args: argparse.Namespace, parts: TrainingParts, ema: EMAWeights | None, batches: Iterator[dict],
              validation: Validation, log: RunLog, state: RunState, max_train_steps: int, progress) -> dict | None:  # fmt: skip
    """One step, then its validation and checkpoint when they are due; returns the validation metrics, if any."""
    accelerator, metrics = parts.accelerator, None
    learning_rate = parts.scheduler.get_last_lr()[0]  # the rate this step trains at (the schedule moves at its end)
    step_terms, bad_term, output = accumulated_step(args, parts, batches, state)
    state.step += 1
    progress.update(1)
    if bad_term:
        state.nonfinite_in_a_row += 1
        state.nonfinite_steps += 1
        what = bad_term if bad_term == "gradient norm" else f"{bad_term} loss"
        logger.error(f"Step {state.step}: the {what} is NaN or infinite; this step was skipped (no weights changed).")
        if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
            stop_training(accelerator, args, f"{state.nonfinite_in_a_row} steps in a row had a NaN or infinite loss ({bad_term})")
    else:
        state.nonfinite_in_a_row = 0
        after_good_step(args, parts, ema, log, progress, state, step_terms, output, learning_rate)

    # A skipped step keeps the schedule: its validation and checkpoint (of the unchanged weights) still happen.
    if state.step % args.validation_steps == 0 or state.step == max_train_steps:
        # Every process validates on the whole held-out set (each computes its own metrics, with no
        # cross-process sync, so every process gets the same numbers).
        metrics = validate(parts.unwrapped, validation, args, log, state.step, ema)
        logger.info(f"Step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if state.step % args.checkpointing_steps == 0 or state.step == max_train_steps:
        save_run_checkpoint(args, accelerator, state, ema)
    return metrics


def save_run_checkpoint(args: argparse.Namespace, accelerator: Accelerator, state: RunState, ema: EMAWeights | None) -> None:
    """The checkpoint of `state.step`: weights, optimisers and RNG states, the weight EMA and the loop's counts."""
    state.share_skipped_ids(accelerator)  # the checkpoint is written by the main process alone
    save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit,
                    tensors=ema.to_tensors() if ema is not None else None, state=state.to_checkpoint(ema))  # fmt: skip


def after_good_step(args, parts: TrainingParts, ema: EMAWeights | None, log: RunLog, progress, state: RunState,
                    step_terms: dict, output, learning_rate: float) -> None:  # fmt: skip
    """What follows a step whose update was applied: the weight EMA, dead-code restarts and the step's log (with the
    learning rate the step trained at)."""
    model = parts.unwrapped
    if ema is not None:
        ema.update(model)
    restarted = 0
    if args.dead_code_restart_steps and state.step % args.dead_code_restart_steps == 0:
        restarted = restart_dead_codes(model, output, args.seed + state.step, ema)
    means = mean_over_processes(parts.accelerator, step_terms, state)
    values = {f"loss/{name}": value for name, value in means.items()}
    values.update({"train/utilization": float(output.utilization), "train/perplexity": float(output.perplexity),
                   "train/learning_rate": learning_rate, "train/skipped_images": len(state.skipped_ids),
                   "train/nonfinite_steps": state.nonfinite_steps, "codebook/restarted": restarted})  # fmt: skip
    log(values, state.step)
    progress.set_postfix(loss=f"{values['loss/total']:.4f}", used=f"{float(output.utilization):.0%}")


def mean_over_processes(accelerator: Accelerator, step_terms: dict[str, float], state: RunState) -> dict[str, float]:
    """The step's loss terms averaged over every process's batch (the log's usage and perplexity count them all too),
    and the unreadable images shared when any process met new ones, so that the log counts every process's: one
    small all-reduce per step."""
    if accelerator.num_processes == 1:
        return step_terms
    packed = torch.tensor([*step_terms.values(), float(state.unshared_skips)], device=accelerator.device)
    packed = accelerator.reduce(packed, "sum").tolist()
    if packed[-1] > 0:
        state.share_skipped_ids(accelerator)
    return {name: value / accelerator.num_processes for name, value in zip(step_terms, packed[:-1])}


def stop_training(accelerator: Accelerator, args, reason: str, advice: str = ", e.g. with a lower --learning_rate") -> None:
    """End the trackers and raise `TrainingStopped` naming `reason` and the last complete checkpoint to resume from
    (every process calls it at the same step)."""
    accelerator.end_training()
    kept = complete_checkpoints(args.output_dir)[0]
    raise TrainingStopped(
        f"training stopped: {reason}. Nothing was overwritten; the last checkpoint is "
        f"{kept[-1] if kept else '(none yet)'} (resume with --resume_from_checkpoint latest{advice})."
    )


def validation_batches(pixel_values: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(pixel_values.split(batch_size))


@torch.no_grad()
def reconstruct(model: CDBVQModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Reconstructions (on the CPU, float32) in eval mode, so the codebook statistics are left alone."""
    with eval_mode(model):
        return model(pixel_values.to(device=model.device, dtype=model.dtype), return_dict=True).reconstruction.float().cpu()


def validate(model: CDBVQModel, validation: Validation, args, log: RunLog, step: int, ema: EMAWeights | None = None) -> dict:
    """Validation metrics (and a reconstruction grid in the trackers) of the model, with EMA weights if any."""
    pixel_values = validation.pixel_values
    with ema.applied(model) if ema is not None else nullcontext():
        metrics = evaluate(model, validation_batches(pixel_values, args.train_batch_size), lpips=validation.lpips,
                           show_progress=False, fid=validation.fid)  # fmt: skip
        originals = pixel_values[: args.num_grid_images]
        reconstructions = reconstruct(model, originals)
        if args.degradation:
            metrics.update(restoration_metrics(model, pixel_values, args))
        role_picture = role_map_picture(model, originals)
    log({f"validation/{name}": value for name, value in metrics.items() if name != "num_images"}, step)
    log.image("validation/reconstructions", reconstruction_grid(originals, reconstructions), step)
    if role_picture is not None:
        log.image("validation/role_map", role_picture, step)
    return metrics


VALIDATION_DEGRADATION_SEED = 12345


def restoration_metrics(model: CDBVQModel, validation: torch.Tensor, args) -> dict:
    """PSNR of the clean validation images from their degraded versions (fixed seed): the model's restoration
    (`restoration_psnr`) and the degraded input itself (`degraded_input_psnr`)."""
    degraded = degrade(validation, args.degradation, seed=VALIDATION_DEGRADATION_SEED)
    restored = torch.cat([reconstruct(model, batch) for batch in validation_batches(degraded, args.train_batch_size)])
    return {"restoration_psnr": psnr(restored, validation), "degraded_input_psnr": psnr(degraded, validation)}


@torch.no_grad()
def role_map_picture(model: CDBVQModel, images: torch.Tensor) -> torch.Tensor | None:
    """Held-out images beside their role maps (3, H, W) in [0, 1], or None when the model has no roles."""
    if not model.config.code_roles:
        return None
    with eval_mode(model):
        role_map = model.role_map(images.to(device=model.device, dtype=model.dtype)).cpu()
    return role_map_figure(images, role_map, model.config.role_names)


# ----------------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------------


def save_run(args: argparse.Namespace, parts: TrainingParts, ema: EMAWeights | None, validation: Validation,
             state: RunState, metrics: dict, seconds_per_step: float | None, num_prototypes: int) -> dict:  # fmt: skip
    """The end of the run, on every process: the final metrics (main process), the saved model and its pictures,
    the trackers closed, and the Hub upload with --push_to_hub. Returns the metrics."""
    accelerator = parts.accelerator
    state.share_skipped_ids(accelerator)
    skipped_images = len(state.skipped_ids)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics.update(steps=state.step, wall_time_seconds=round(state.wall_time_seconds(), 1),
                       skipped_images=skipped_images, skipped_validation_images=validation.skipped_images,
                       nonfinite_steps=state.nonfinite_steps, num_processes=accelerator.num_processes,
                       seconds_per_step=round(seconds_per_step, 4) if seconds_per_step is not None else None,
                       teacher=parts.teacher.name if parts.teacher else None, prototypes=num_prototypes)  # fmt: skip
        if "rfid" in metrics:  # an Inception rFID or the offline smoke test's random features: never to be confused
            metrics["rfid_features"] = args.validation_fid
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        with model_save_errors(args.output_dir, state.step):
            save_outputs(parts.unwrapped, validation.pixel_values, args, metrics, ema)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def publish(args: argparse.Namespace) -> None:
    """Upload the saved model (--push_to_hub). The model stays saved whatever the upload does: a failure says so and
    how to retry it, instead of a traceback from the Hub client."""
    from cdb_tokenizer.tools.publishing import push_to_hub

    repo = hub_model_id(args)
    try:
        commit = push_to_hub(args.output_dir, repo, private=args.hub_private_repo, token=args.hub_token)
    except Exception as error:  # noqa: BLE001 - transport and HTTP errors of the Hub client share no base class
        retry = ["python", "training/publish.py", args.output_dir, "--hub_model_id", repo]
        retry += ["--private"] * args.hub_private_repo  # else a retry after a failed create_repo made it public
        raise UploadFailed(
            f"the upload to {repo} failed ({type(error).__name__}: {first_line(error)}). The model is saved in "
            f"{args.output_dir}; retry the upload with: {shlex.join(retry)}"
        ) from error
    logger.info(f"Uploaded to {repo}: {commit.commit_url}")


def picture_images(args, validation: torch.Tensor, factor: int) -> list[torch.Tensor]:
    """Held-out images for reconstructions.png: without data flags, scikit-learn's two photos whole (shorter side
    256, cut to a multiple of the downsampling factor); else the first `--num_grid_images` validation images."""
    if args.train_data_dir is not None or args.dataset_name is not None:
        return list(validation[: args.num_grid_images])
    processor = CDBVQImageProcessor(size={"shortest_edge": 256}, do_center_crop=False)
    images = [processor(photo, return_tensors="pt").pixel_values[0] for photo in sample_photos("sklearn")]
    return [image[:, : image.shape[1] // factor * factor, : image.shape[2] // factor * factor] for image in images]


@contextmanager
def model_save_errors(output_dir: str | Path, step: int) -> Iterator[None]:
    """A final save that fails (a full disk; safetensors' error is no OSError, and was a traceback) as one line that
    says the last checkpoint is complete and how to save the model from it (train.py and train_prior.py)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise ModelSaveError(
            f"could not save the model to {output_dir} ({write_failure(error, Path(output_dir))}); the checkpoint of "
            f"step {step} is complete: make room, then --resume_from_checkpoint latest saves the model without "
            f"training again."
        ) from error


def save_restoration_figure(model: CDBVQModel, originals: list[torch.Tensor], args, metrics: dict, path: Path) -> None:
    """restorations.png of a restoration model: the pictures' images degraded (with validation's fixed seed) beside
    what the model made of them and the originals; the caption gives the held-out restoration numbers."""
    # One seed per picture (they may differ in size, so they are not degraded as one batch): the same seed for each
    # gave every picture the same draw, one alternative of an 'A|B' spec and one strength of a range.
    degraded = [degrade(image[None], args.degradation, seed=VALIDATION_DEGRADATION_SEED + index)[0]
                for index, image in enumerate(originals)]
    restored = [reconstruct(model, image[None])[0] for image in degraded]
    caption = (f"degraded by {canonical_spec(args.degradation)}; held-out: restored "
               f"{metrics.get('restoration_psnr', float('nan')):.2f} dB, degraded input "
               f"{metrics.get('degraded_input_psnr', float('nan')):.2f} dB")  # fmt: skip
    save_reconstruction_figure(originals, restored, path, caption=caption, degraded=degraded)


def save_outputs(model: CDBVQModel, validation: torch.Tensor, args, metrics: dict, ema: EMAWeights | None) -> None:
    """The final model and processor, metrics.json, reconstructions.png and codebook_usage.png (and
    restorations.png, role_map.png)."""
    output_dir = Path(args.output_dir)
    with ema.applied(model) if ema is not None else nullcontext():
        model.save_pretrained(output_dir)
        share_safetensors(saved_weights(output_dir))
        originals = picture_images(args, validation, model.config.downsampling_factor)
        reconstructions = [reconstruct(model, image[None])[0] for image in originals]
        caption = (f"held-out: {validation.shape[0]} crops at {args.resolution}x{args.resolution}, PSNR "
                   f"{metrics.get('psnr', float('nan')):.2f} dB, SSIM {metrics.get('ssim', float('nan')):.3f}; "
                   f"{model.config.codebook_size} codes, f{model.config.downsampling_factor}, {metrics.get('steps', '?')} steps")  # fmt: skip
        save_reconstruction_figure(originals, reconstructions, output_dir / "reconstructions.png", caption=caption)
        if args.degradation:
            save_restoration_figure(model, originals, args, metrics, output_dir / "restorations.png")
        counts = code_usage_counts(model, validation_batches(validation, args.train_batch_size))
    CDBVQImageProcessor(size={"height": args.resolution, "width": args.resolution}).save_pretrained(output_dir)
    save_usage_plot(counts, output_dir / "codebook_usage.png", code_roles=model.config.code_roles,
                    title=f"codebook usage on {validation.shape[0]} held-out images")  # fmt: skip
    if model.config.code_roles:
        role_images = validation[: args.num_grid_images]  # one batch of equal crops (the pictures may differ in size)
        with ema.applied(model) if ema is not None else nullcontext(), eval_mode(model):
            role_map = model.role_map(role_images.to(device=model.device, dtype=model.dtype)).cpu()
        save_role_map(role_images, role_map, model.config.role_names, output_dir / "role_map.png")
    write_json(output_dir / "metrics.json", metrics)
    figures = ["reconstructions.png", "codebook_usage.png"] + ["role_map.png"] * bool(model.config.code_roles)
    figures += ["restorations.png"] * bool(args.degradation)
    logger.info(f"Saved the tokenizer, {', '.join(figures)}, metrics.json to {output_dir}.")


def log_done(start_time: float, steps: int, seconds_per_step: float | None, threads: int, metrics: dict,
             codebook_size: int, output_dir: Path) -> None:
    """The run's last line: time, speed and the held-out numbers."""
    elapsed = time.time() - start_time
    if sys.argv and Path(sys.argv[0]).name == "train.py":  # the whole command, imports included
        elapsed = process_seconds() or elapsed
    minutes, seconds = divmod(round(elapsed), 60)
    rfid = f", rFID {metrics['rfid']:.3f}" if "rfid" in metrics else ""
    logger.info(
        f"Done in {minutes} min {seconds:02d} s wall time ({steps} steps, "
        f"{'no step trained in this run' if seconds_per_step is None else f'{seconds_per_step:.2f} s/step'}, "
        f"{threads} CPU thread(s) per process): held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}"
        f"{rfid}, {metrics['utilization']:.1%} of {codebook_size} codes used. Outputs: {output_dir}"
    )


def process_seconds() -> float | None:
    """Seconds since this process started (Linux), so the final log line counts the imports too; None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# The run: data -> model -> step -> loop -> save
# ----------------------------------------------------------------------------------------------------------------


@output_dir_claims()
def train(args: argparse.Namespace) -> tuple[CDBVQModel, dict]:
    """Train with parsed arguments; returns this process's (unwrapped) model and the final metrics (main process)."""
    start_time = time.time()
    threads = set_num_threads(args)
    accelerator = setup_run(args)
    # The networks the run borrows, loaded first so that a missing one stops the run before the data is read.
    teacher = load_teacher(args, accelerator)
    lpips_module, lpips_metric = load_lpips_modules(args, accelerator)
    fid = _validation_fid(args, accelerator)

    # Data
    train_images, validation_pixels, skipped_validation_images = load_data(args, accelerator)
    if fid is not None and len(validation_pixels) < 2:  # unreadable images left fewer than rFID needs
        logger.warning(f"Only {len(validation_pixels)} readable validation image(s): validating without rFID, which needs two.")
        fid = None
    validation = Validation(validation_pixels, skipped_validation_images, lpips_metric, fid)
    train_loader, sampler = build_train_loader(args, train_images, accelerator)
    max_train_steps = total_train_steps(args, sampler)

    # Model
    prototypes, labels = build_prototypes(args, teacher, train_loader, sampler, accelerator)
    set_seed(args.seed)  # the same initial weights whatever the steps above drew
    model = build_model(args, teacher, prototypes, labels)

    # Step
    parts = build_training_parts(args, model, accelerator, build_loss(args, lpips_module), teacher, max_train_steps)
    ema = EMAWeights(parts.unwrapped, args.ema_weights_decay) if args.use_ema else None
    state = resume_or_initialize(args, parts, ema, train_loader, sampler, max_train_steps)
    state.session_start = start_time
    if state.step > 0 and state.step >= max_train_steps:
        if saved_at_step(args.output_dir, accelerator) >= state.step:
            return parts.unwrapped, nothing_left_to_train(args, accelerator, state.step, max_train_steps)
        logger.info(f"The run stopped after its last checkpoint (step {state.step}) before its model was saved: "
                    f"validating and saving it now.")  # fmt: skip
    # Once the checkpoint is accepted: a refused resume leaves the run's training_config.json as it was.
    run_config = save_run_config(args, accelerator, model, max_train_steps, skipped_validation_images)

    # Loop
    log = start_logging(args, accelerator, run_config, state.step)
    log_start(args, parts, max_train_steps, threads)
    batches = batch_stream(train_loader, sampler, start_batch=state.step * args.gradient_accumulation_steps)
    metrics, seconds_per_step = train_loop(args, parts, ema, batches, validation, log, state, max_train_steps)

    # Save
    metrics = metrics or validate(parts.unwrapped, validation, args, log, state.step, ema)
    num_prototypes = int(prototypes.shape[0]) if prototypes is not None else 0
    metrics = save_run(args, parts, ema, validation, state, metrics, seconds_per_step, num_prototypes)
    if accelerator.is_main_process:
        log_done(start_time, state.step, seconds_per_step, threads, metrics, parts.unwrapped.config.codebook_size,
                 Path(args.output_dir))  # fmt: skip
        if args.push_to_hub:
            publish(args)
    return parts.unwrapped, metrics


def main(argv: list[str] | None = None) -> dict:
    """Run a training from command-line flags; returns the final validation metrics (also in metrics.json)."""
    return train(parse_args(argv))[1]


if __name__ == "__main__":
    # Mistakes in the inputs (a missing folder, a column that does not exist, ...) and clean stops: one line.
    run_script(main, TrainingStopped, UploadFailed, CheckpointWriteError, ModelSaveError, LPIPSUnavailableError, OSError,
               ValueError)  # fmt: skip
