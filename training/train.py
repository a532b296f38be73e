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
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from cdb_tokenizer import CDBVQConfig, CDBVQImageProcessor, CDBVQModel
from cdb_tokenizer.modeling_cdb_vq import flatten_grid
from cdb_tokenizer.tools.checkpoints import (
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    load_custom_state,
    save_checkpoint,
)
from cdb_tokenizer.tools.data import (
    EpochSampler,
    SplitNotFoundError,
    StreamingTrainImages,
    TrainImages,
    collate_images,
    decode_image,
    describe_image_value,
    fixed_crops,
    load_image_dataset,
    sample_photos,
    train_transform,
)
from cdb_tokenizer.tools.degradations import degrade
from cdb_tokenizer.tools.evaluation import (
    code_usage_counts,
    evaluate,
    reconstruction_grid,
    save_reconstruction_figure,
    save_usage_plot,
)
from cdb_tokenizer.tools.losses import LPIPSUnavailableError, PatchDiscriminator, TokenizerLoss, load_lpips, lpips_backbone_file
from cdb_tokenizer.tools.redaction import redact_secrets
from cdb_tokenizer.tools.roles import role_map_figure, save_role_map
from cdb_tokenizer.tools.runs import EMAWeights, RunLog, find_checkpoint, make_accelerator
from cdb_tokenizer.tools.steps import TrainingParts, degradation_seed, restart_dead_codes, training_step
from cdb_tokenizer.tools.train_args import parse_args
from cdb_tokenizer.tools.teacher import (
    kmeans_prototypes,
    load_clip_teacher,
    load_prototypes,
    prototype_source,
    read_prototype_labels,
    save_prototypes,
    text_prototypes,
)

logger = get_logger(__name__, log_level="INFO")


class TrainingStopped(RuntimeError):
    """Training stopped before the end (e.g. losses that stay NaN); checkpoints written so far are intact."""


class OutputDirInUse(ValueError):
    """--output_dir holds another run, and neither --resume_from_checkpoint nor --overwrite_output_dir was given."""


# What marks an output folder as holding a run, and what --overwrite_output_dir deletes (nothing else that lies
# there: config.json and the remote-code files are replaced by save_pretrained at the end of the new run).
RUN_MARKERS = ("checkpoints", "training_config.json", "metrics.json", "model.safetensors")
RUN_FILES = RUN_MARKERS + ("reconstructions.png", "codebook_usage.png", "prototypes.safetensors", "role_map.png")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, accelerator: Accelerator):
    """The training images (a map-style source or a stream), the held-out validation pixel values (N, 3, R, R) and
    how many validation images could not be read."""
    if args.train_data_dir is None and args.dataset_name is None:
        logger.info("No data flags: training on crops of scikit-image's photos, validating on scikit-learn's.")
        crops_per_photo = math.ceil(args.num_validation_images / 2)
        validation = fixed_crops(sample_photos("sklearn"), args.resolution, crops_per_photo, seed=args.seed,
                                 crop_scale=tuple(args.random_crop_scale))[: args.num_validation_images]  # fmt: skip
        return sample_photos("skimage"), validation, 0
    source = {
        "train_data_dir": args.train_data_dir, "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name, "image_column": args.image_column,
        "streaming": args.streaming, "cache_dir": args.cache_dir,
    }  # fmt: skip
    with accelerator.main_process_first():
        train = load_image_dataset(split="train", **source)
        validation = _validation_split(args, source)
    if validation is None:  # hold images out of the training split
        if args.streaming:
            validation, train = train.take(args.num_validation_images), train.skip(args.num_validation_images)
        else:
            if len(train) <= args.num_validation_images:
                raise ValueError(f"the training split has {len(train)} images, too few to hold out {args.num_validation_images} for validation.")
            held_out = train.train_test_split(test_size=args.num_validation_images, seed=args.seed)
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
        image = decode_image(item[args.image_column])
        if image is None:
            unreadable += 1
            logger.warning(f"Skipping unreadable validation image {describe_image_value(item[args.image_column])}.")
            continue
        images.append(image)
    if unreadable:
        logger.warning(f"Skipped {unreadable} unreadable validation images.")
    if not images:
        raise ValueError("no readable validation images.")
    return processor(images, return_tensors="pt").pixel_values, unreadable


def build_train_loader(args: argparse.Namespace, train, accelerator: Accelerator):
    """A DataLoader of this process's augmented training batches and its (resumable) sampler."""
    transform = train_transform(args.resolution, tuple(args.random_crop_scale), flip=args.random_flip)
    loader_kwargs = {
        "batch_size": args.train_batch_size, "collate_fn": collate_images, "drop_last": True,
        "num_workers": args.dataloader_num_workers, "pin_memory": torch.cuda.is_available(),
    }  # fmt: skip
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(train, rank=accelerator.process_index, world_size=accelerator.num_processes)
        dataset = StreamingTrainImages(shard, transform, args.seed, args.image_column, args.shuffle_buffer_size)
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


# ----------------------------------------------------------------------------------------------------------------
# Teacher, prototypes and model
# ----------------------------------------------------------------------------------------------------------------


def build_prototypes(args: argparse.Namespace, teacher, train_loader, sampler, accelerator: Accelerator):
    """(prototypes, labels) from `--prototypes`, cached in the output folder; (None, None) without them."""
    if args.prototypes is None:
        return None, None
    cache = Path(args.output_dir) / "prototypes.safetensors"
    kind, _, value = args.prototypes.partition(":")
    if kind not in ("text", "kmeans"):
        return load_prototypes(args.prototypes)
    cached = cache.is_file() and prototype_source(cache) == args.prototypes
    # Every process has looked at the cache before the main process (re)writes it, so all take the same branch.
    accelerator.wait_for_everyone()
    if cached:
        logger.info(f"Using the prototypes cached in {cache}.")
        return load_prototypes(cache)
    if teacher is None:
        logger.warning(f"--prototypes {args.prototypes} needs the CLIP teacher, which is unavailable: training without prototypes.")
        return None, None
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
        save_prototypes(cache, prototypes, labels, source=args.prototypes)
        logger.info(f"Built {prototypes.shape[0]} prototypes ({args.prototypes}) and saved them to {cache}.")
    accelerator.wait_for_everyone()
    return load_prototypes(cache)  # every process reads the same file, so every process has the same prototypes


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
    was_training = model.training
    model.eval()
    latents, features = [], []
    with accelerator.autocast():
        for batch in itertools.islice(batches, num_batches):
            pixel_values = batch["pixel_values"].to(accelerator.device)
            encoded = model.encode(pixel_values)
            latents.append(flatten_grid(encoded.latents).float())
            if use_prototypes:
                grid = encoded.latents.shape[-2:]
                features.append(flatten_grid(teacher.patch_features(pixel_values, grid_size=grid)).float())
    model.train(was_training)
    latents = torch.cat(latents)
    model.quantizer.initialize_codebook(latents, iterations=args.kmeans_init_iterations, seed=args.seed)
    logger.info(f"Initialised the codebook by k-means of {latents.shape[0] * accelerator.num_processes} latents ({num_batches} batches per process).")
    if use_prototypes:
        code_to_prototype = model.quantizer.tie_codes_to_prototypes(latents, torch.cat(features))
        model.set_prototypes(model.quantizer.prototypes.clone(), model.config.prototype_labels, code_to_prototype)


# ----------------------------------------------------------------------------------------------------------------
# Logging, validation, checkpoints
# ----------------------------------------------------------------------------------------------------------------


def validation_batches(pixel_values: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(pixel_values.split(batch_size))


@torch.no_grad()
def reconstruct(model: CDBVQModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Reconstructions (on the CPU, float32) in eval mode, so the codebook statistics are left alone."""
    was_training = model.training
    model.eval()
    try:
        return model(pixel_values.to(device=model.device, dtype=model.dtype)).reconstruction.float().cpu()
    finally:
        model.train(was_training)


def validate(model: CDBVQModel, validation: torch.Tensor, args, lpips_metric, log: RunLog, step: int, ema=None, fid=None) -> dict:
    """Validation metrics (and a reconstruction grid in the trackers) of the model, with EMA weights if any."""
    with ema.applied(model) if ema is not None else nullcontext():
        metrics = evaluate(model, validation_batches(validation, args.train_batch_size), lpips=lpips_metric,
                           show_progress=False, fid=fid)  # fmt: skip
        originals = validation[: args.num_grid_images]
        reconstructions = reconstruct(model, originals)
        if args.degradation:
            metrics.update(restoration_metrics(model, validation, args))
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

    def psnr(images: torch.Tensor) -> float:
        mse = (((images.float().clamp(-1, 1) - validation.float()) / 2) ** 2).mean().clamp_min(1e-12)  # as evaluate()
        return float(10 * torch.log10(1 / mse))

    return {"restoration_psnr": psnr(restored), "degraded_input_psnr": psnr(degraded)}


@torch.no_grad()
def role_map_picture(model: CDBVQModel, images: torch.Tensor) -> torch.Tensor | None:
    """Held-out images beside their role maps (3, H, W) in [0, 1], or None when the model has no roles."""
    if not model.config.code_roles:
        return None
    was_training = model.training
    model.eval()
    try:
        role_map = model.role_map(images.to(device=model.device, dtype=model.dtype)).cpu()
    finally:
        model.train(was_training)
    return role_map_figure(images, role_map, model.config.role_names)


def resume(accelerator: Accelerator, args) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Load the checkpoint `--resume_from_checkpoint` names: (its step, its custom tensors, its JSON state).

    `latest` is the newest *complete* checkpoint (one whose manifest matches its files); incomplete ones (a run
    killed while writing) are skipped and named. Returns (0, {}, {}) when there is nothing to resume.
    """
    path = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        return 0, {}, {}
    tensors, state = load_custom_state(path)  # safetensors and JSON: nothing is unpickled
    try:
        # accelerate reads the optimiser, scheduler and RNG states with torch.load(weights_only=True).
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - damaged or tampered files, or another run's shapes
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot resume from {path}: {type(error).__name__}: {first_line[:300]}. The checkpoint is damaged or "
            f"tampered with, or it belongs to a run with another configuration."
        ) from None
    step = checkpoint_step(path)
    logger.info(f"Resumed from {path} (step {step}).")
    return step, tensors, state


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Create --output_dir, refusing one that holds another run unless the user said to resume or to start over."""
    output_dir = Path(args.output_dir)
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
            f"--output_dir {output_dir} holds another run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}). "
            f"Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over (its "
            f"checkpoints, logs and model are deleted), or choose another --output_dir."
        )
    elif found and args.resume_from_checkpoint == "latest" and not complete_checkpoints(output_dir)[0]:
        if (output_dir / "model.safetensors").exists():
            raise OutputDirInUse(
                f"--output_dir {output_dir} holds a finished model but no complete checkpoint to resume: a new run would "
                f"overwrite it. Pass --overwrite_output_dir to start over, or choose another --output_dir."
            )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, default=str) + "\n")


def hparams(run_config: dict) -> dict:
    """Tracker-friendly copy of the run's configuration (scalars only), without secrets (--hub_token, ...)."""
    public = redact_secrets(run_config)
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in public.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def degraded_inputs(args, pixel_values: torch.Tensor, step: int, micro_batch: int, process_index: int) -> torch.Tensor | None:
    """Restoration (`--degradation`): what the encoder sees, the batch degraded under a seed a resumed run draws
    again; None otherwise (the encoder sees the batch)."""
    if not args.degradation:
        return None
    return degrade(pixel_values, args.degradation, seed=degradation_seed(args.seed, step, micro_batch, process_index))


def main(argv: list[str] | None = None) -> dict:
    """Run a training from command-line flags; returns the final validation metrics (also in metrics.json)."""
    return train(parse_args(argv))[1]


def process_seconds() -> float | None:
    """Seconds since this process started (Linux), so the final log line counts the imports too; None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


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


def train(args: argparse.Namespace) -> tuple[CDBVQModel, dict]:
    """Train with parsed arguments; returns this process's (unwrapped) model and the final metrics (main process)."""
    start_time = time.time()
    threads = set_num_threads(args)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    if args.hub_token:
        logger.warning("--hub_token on the command line shows in the process list and the shell history; prefer "
                       "`hf auth login` or HF_TOKEN. It is not written to training_config.json or the trackers.")  # fmt: skip

    teacher = None
    if args.clip_model is not None:
        teacher = load_clip_teacher(args.clip_model, args.clip_pretrained, device=accelerator.device, cache_dir=args.cache_dir)
    lpips_module = None
    if args.lpips_weight > 0:
        lpips_module = load_lpips(args.lpips_network, required=True).to(accelerator.device)
    lpips_metric = lpips_module or _optional_lpips(args.lpips_network, accelerator)
    fid = _validation_fid(args, accelerator)

    train_images, validation, skipped_validation_images = load_data(args, accelerator)
    train_loader, sampler = build_train_loader(args, train_images, accelerator)
    prototypes, labels = build_prototypes(args, teacher, train_loader, sampler, accelerator)
    set_seed(args.seed)  # the same initial weights whatever the steps above drew
    model = build_model(args, teacher, prototypes, labels)
    max_train_steps = args.max_train_steps  # --num_train_epochs decides it once the data is known; args stay as parsed
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * sampler.batches_per_epoch // args.gradient_accumulation_steps
    run_config = {**vars(args), "max_train_steps": max_train_steps,
                  "skipped_validation_images": skipped_validation_images}  # what training_config.json records
    if accelerator.is_main_process:
        write_json(output_dir / "training_config.json", redact_secrets({**run_config, "model_config": model.config.to_dict()}))

    loss_module = build_loss(args, lpips_module)
    model, discriminator, optimizer, disc_optimizer, scheduler, disc_scheduler = build_optimizers(
        args, model, accelerator, max_train_steps
    )
    unwrapped = accelerator.unwrap_model(model)
    plain_discriminator = accelerator.unwrap_model(discriminator) if discriminator is not None else None
    ema = EMAWeights(unwrapped, args.ema_weights_decay) if args.use_ema else None

    global_step, resumed_tensors, resumed_state = resume(accelerator, args)
    if ema is not None and global_step > 0:
        ema.load_tensors(resumed_tensors, resumed_state, source=args.resume_from_checkpoint)
    if global_step >= max_train_steps and global_step > 0:
        logger.info(f"Nothing left to train: the checkpoint is at step {global_step} and --max_train_steps is "
                    f"{max_train_steps}. The model in {output_dir} is left as it is (raise --max_train_steps to go on).")  # fmt: skip
        accelerator.end_training()
        metrics_file = output_dir / "metrics.json"
        return unwrapped, json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if global_step == 0:
        initialize_codebook(args, unwrapped, batch_stream(train_loader, sampler), accelerator, teacher)
        if ema is not None:
            ema.copy_rows(unwrapped, "quantizer.codebook.weight", torch.arange(unwrapped.config.codebook_size))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=hparams(run_config))
    log = RunLog(accelerator, output_dir / args.logging_dir / "train_log.jsonl")
    if accelerator.is_main_process:
        log.truncate_after(global_step)  # steps after the checkpoint are trained again: never logged twice
    grid_size = unwrapped.token_grid_size(args.resolution, args.resolution)

    logger.info(
        f"Training {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters ({args.model_preset} preset, "
        f"{unwrapped.config.assignment} assignment, {unwrapped.config.codebook_size} codes) for {max_train_steps} "
        f"steps on {accelerator.num_processes} process(es), {args.train_batch_size} images each x "
        f"{args.gradient_accumulation_steps} accumulation; teacher: {teacher.name if teacher else 'none'}; "
        f"{threads} CPU thread(s) per process."
    )
    batches = batch_stream(train_loader, sampler, start_batch=global_step * args.gradient_accumulation_steps)
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    # Unreadable training images, by name: counted once however often the data passes over them (and kept across
    # a resume through the checkpoint's JSON state).
    skipped_ids = set(resumed_state.get("skipped_image_ids", []))
    nonfinite_in_a_row, nonfinite_steps = 0, int(resumed_state.get("nonfinite_steps", 0))
    metrics, first_step, loop_start = {}, global_step, time.time()
    parts = TrainingParts(accelerator, model, optimizer, loss_module, unwrapped, scheduler, discriminator,
                          plain_discriminator, disc_optimizer, disc_scheduler, teacher, grid_size, args.max_grad_norm)  # fmt: skip
    while global_step < max_train_steps:
        step_terms, bad_term = {}, None
        for micro_batch in range(args.gradient_accumulation_steps):
            batch = next(batches)
            skipped_ids.update(batch["skipped_ids"])
            inputs = degraded_inputs(args, batch["pixel_values"], global_step, micro_batch, accelerator.process_index)
            terms, bad_term, output = training_step(parts, batch["pixel_values"], global_step, bad_term, inputs)
            for name, value in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + float(value.detach()) / args.gradient_accumulation_steps

        global_step += 1
        progress.update(1)
        if bad_term:
            nonfinite_in_a_row += 1
            nonfinite_steps += 1
            logger.error(f"Step {global_step}: the {bad_term} loss is NaN or infinite; this step was skipped (no weights changed).")
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                _stop(accelerator, args, f"{nonfinite_in_a_row} steps in a row had a NaN or infinite loss ({bad_term})")
            continue
        nonfinite_in_a_row = 0
        if ema is not None:
            ema.update(unwrapped)
        restarted = 0
        if args.dead_code_restart_steps and global_step % args.dead_code_restart_steps == 0:
            restarted = restart_dead_codes(unwrapped, output.latents, args.seed + global_step, ema)
        values = {f"loss/{name}": value for name, value in step_terms.items()}
        values.update({"train/utilization": float(output.utilization), "train/perplexity": float(output.perplexity),
                       "train/learning_rate": scheduler.get_last_lr()[0], "train/skipped_images": len(skipped_ids),
                       "train/nonfinite_steps": nonfinite_steps, "codebook/restarted": restarted})  # fmt: skip
        log(values, global_step)
        progress.set_postfix(loss=f"{step_terms['total']:.4f}", used=f"{float(output.utilization):.0%}")

        if global_step % args.validation_steps == 0 or global_step == max_train_steps:
            # Every process validates on the whole held-out set: torchmetrics syncs its states across processes,
            # so all must take part (and all get the same numbers).
            metrics = validate(unwrapped, validation, args, lpips_metric, log, global_step, ema, fid)
            logger.info(f"Step {global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                            tensors=ema.to_tensors() if ema is not None else None,
                            state={"step": global_step, "skipped_image_ids": sorted(skipped_ids),
                                   "nonfinite_steps": nonfinite_steps,
                                   "ema_weights_decay": ema.decay if ema is not None else None})  # fmt: skip
    progress.close()
    seconds_per_step = (time.time() - loop_start) / max(1, global_step - first_step)

    metrics = metrics or validate(unwrapped, validation, args, lpips_metric, log, global_step, ema, fid)
    skipped_images = len(set().union(*gather_object([sorted(skipped_ids)]))) if accelerator.num_processes > 1 else len(skipped_ids)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics.update(steps=global_step, wall_time_seconds=round(time.time() - start_time, 1),
                       skipped_images=skipped_images, skipped_validation_images=skipped_validation_images,
                       nonfinite_steps=nonfinite_steps, num_processes=accelerator.num_processes,
                       seconds_per_step=round(seconds_per_step, 4),
                       teacher=teacher.name if teacher else None,
                       prototypes=int(prototypes.shape[0]) if prototypes is not None else 0)  # fmt: skip
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        save_outputs(unwrapped, validation, args, metrics, ema)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        from cdb_tokenizer.tools.publishing import push_to_hub

        push_to_hub(str(output_dir), args.hub_model_id or output_dir.name, private=args.hub_private_repo, token=args.hub_token)
    if accelerator.is_main_process:
        log_done(start_time, global_step, seconds_per_step, threads, metrics, unwrapped.config.codebook_size, output_dir)
    return unwrapped, metrics


def build_loss(args, lpips_module) -> TokenizerLoss:
    """The pixel-space losses of the run (the quantizer and semantic terms come with the model's output)."""
    return TokenizerLoss(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, lpips_weight=args.lpips_weight, lpips=lpips_module,
        disc_weight=args.disc_weight, disc_start=args.disc_start, disc_loss=args.disc_loss,
        adaptive_disc_weight=args.adaptive_disc_weight, high_frequency_weight=args.high_frequency_weight,
    )  # fmt: skip


def build_optimizers(args, model: CDBVQModel, accelerator: Accelerator, max_train_steps: int) -> tuple:
    """AdamW and the learning-rate schedule of the model and, with --disc_weight, of a PatchGAN discriminator, all
    prepared by accelerate: (model, discriminator, optimizer, disc_optimizer, scheduler, disc_scheduler)."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = _adamw(args, [p for p in model.parameters() if p.requires_grad], learning_rate)
    scheduler = _scheduler(args, optimizer, accelerator, max_train_steps)
    if args.disc_weight <= 0:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return model, None, optimizer, None, scheduler, None
    discriminator = PatchDiscriminator(model.config.num_channels, args.disc_base_channels, args.disc_num_layers)
    disc_optimizer = _adamw(args, discriminator.parameters(), args.disc_learning_rate or learning_rate)
    disc_scheduler = _scheduler(args, disc_optimizer, accelerator, max_train_steps)
    return accelerator.prepare(model, discriminator, optimizer, disc_optimizer, scheduler, disc_scheduler)


def log_done(start_time: float, steps: int, seconds_per_step: float, threads: int, metrics: dict, codebook_size: int,
             output_dir: Path) -> None:
    """The run's last line: time, speed and the held-out numbers."""
    elapsed = time.time() - start_time
    if sys.argv and Path(sys.argv[0]).name == "train.py":  # the whole command, imports included
        elapsed = process_seconds() or elapsed
    minutes, seconds = divmod(round(elapsed), 60)
    rfid = f", rFID {metrics['rfid']:.3f}" if "rfid" in metrics else ""
    logger.info(
        f"Done in {minutes} min {seconds:02d} s wall time ({steps} steps, {seconds_per_step:.2f} s/step, "
        f"{threads} CPU thread(s) per process): held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}"
        f"{rfid}, {metrics['utilization']:.1%} of {codebook_size} codes used. Outputs: {output_dir}"
    )


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


def _optional_lpips(network: str, accelerator: Accelerator):
    """LPIPS for validation when its weights happen to be at hand (never downloads)."""
    if not os.path.isfile(lpips_backbone_file(network)[0]):
        return None
    return load_lpips(network, required=False).to(accelerator.device)


def _validation_fid(args, accelerator: Accelerator):
    """The rFID metric `--validation_fid` asks for, or None (one logged line when the Inception weights are missing)."""
    if args.validation_fid is None:
        return None
    from cdb_tokenizer.tools.evaluation import RandomFeatureExtractor, optional_fid_metric

    if args.validation_fid == "random":
        logger.info("rFID with a small random feature extractor: a smoke test of the path, not comparable to Inception FIDs.")
        return optional_fid_metric(device=accelerator.device, feature_extractor=RandomFeatureExtractor())
    return optional_fid_metric(args.fid_weights, device=accelerator.device)


def _stop(accelerator: Accelerator, args, reason: str) -> None:
    accelerator.end_training()
    kept = complete_checkpoints(args.output_dir)[0]
    raise TrainingStopped(
        f"training stopped: {reason}. Nothing was overwritten; the last checkpoint is "
        f"{kept[-1] if kept else '(none yet)'} (resume with --resume_from_checkpoint latest, e.g. with a lower --learning_rate)."
    )


def picture_images(args, validation: torch.Tensor, factor: int) -> list[torch.Tensor]:
    """Held-out images for reconstructions.png: without data flags, scikit-learn's two photos whole (shorter side
    256, cut to a multiple of the downsampling factor); else the first `--num_grid_images` validation images."""
    if args.train_data_dir is not None or args.dataset_name is not None:
        return list(validation[: args.num_grid_images])
    processor = CDBVQImageProcessor(size={"shortest_edge": 256}, do_center_crop=False)
    images = [processor(photo, return_tensors="pt").pixel_values[0] for photo in sample_photos("sklearn")]
    return [image[:, : image.shape[1] // factor * factor, : image.shape[2] // factor * factor] for image in images]


def save_outputs(model: CDBVQModel, validation: torch.Tensor, args, metrics: dict, ema: EMAWeights | None) -> None:
    """The final model and processor, metrics.json, reconstructions.png and codebook_usage.png."""
    output_dir = Path(args.output_dir)
    with ema.applied(model) if ema is not None else nullcontext():
        model.save_pretrained(output_dir)
        originals = picture_images(args, validation, model.config.downsampling_factor)
        reconstructions = [reconstruct(model, image[None])[0] for image in originals]
        caption = (f"held-out: {validation.shape[0]} crops at {args.resolution}x{args.resolution}, PSNR "
                   f"{metrics.get('psnr', float('nan')):.2f} dB, SSIM {metrics.get('ssim', float('nan')):.3f}; "
                   f"{model.config.codebook_size} codes, f{model.config.downsampling_factor}, {metrics.get('steps', '?')} steps")  # fmt: skip
        save_reconstruction_figure(originals, reconstructions, output_dir / "reconstructions.png", caption=caption)
        counts = code_usage_counts(model, validation_batches(validation, args.train_batch_size))
    CDBVQImageProcessor(size={"height": args.resolution, "width": args.resolution}).save_pretrained(output_dir)
    save_usage_plot(counts, output_dir / "codebook_usage.png", code_roles=model.config.code_roles,
                    title=f"codebook usage on {validation.shape[0]} held-out images")  # fmt: skip
    if model.config.code_roles:
        with ema.applied(model) if ema is not None else nullcontext():
            was_training = model.training
            model.eval()
            role_images = validation[: args.num_grid_images]  # one batch of equal crops (the pictures may differ in size)
            role_map = model.role_map(role_images.to(device=model.device, dtype=model.dtype)).cpu()
            model.train(was_training)
        save_role_map(role_images, role_map, model.config.role_names, output_dir / "role_map.png")
    write_json(output_dir / "metrics.json", metrics)
    logger.info(f"Saved the tokenizer, reconstructions.png, codebook_usage.png, {'role_map.png, ' if model.config.code_roles else ''}metrics.json to {output_dir}.")


if __name__ == "__main__":
    try:
        main()
    except (TrainingStopped, LPIPSUnavailableError, FileNotFoundError, ValueError) as error:
        # Mistakes in the inputs (a missing folder, a column that does not exist, ...) and clean stops: the message
        # names the problem, a stack trace would not help.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
