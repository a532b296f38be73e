"""Run utilities shared by training/train.py and training/train_prior.py.

The Accelerator of a run and its logging (`make_accelerator`), the rule for several processes on a machine without
a GPU (`multi_process_without_accelerator`), which checkpoint `--resume_from_checkpoint` names (`find_checkpoint`:
`latest` is the newest complete one), a SIGTERM turned into a clean stop (`TerminationRequest`),
the weight EMA (`EMAWeights`) and the run log (`RunLog`: trackers plus `logs/train_log.jsonl`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration

from .checkpoints import (
    TMP_SUFFIX,
    CheckpointError,
    complete_checkpoints,
    decided_by_main_process,
    incomplete_reason,
    verify_checkpoint,
)
from .files import write_text
from .train_args import named_checkpoint


logger = get_logger(__name__, log_level="INFO")

# Libraries whose INFO lines would drown the run's own.
NOISY_LOGGERS = ("httpx", "huggingface_hub", "datasets", "PIL", "accelerate.checkpointing", "accelerate.accelerator")


def multi_process_without_accelerator() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine with no GPU: accelerate then needs `cpu=True`
    to set up its gloo process group instead of running each process alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_accelerator = getattr(torch, "accelerator", None)
    return not (has_accelerator.is_available() if has_accelerator is not None else torch.cuda.is_available())


# What W&B would otherwise upload besides the cleaned config: the command line (a --hub_token in it), host and user
# names, paths, the git remote, the code and the console output (paths again). Each applies where the installed
# wandb has that setting.
WANDB_PRIVATE_SETTINGS = {"x_disable_meta": True, "disable_git": True, "disable_code": True, "save_code": False,
                          "console": "off"}  # fmt: skip


def tracker_init_kwargs(report_to: str, resumed_step: int = 0) -> dict:
    """`init_kwargs` for `accelerator.init_trackers`: W&B with `WANDB_PRIVATE_SETTINGS`; TensorBoard, in a run resumed
    at `resumed_step`, purges the events of later steps, which the run trains again (the interrupted run's values
    stayed beside the new ones, two points per step)."""
    kwargs = {}
    if report_to in ("tensorboard", "all") and resumed_step > 0:
        kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    if report_to not in ("wandb", "all"):
        return kwargs
    try:
        import wandb
    except ImportError:  # accelerate names the missing tracker itself
        return kwargs
    known = getattr(wandb.Settings, "model_fields", None) or {}
    settings = wandb.Settings(**{key: value for key, value in WANDB_PRIVATE_SETTINGS.items() if key in known})
    return {**kwargs, "wandb": {"settings": settings}}


def check_tracker_installed(report_to: str) -> None:
    """Refuse a `--report_to` tracker that is not installed: accelerate would only warn and train without it, and a
    long run would end with no curves where the user looks for them."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if report_to in LoggerType.list() and report_to != "all" and LoggerType(report_to) not in get_available_trackers():
        raise ValueError(f"--report_to {report_to}: the {report_to} package is not installed; install it, or choose "
                         f"another tracker (--report_to none trains without one).")  # fmt: skip


def refuse_fp16_without_a_gradient_scaler(accelerator: Accelerator) -> None:
    """Refuse fp16 where accelerate has no gradient scaler (the CPU): it then trains in float32 under an fp16 label,
    and the step's non-finite gradient check, which leaves overflow to the scaler under fp16, would be off."""
    from accelerate.utils import DistributedType

    # DeepSpeed scales fp16 losses itself (and accelerate leaves its scaler unset there).
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and not deepspeed:
        raise ValueError(f"mixed precision fp16 (--mixed_precision or the accelerate config) needs a GPU: on this "
                         f"{accelerator.device.type} device accelerate has no gradient scaler and trains in float32; "
                         f"use bf16 or no.")  # fmt: skip


def make_accelerator(args, output_dir: Path, **kwargs) -> Accelerator:
    """The run's Accelerator (from `--gradient_accumulation_steps`, `--mixed_precision`, `--report_to`,
    `--logging_dir`; `kwargs` go to `Accelerator`) and its logging: INFO on the main process, errors elsewhere."""
    check_tracker_installed(args.report_to)
    accelerator = Accelerator(
        cpu=multi_process_without_accelerator(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        **kwargs,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return accelerator


def launch_settings(args, accelerator: Accelerator) -> dict:
    """What the launcher or the accelerate config decided beside the flags, for training_config.json and the
    trackers: the precision used, the process count and the batch of one optimisation step over all processes."""
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    return {"mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
            "global_batch_size": global_batch}


def find_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str | Path, accelerator: Accelerator | None = None
) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names, or None when there is nothing to resume.

    `latest` is the newest *complete* checkpoint whose files are those that were written (`verify_checkpoint`);
    incomplete or changed ones are skipped and named, and a folder holding only damaged ones is an error. A named
    folder must be complete and unchanged. With an `accelerator` of several processes, the main process decides and
    every process gets its answer (or its error): on a shared file system with cached attributes (NFS) processes
    could see other folders, and resume from different steps.
    """
    return decided_by_main_process(accelerator, lambda: _find_checkpoint(resume_from_checkpoint, output_dir))


# Checkpoints already verified in this process, by folder and by every file's size and time: a named one is found
# twice (before the output folder is prepared, then to resume), and hashing gigabytes twice would be for nothing.
_verified_checkpoints: set[tuple] = set()


def _verified(path: Path) -> Path:
    """`path`, once `verify_checkpoint` has passed it (raises `CheckpointError` otherwise)."""
    files = sorted(file for file in path.rglob("*") if file.is_file())
    key = (path.resolve(), tuple((file.relative_to(path).as_posix(), file.stat().st_size, file.stat().st_mtime_ns)
                                 for file in files))  # fmt: skip
    if key not in _verified_checkpoints:
        verify_checkpoint(path)
        _verified_checkpoints.add(key)
    return path


def _find_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        complete, incomplete = complete_checkpoints(output_dir)
        for path, reason in incomplete:
            logger.warning(f"Skipping the incomplete checkpoint {path}: {reason}.")
        # Only unfinished writes (`.tmp`): no checkpoint was ever complete (rotation deletes none before a newer one
        # is), so starting over loses nothing, and a requeue that always passes `latest` goes on.
        damaged = [(path, reason) for path, reason in incomplete if not path.name.endswith(TMP_SUFFIX)]
        if not complete and damaged:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: {output_dir}/checkpoints holds no complete checkpoint, only "
                f"incomplete ones ({', '.join(f'{path.name}: {reason}' for path, reason in damaged)}). Delete them, "
                f"or pass --overwrite_output_dir, to start over."
            )
        if not complete:
            logger.info(f"No complete checkpoint in {output_dir}/checkpoints: starting a new run.")
            return None
        refusals = []
        for path in reversed(complete):  # newest first: an edited or stray file sends `latest` to the one before
            try:
                return _verified(path)
            except CheckpointError as error:
                logger.warning(f"Skipping the checkpoint {path}: {error}")
                refusals.append(error)
        reasons = "; ".join(f"{path.name}: {error.reason}" for path, error in zip(reversed(complete), refusals))
        raise CheckpointError(
            f"--resume_from_checkpoint latest: every complete checkpoint in {output_dir}/checkpoints was changed after "
            f"it was written ({reasons}). Restore or remove the files named, or pass --overwrite_output_dir to start "
            f"over."
        )
    path = named_checkpoint(resume_from_checkpoint, output_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint folder (nor one of "
                                f"{Path(output_dir) / 'checkpoints'}).")  # fmt: skip
    if (path / "checkpoints").is_dir():  # a run's folder (often --output_dir itself), not one of its checkpoints
        raise CheckpointError(
            f"--resume_from_checkpoint {str(path)!r} is a run's folder, not a checkpoint: pass one of its "
            f"checkpoints/checkpoint-N folders, or `latest` to continue the run in --output_dir."
        )
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"--resume_from_checkpoint {str(path)!r} is not a complete checkpoint: {reason}.")
    return _verified(path)


EMA_WARMED_UP = 1_000_000  # updates after which the warm-up no longer lowers any decay below 0.99999


class EMAWeights:
    """An exponential moving average of a model's trainable parameters (checkpointed by `save_checkpoint`, as safetensors).

    The decay warms up as `min(decay, (1 + n) / (10 + n))` after `n` updates (as diffusers' `EMAModel`): at a plain
    0.999 the average of a 1,400-step run still held a quarter of the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up's, until it reaches `decay`)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average toward `model`'s trainable parameters by one step."""
        weight = 1.0 - self.current_decay()
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(parameter.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_rows(self, model: torch.nn.Module, name: str, rows: torch.Tensor) -> None:
        """Take rows of a parameter as they are now (e.g. restarted codes, which an average would blur)."""
        if name in self.shadow:
            self.shadow[name][rows] = dict(model.named_parameters())[name].detach().float()[rows]

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Swap the averaged weights into `model` for the duration of the block."""
        parameters = dict(model.named_parameters())
        saved = {name: parameters[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                parameters[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    parameters[name].copy_(value)

    # Checkpointed as safetensors (`ema/<parameter>`) and the decay in the checkpoint's JSON state, never pickled.
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The average as `ema/<parameter>` tensors, for a checkpoint's safetensors file."""
        return {f"ema/{name}": value for name, value in self.shadow.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], state: dict, source: str | None = None) -> None:
        """Restore the average from a checkpoint; a missing or mismatched tensor is a clear CheckpointError."""
        for name, value in self.shadow.items():
            saved = tensors.get(f"ema/{name}")
            if saved is None or saved.shape != value.shape:
                what = "has no" if saved is None else f"has a {tuple(saved.shape)} (not {tuple(value.shape)})"
                raise CheckpointError(
                    f"the checkpoint ({source}) {what} EMA weight for {name}: it was written without --use_ema or by "
                    f"a run with another model configuration."
                )
            value.copy_(saved.to(device=value.device, dtype=value.dtype))
        # Checkpoints from before the warm-up have no count: their averages are past it.
        updates = state.get("ema_weights_updates")
        self.updates = int(updates) if isinstance(updates, int) and updates >= 0 else EMA_WARMED_UP
        saved_decay = state.get("ema_weights_decay")
        if saved_decay is not None and float(saved_decay) != self.decay:  # this run's --ema_weights_decay wins
            logger.info(f"EMA weights: decay {self.decay} (this run's flag); the checkpoint's was {saved_decay}.")


class RunLog:
    """Sends scalars to the accelerate trackers and appends them to `logs/train_log.jsonl` (main process)."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path

    def __call__(self, values: dict[str, float], step: int) -> None:
        values = {key: float(value) for key, value in values.items()}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run trains them again) and any half-written line."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def image(self, name: str, image: torch.Tensor, step: int) -> None:
        """Log a (3, H, W) image in [0, 1] to the trackers that take images."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, image, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)


class TerminationRequest:
    """While active (`with TerminationRequest(accelerator) as termination:`), a SIGTERM (a cluster scheduler's
    preemption, `kill`, Kubernetes' shutdown) is noted instead of ending the process, so that the loop can write a
    checkpoint at the end of its step and stop; the previous handler is back afterwards. `requested()` is agreed by
    all processes (each may get the signal at another moment); it costs one scalar all-reduce per call."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received = False
        self._previous = None

    def _note(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> TerminationRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def checkpoint_and_stop_if_requested(self, step: int, max_train_steps: int, checkpointing_steps: int,
                                         write_checkpoint: Callable[[], None], stop: Callable[[str], None]) -> None:  # fmt: skip
        """Called after each step: when a SIGTERM came before the last step, write this step's checkpoint (unless the
        schedule has just written it) and `stop` the run. In the last step, the run finishes instead (see
        `warn_if_received`): its checkpoint is written, and saving the model is all that is left."""
        if step < max_train_steps and self.requested():
            if step % checkpointing_steps:
                write_checkpoint()
            stop(f"SIGTERM at step {step}")

    def warn_if_received(self, what: str) -> None:
        """Say that a SIGTERM of the last step was heard, and that the run goes on to save `what` (call it at the
        end of the `with` block, on every process: a second SIGTERM then finds the previous handler back and stops the
        process). Said by the main process when any process got one: the others log errors only."""
        if self.requested():
            logger.warning(f"A SIGTERM came during the last step: the run goes on to validate and save {what}; "
                           "signal it again to stop now (a resume then saves it).")  # fmt: skip


def warn_of_a_warmup_longer_than_the_run(args, max_train_steps: int) -> None:
    """Say when the learning rate never reaches --learning_rate (train.py and train_prior.py): short runs are the
    first a user tries, and a shortened recipe keeps its thousands of warm-up steps."""
    if args.lr_scheduler != "constant" and 0 < max_train_steps <= args.lr_warmup_steps:  # "constant" has no warm-up
        logger.warning(f"--lr_warmup_steps {args.lr_warmup_steps} is not below the run's {max_train_steps} steps: the "
                       f"learning rate never reaches --learning_rate (a shortened recipe? add --lr_warmup_steps 0).")  # fmt: skip
