"""Checkpoint folders shared by the training scripts (training-only: imports accelerate).

A checkpoint is written into `checkpoints/checkpoint-<step>.tmp`, flushed to disk (fsync), given a manifest of its
files, their sizes and their SHA-256 digests (`cdb_vq_checkpoint.json`, written last) and only then renamed to
`checkpoint-<step>`; older checkpoints are rotated out after that. A folder without a valid manifest (a run killed
in the middle of a write) is incomplete: `latest` skips it and says so. Custom state (the weight EMA, counters) goes
in as safetensors and JSON, never as a pickle.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import CHECKPOINT_MANIFEST, file_sha256, share_safetensors
from .messages import Terminated, first_line, listed


logger = logging.getLogger(__name__)

MANIFEST = CHECKPOINT_MANIFEST
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
TMP_SUFFIX = ".tmp"
# How torch's file writer reports a failed write (a full disk is "unexpected pos ..."), a RuntimeError.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")
# An old checkpoint is renamed with this suffix before it is deleted (rotation).
DELETING_SUFFIX = f".old{TMP_SUFFIX}"
FORMAT_VERSION = 1
# Later checkpoints of a run resumed from an earlier one are renamed with this prefix (never deleted).
ABANDONED_PREFIX = "abandoned-"


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (incomplete, damaged, tampered with, or from another run). `reason` is
    what is wrong with it, without the advice the message ends with."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a read-only folder); the complete ones are untouched."""


def _step_of(path: Path) -> int | None:
    suffix = path.name[len("checkpoint-") :]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """`<output_dir>/checkpoints/checkpoint-<step>` folders of a run (complete or not), oldest first."""
    folders = [p for p in (Path(output_dir) / "checkpoints").glob("checkpoint-*") if _step_of(p) is not None]
    return sorted((p for p in folders if p.is_dir()), key=_step_of)


def incomplete_reason(path: str | Path) -> str | None:
    """Why the checkpoint folder is not complete (None when it is): no manifest, or a file missing or resized."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"it has no {MANIFEST} (the write was interrupted, or an older version wrote it)"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is damaged ({error})"
    if not all(isinstance(name, str) and isinstance(size, int) for name, size in files.items()):
        return f"its {MANIFEST} is damaged (its files are not names with sizes)"
    for name, size in files.items():
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its {MANIFEST} names a file outside the folder ({name!r})"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    return None


def complete_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete folder, why)]), `.tmp` folders counted as incomplete."""
    complete, incomplete = [], []
    for path in checkpoint_dirs(output_dir):
        reason = incomplete_reason(path)
        (complete.append(path) if reason is None else incomplete.append((path, reason)))
    for path in sorted((Path(output_dir) / "checkpoints").glob(f"checkpoint-*{TMP_SUFFIX}")):
        deleted = path.name.endswith((DELETING_SUFFIX, f".stale{TMP_SUFFIX}"))
        incomplete.append((path, "its deletion never finished" if deleted else "its write never finished"))
    return complete, incomplete


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk (folders: best effort, some systems cannot open them)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    total_limit: int | None,
    tensors: dict[str, torch.Tensor] | None = None,
    state: dict | None = None,
) -> Path:
    """Write checkpoints/checkpoint-<step> atomically, then keep at most `total_limit` complete checkpoints.

    `accelerator.save_state` (weights, optimisers, schedulers, every process's RNG state) and this module's custom
    state (`tensors` as safetensors, `state` as JSON) go into `checkpoint-<step>.tmp`; the main process flushes
    every file, writes the manifest, and renames the folder. Older checkpoints are deleted only after that, so a
    crash at any point leaves the previous complete checkpoint in place. A write that fails (a full disk, a
    read-only folder) raises `CheckpointWriteError`, naming the free space left.
    """
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"checkpoint-{step}"
    try:
        _write_checkpoint(accelerator, folder, step, tensors, state)
    except (OSError, RuntimeError, SafetensorError) as error:
        if isinstance(error, RuntimeError) and not any(mark in str(error) for mark in TORCH_WRITE_FAILURES):
            raise  # a process that died, a CUDA error: no advice about the disk
        if accelerator.is_main_process:  # its half-written files would keep the disk full for the resume advised below
            shutil.rmtree(folder / f"checkpoint-{step}{TMP_SUFFIX}", ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write {final} ({write_failure(error, folder)}); the complete checkpoints there are untouched: "
            f"make room or fix the folder, then resume with --resume_from_checkpoint latest."
        ) from error
    if accelerator.is_main_process and total_limit is not None:
        complete, incomplete = complete_checkpoints(output_dir)
        older = [p for p in complete if _step_of(p) < step]  # never one of a later step than this run's
        for old in older[: max(0, len(older) - total_limit + 1)]:
            # Renamed first: a deletion cut short leaves a `.tmp` folder the next rotation removes, not a broken
            # checkpoint-<step> that `latest` warns about on every resume.
            doomed = old.with_name(f"{old.name}{DELETING_SUFFIX}")
            os.replace(old, doomed)
            # A checkpoint linked in from elsewhere: drop the link, never the folder it points at.
            doomed.unlink() if doomed.is_symlink() else shutil.rmtree(doomed)
        for path, _ in incomplete:  # the remains of interrupted writes
            if path.name.endswith(TMP_SUFFIX):
                path.unlink() if path.is_symlink() else shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}.")
    return final


def write_failure(error: BaseException, folder: Path) -> str:
    """What went wrong writing into `folder`, in a few words, with the free space of its disk."""
    reason = f"{error.strerror}" if isinstance(error, OSError) and error.strerror else first_line(error)
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is None:
        return reason
    free = shutil.disk_usage(existing).free
    return f"{reason}; {free / 2**20:.1f} MiB free on its disk"


def _write_checkpoint(
    accelerator: Accelerator, folder: Path, step: int, tensors: dict | None, state: dict | None
) -> None:
    """Write checkpoint-<step>.tmp, flush it, give it its manifest and rename it checkpoint-<step>."""
    final = folder / f"checkpoint-{step}"
    temporary = folder / f"checkpoint-{step}{TMP_SUFFIX}"
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a run killed while writing this step
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # every process writes its own RNG state
    if accelerator.is_main_process:
        save_file({name: value.detach().cpu().contiguous() for name, value in (tensors or {}).items()},
                  str(temporary / STATE_TENSORS))  # fmt: skip
        (temporary / STATE_JSON).write_text(json.dumps(state or {}, indent=2, default=str) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        share_safetensors(temporary.glob("*.safetensors"))  # every file here was written just now
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync(file)
        files, digests = file_records(temporary)
        # Sizes say whether a write finished (checked for every checkpoint `latest` considers); digests, whether the
        # files were changed since (checked once, for the checkpoint a run resumes from).
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, "sha256": digests}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync(temporary / MANIFEST)
        _fsync(temporary)
        if final.exists():  # a stale checkpoint of the same step (e.g. an incomplete one): set aside, then delete
            stale = folder / f"checkpoint-{step}.stale{TMP_SUFFIX}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)  # the checkpoint is complete; the next rotation removes leftovers
        else:
            os.replace(temporary, final)
        _fsync(folder)


def set_aside_later_checkpoints(accelerator: Accelerator, output_dir: str | Path, step: int) -> list[Path]:
    """Rename the complete checkpoints of `output_dir` later than `step` (a run resumed from an earlier checkpoint
    than its last) to `abandoned-checkpoint-<step>` (`-2`, `-3`, ... when going back a second time): `latest` must
    not lead back to the run that was abandoned, and the rotation must not count them. Nothing is deleted
    (incomplete later folders stay where they are, skipped by `latest` and replaced when this run writes that step);
    returns the new names (on the main process)."""
    moved = []
    if accelerator.is_main_process:
        folder = Path(output_dir) / "checkpoints"
        for path in complete_checkpoints(output_dir)[0]:
            if _step_of(path) > step:
                target = folder / f"{ABANDONED_PREFIX}{path.name}"
                for attempt in itertools.count(2):
                    if not os.path.lexists(target):
                        break
                    target = folder / f"{ABANDONED_PREFIX}{path.name}-{attempt}"
                os.replace(path, target)
                moved.append(target)
        if moved:
            _fsync(folder)
            logger.warning(f"Resuming at step {step}: set aside the later checkpoints as {', '.join(p.name for p in moved)}.")
    accelerator.wait_for_everyone()
    return moved


def checkpoint_step(path: str | Path) -> int:
    """The step a complete checkpoint was taken at: its manifest's, which must agree with its folder's name
    (`checkpoint-<step>`); a manifest's step of -3 or 10**12 was trusted, and set aside the checkpoint resumed from."""
    path = Path(path)
    try:
        step = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"the manifest of {path} is unreadable ({first_line(error)}); resume from another checkpoint.") from None
    named = _step_of(path)
    if type(step) is not int or step < 0 or named is not None and step != named:
        raise CheckpointError(f"the manifest of {path} is damaged: its step {step!r} is not the folder's "
                              f"{named if named is not None else 'non-negative whole number'}; resume from another "
                              f"checkpoint.")  # fmt: skip
    return step


def file_records(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The size and SHA-256 of every file in `folder` (but its manifest), by path relative to it: a manifest's
    `files` and `sha256`."""
    files, digests = {}, {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST):
        name = file.relative_to(folder).as_posix()
        files[name], digests[name] = file.stat().st_size, file_sha256(file)
    return files, digests


def verify_checkpoint(path: str | Path) -> None:
    """Refuse a complete checkpoint whose files changed after it was written: a file whose SHA-256 is not its
    manifest's (an edit at the same size: a dtype flipped in a safetensors header resumed into weights of 1e9), or a
    file the manifest does not list (accelerate reads every `random_states_*.pkl` it finds, and one more halved the
    learning-rate schedule's position). Checkpoints written before 2026-12-01 record no digests; their files are
    checked by size (`incomplete_reason`) and for files the manifest does not list."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    known = set(manifest["files"]) | {MANIFEST}
    # Hidden files (.DS_Store from a Finder window, AppleDouble ._*, NFS's .nfs*) are never read by accelerate.
    unlisted = sorted(file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file()
                      and file.relative_to(path).as_posix() not in known and not file.name.startswith("."))  # fmt: skip
    if unlisted:
        reason = (f"it holds files its manifest does not list ({listed(unlisted, 3)}), so it was changed after it was "
                  f"written")  # fmt: skip
        raise CheckpointError(f"cannot resume from {path}: {reason}; remove them, or resume from another checkpoint.",
                              reason)  # fmt: skip
    digests = manifest.get("sha256")
    if not isinstance(digests, dict):
        return
    for name, digest in sorted(digests.items()):
        if name in manifest["files"] and file_sha256(path / name) != digest:
            reason = (f"{name} is not the file that was written (its SHA-256 differs from the manifest's); the "
                      f"checkpoint is damaged or was edited")  # fmt: skip
            raise CheckpointError(f"cannot resume from {path}: {reason}. Resume from another checkpoint.", reason)


def load_custom_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The custom tensors (safetensors) and JSON state of a checkpoint; a damaged file is a `CheckpointError`."""
    path = Path(path)
    tensors, state = {}, {}
    if (path / STATE_TENSORS).is_file():
        try:
            tensors = load_file(str(path / STATE_TENSORS))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            message = f"{path / STATE_TENSORS} is damaged ({error}); resume from another checkpoint."
            raise CheckpointError(message) from None
    if (path / STATE_JSON).is_file():
        try:
            state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            message = f"{path / STATE_JSON} is damaged ({error}); resume from another checkpoint."
            raise CheckpointError(message) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / STATE_JSON} does not hold a JSON object; resume from another checkpoint.")
    return tensors, state


# ----------------------------------------------------------------------------------------------------------------
# Resuming (train.py and train_prior.py)
# ----------------------------------------------------------------------------------------------------------------


def optimizer_settings(schedules: list[tuple[str, torch.optim.Optimizer, object]]) -> list[tuple[list[float], list[dict]]]:
    """This run's peak learning rates and optimiser hyperparameters (betas, weight decay, eps) of each (name,
    optimiser, accelerate-prepared scheduler), before a checkpoint's optimiser and schedule states replace them."""
    return [
        (list(scheduler.scheduler.base_lrs),
         [{key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")} for group in optimizer.param_groups])
        for _, optimizer, scheduler in schedules
    ]  # fmt: skip


def keep_optimizer_settings(schedules: list[tuple[str, torch.optim.Optimizer, object]], settings: list) -> None:
    """After a resume, train with this run's flags: a checkpoint's optimiser state carries the learning rate and
    hyperparameters it was written with, which would silently win over e.g. a lower --learning_rate. The schedule
    keeps its position; its peak becomes this run's rate."""
    for (name, optimizer, scheduler), (peaks, hyperparameters) in zip(schedules, settings):
        schedule = scheduler.scheduler
        if list(schedule.base_lrs) != peaks:
            logger.info(f"Resuming the {name} at learning rate {peaks[0]:g} (this run's flags); the checkpoint's was "
                        f"{schedule.base_lrs[0]:g}. The schedule goes on from its step at the new peak.")  # fmt: skip
        for group, old_peak, peak, settings_of_group in zip(optimizer.param_groups, schedule.base_lrs, peaks, hyperparameters):
            if peak != old_peak:  # an unchanged rate is left bit for bit (x * p / p is not always x)
                group["lr"] = group["lr"] * peak / old_peak if old_peak else peak
            group["initial_lr"] = peak
            group.update(settings_of_group)
        schedule.base_lrs = list(peaks)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def decided_by_main_process(accelerator: Accelerator | None, decide: Callable[[], T]) -> T:
    """`decide()` run by the main process alone, its answer (or its error) given to every process: what processes read
    from a shared folder must agree (with NFS attribute caches they can see it differently), and an error raised on
    one process only would leave the others waiting in the next collective."""
    if accelerator is None or accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [("answer", decide())]
        except KeyboardInterrupt:  # Ctrl-C or a SIGTERM (`messages.Terminated`) while deciding: every process stops
            broadcast_object_list([("interrupted", None)])
            raise
        except Exception as error:  # noqa: BLE001 - every kind is passed on, so every process stops alike
            named = isinstance(error, (ValueError, FileNotFoundError))  # their messages name the problem (ours are)
            answer = [(type(error).__name__, str(error) if named else f"{type(error).__name__}: {error}")]
    kind, value = broadcast_object_list(answer)[0]  # between this run's own processes: no file is unpickled
    if kind == "answer":
        return value
    if kind == "interrupted":
        raise Terminated()
    raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(value)


def saved_process_count(path: str | Path) -> int:
    """How many processes wrote a checkpoint: accelerate saves one `random_states_<rank>.pkl` per process."""
    return len(list(Path(path).glob("random_states_*.pkl")))


def reposition_schedules(schedules: list[tuple[str, torch.optim.Optimizer, object]], saved_processes: int, processes: int) -> None:
    """Put each resumed schedule at the checkpoint's step and give its optimiser the rate this run's schedule has
    there. accelerate steps a prepared scheduler once per process per optimiser step and saves its count as it is:
    resumed on another number of processes, the schedule would go on from another step (2 -> 1 process: twice as far,
    and a cosine past its end climbs back up), so the count is rescaled. And the checkpoint's rate is its own
    schedule's: with another --max_train_steps or warm-up, this run's schedule would take over one step late."""
    from torch.optim.lr_scheduler import LambdaLR

    moved = saved_processes >= 1 and saved_processes != processes
    for name, optimizer, scheduler in schedules:
        schedule = scheduler.scheduler
        if not isinstance(schedule, LambdaLR):  # every transformers schedule is one; another cannot be recomputed
            if moved:
                logger.warning(f"Resuming the {name} schedule on {processes} processes instead of {saved_processes}: "
                               f"{type(schedule).__name__} cannot be moved to the same step, it goes on from its "
                               f"count.")  # fmt: skip
            continue
        if moved:
            schedule.last_epoch = schedule.last_epoch // saved_processes * processes
        # LambdaLR's own product: the same schedule gives the checkpoint's rate bit for bit.
        for group, peak, rule in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"] = peak * rule(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def refuse_pickled_states(accelerator: Accelerator) -> None:
    """Resuming is safe only where accelerate reads a checkpoint with `weights_only=True` (one process, DDP): FSDP's
    sharded states come with a pickled `.metadata` (torch.distributed.checkpoint) and DeepSpeed loads its files with
    `weights_only=False`, so a checkpoint from elsewhere could run code. Refused, naming the way out."""
    from accelerate.utils import DistributedType

    kind = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(accelerator.distributed_type)
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            kind = kind or name
    if kind:
        raise CheckpointError(
            f"resuming under {kind} is not supported: its checkpoints are read with pickle, which can run code from "
            f"the files. Resume with one process or DDP, or start a new run."
        )


def _check_random_states(path: Path) -> None:
    """accelerate swallows a random-state file it cannot read (and the run silently loses its exact resume); read it
    as it does (tensors and NumPy arrays only) and name it when that fails."""
    from accelerate.utils.other import load

    try:
        load(path)
    except Exception as error:  # noqa: BLE001 - tampered or damaged pickles
        raise CheckpointError(
            f"cannot resume from {path.parent}: {path.name} cannot be read safely ({type(error).__name__}: "
            f"{_what_failed(error)[:200]}); the checkpoint is damaged or tampered with."
        ) from None


def _what_failed(error: BaseException) -> str:
    """The first line of `error`, and its first detail when the first line is only a heading (torch's "Error(s) in
    loading state_dict for CDBVQModel:" lists the mismatched tensors below)."""
    if "Weights only load failed" in str(error):  # torch's advice (weights_only=False) could run the file's code
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # what it holds: the one clue for an unexpected file
        held = f"a pickled object{f', {found.group(1)}' if found else ''}"
        return f"it holds more than tensors ({held}), and is never unpickled"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    heading = first_line(error)
    return (f"{heading} {lines[1]}" if heading.endswith(":") and len(lines) > 1 else heading).rstrip(".")


def load_training_state(
    accelerator: Accelerator,
    path: str | Path,
    output_dir: str | Path,
    max_train_steps: int,
    schedules: list,
    set_aside: bool = True,
) -> int:
    """Load a complete checkpoint's weights, optimiser, scheduler and random states into a run and return its step.

    The run keeps its own learning rates and optimiser settings (`keep_optimizer_settings`), and its schedules go on
    from the checkpoint's step on any number of processes (`reposition_schedules`); the later checkpoints of an
    abandoned run are set aside only when this run trains past `path` (with `set_aside=False` the caller does it with
    `set_aside_later_checkpoints` once it has accepted the resume); a damaged checkpoint, or one of another
    configuration, is a one-line `CheckpointError`. `schedules`: (name, optimiser, accelerate-prepared scheduler)."""
    refuse_pickled_states(accelerator)
    step = checkpoint_step(path)  # a damaged manifest before any state is loaded
    random_states = Path(path) / f"random_states_{accelerator.process_index}.pkl"
    if random_states.exists():
        _check_random_states(random_states)
    settings = optimizer_settings(schedules)
    try:
        # accelerate reads the optimiser, scheduler and RNG states with torch.load(weights_only=True).
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - damaged or tampered files, or another run's shapes
        raise CheckpointError(
            f"cannot resume from {path}: {type(error).__name__}: {_what_failed(error)[:300]}. The checkpoint is "
            f"damaged or tampered with, or it belongs to a run with another configuration."
        ) from None
    # accelerate restores its count of micro-batches, from which `accumulate` decides where a window ends: with another
    # --gradient_accumulation_steps every window would end mid-way. Checkpoints are taken between windows: start at 0.
    accelerator.step = 0
    keep_optimizer_settings(schedules, settings)
    saved_processes = decided_by_main_process(accelerator, lambda: saved_process_count(path))
    reposition_schedules(schedules, saved_processes, accelerator.num_processes)
    if set_aside and step < max_train_steps:  # later checkpoints are abandoned only by a run that trains past this one
        set_aside_later_checkpoints(accelerator, output_dir, step)
    return step
