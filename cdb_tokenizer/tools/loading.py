"""Loading a cdb-vq tokenizer (model + image processor) for the CLI, priors and scripts; no prior code involved."""

from __future__ import annotations

import logging
import logging.handlers
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModel, PretrainedConfig
from transformers.utils import logging as transformers_logging

from ..configuration_cdb_vq import looks_like_path
from ..modeling_cdb_vq import refuse_missing_parameters
from .messages import first_line


# The saved image processor's file: without it the default processor at the model's resolution is used.
PROCESSOR_CONFIG = "preprocessor_config.json"
# A Hub commit: the Hugging Face cache keeps each commit's files in a folder named by it.
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def snapshot_commit(cached_file: str | Path) -> str | None:
    """The Hub commit a file of the Hugging Face cache came from (the name of its snapshot folder), or None."""
    name = Path(cached_file).parent.name
    return name if COMMIT_HASH.fullmatch(name) else None


def cached_main_commit(repo_id: str) -> str | None:
    """The commit of `repo_id`'s main branch whose config.json is in the Hugging Face cache (the one a load without
    a revision just read), looked up on disk only; None when there is none."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return snapshot_commit(cached) if isinstance(cached, str) else None


def is_local_path(name: str) -> bool:
    """A name meant as a local path (so a missing one is "no such folder", never a Hub look-up): `looks_like_path`,
    or its first part is a local folder (`outputs/typo` beside an `outputs/` folder)."""
    return looks_like_path(name) or ("/" in name and Path(name.split("/")[0]).is_dir())


def locate(name_or_path: str | Path, what: str, hint: str = "") -> Path | None:
    """Where a model (a cdb-vq tokenizer or a prior) comes from: the local folder `name_or_path` names, or None for a
    Hub repo id (`owner/name`). Anything else is a `FileNotFoundError` naming `what` ("--model", "prior", ...),
    followed by `hint` (a sentence), and never a Hub look-up: a name meant as a path (`is_local_path`) that is no
    folder, and a name without an owner. Ids without an owner are the Hub's legacy models (gpt2, ...): a prior or a
    cdb-vq tokenizer, uploaded by a user or an organisation, always has one, and a mistyped folder name must not wait
    on the Hub's retries. (Data sets differ: the Hub's canonical ones, `mnist`, have no owner.)"""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = str(name_or_path)
    if not name.strip():  # Path("") is the working directory
        raise FileNotFoundError(f"{what} is empty; give a folder or a Hub id (owner/name).")
    try:
        path = Path(name_or_path).expanduser()
    except RuntimeError:  # ~user of no such user
        path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        problem = "is a file, not a folder"
    elif isinstance(name_or_path, Path) or looks_like_path(name):
        problem = "no such folder"
    elif is_local_path(name):
        first = name.split("/")[0]
        problem = f"no such folder (read as a path because a folder {first}/ is here; run from elsewhere for the Hub repo of that name)"
    elif "/" not in name:
        problem = "no such folder, nor a Hub id (owner/name)"
    else:
        try:
            validate_repo_id(name)
            return None
        except HFValidationError:
            problem = "neither a local folder nor a valid Hub id (owner/name)"
    raise FileNotFoundError(f"{what} {name!r}: {problem}." + (f" {hint}" if hint else ""))


@contextmanager
def held_library_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect what transformers and huggingface_hub log inside the block instead of printing it (transformers'
    multi-line LOAD REPORT table comes before a loading error, huggingface_hub's retries before "cannot reach the
    Hub"); yields the list of records, for the caller to show when they still matter."""
    holder = logging.handlers.BufferingHandler(capacity=1_000_000)
    libraries = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    saved = [(library.handlers, library.propagate) for library in libraries]
    for library in libraries:
        library.handlers, library.propagate = [holder], False
    try:
        yield holder.buffer
    finally:
        for library, (handlers, propagate) in zip(libraries, saved):
            library.handlers, library.propagate = handlers, propagate


def show_log_records(records: list[logging.LogRecord]) -> None:
    """Log records held back by `held_library_logs`, through the handlers they would have gone to."""
    for record in records:
        logging.getLogger(record.name).handle(record)


@contextmanager
def quiet_loading_bars():
    """Hide transformers' own bars, such as "Loading weights" (tqdm over the tensors): a tokenizer loads in about a
    second, and the bar's lines landed among a command's own output. Downloads keep their bars (huggingface_hub's,
    which `disable_progress_bar` would turn off too, and turn on again after, whatever the user had set). Through
    transformers' tqdm hook, where it has one (not in 5.0)."""
    set_tqdm_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_tqdm_hook is None:
        yield
        return
    previous = set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_tqdm_hook(previous)


def load_tokenizer(
    name_or_path: str, device: str | torch.device | None = None, trust_remote_code: bool = False, **kwargs: Any
):
    """Load a cdb-vq tokenizer (model and image processor) from a folder or a Hub repo id, in eval mode.

    Without `trust_remote_code` (the default) this package's own classes load the weights, so no code that ships with
    the folder or repository runs; with it, `AutoModel` / `AutoImageProcessor` load them, and transformers then
    prefers the classes this package registers (it is imported here): the repository's own code (`auto_map`) runs
    only where the package is not installed.
    Without a saved image processor, a `CDBVQImageProcessor` at the model's `config.resolution` is used; a saved one
    that cannot be loaded (broken JSON, unknown values) is a `ValueError` naming its file, never the default.
    Extra keyword arguments (e.g. `revision`) go to `from_pretrained`.
    """
    from ..image_processing_cdb_vq import CDBVQImageProcessor
    from ..modeling_cdb_vq import CDBVQModel

    # The config first, as data: a model of another kind would load as a cdb-vq model with every weight "missing",
    # i.e. random, and decode noise without an error.
    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, **_hub_options(kwargs))
    if config_dict.get("model_type") != "cdb_vq":
        raise ValueError(f"{name_or_path} is a {config_dict.get('model_type')!r} model, not a cdb-vq tokenizer.")
    local = Path(name_or_path, kwargs.get("subfolder") or "") if Path(name_or_path).is_dir() else None
    if local is not None:
        refuse_shards_outside(local)  # transformers would read any file an index names
    # Only the caller's own `trust_remote_code` is passed on (never a literal True).
    model_class = AutoModel if trust_remote_code else CDBVQModel
    processor_class = AutoImageProcessor if trust_remote_code else CDBVQImageProcessor
    options = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}
    try:
        with quiet_loading_bars():
            model, loading_info = model_class.from_pretrained(
                name_or_path, **options, **kwargs, output_loading_info=True
            )
    except Exception as error:
        if "Weights only load failed" not in str(error):
            raise
        # torch refused a pickle holding more than tensors; its advice (load it with weights_only=False, which could
        # run code) is never passed on.
        raise ValueError(
            f"the weights of {name_or_path} are a PyTorch pickle (.bin) holding more than tensors, and such files are "
            f"never unpickled (that could run code); convert them to safetensors."
        ) from None
    refuse_missing_parameters(model, loading_info, name_or_path)  # AutoModel's class may be a folder's older code
    weights_folder = local or _snapshot_folder(name_or_path, kwargs)  # a Hub repository's: in the cache by now
    if weights_folder is not None:
        refuse_integer_weights(weights_folder, model)
    model.eval()
    if _has_processor_config(name_or_path, kwargs):
        try:
            processor = processor_class.from_pretrained(name_or_path, **options, **kwargs)
        except Exception as error:  # noqa: BLE001 - broken JSON, unknown values: never silently the default instead
            raise ValueError(
                f"{Path(name_or_path) / PROCESSOR_CONFIG} cannot be used: {first_line(error)}"
            ) from None
    else:
        resolution = model.config.resolution
        processor = CDBVQImageProcessor(size={"height": resolution, "width": resolution})
    if device is not None:
        model.to(device)
    return model, processor


def _snapshot_folder(repo_id: str, kwargs: dict[str, Any]) -> Path | None:
    """The folder of the Hugging Face cache that holds a Hub repository's files just loaded (at the revision and
    subfolder asked for), found without the network; None when it cannot be told."""
    from transformers.utils import cached_file

    options = {**_hub_options(kwargs), "local_files_only": True}
    try:
        config_file = cached_file(repo_id, "config.json", **options)
    except Exception:  # noqa: BLE001 - no such entry in the cache: nothing to check against
        return None
    return Path(config_file).parent if config_file else None


def refuse_shards_outside(folder: Path) -> None:
    """Refuse a shard index that names weight files outside `folder` (`../x.safetensors`, an absolute path):
    transformers joins the names to the folder and reads whatever they reach."""
    import json

    for index in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # no index, or one transformers itself calls damaged
        far = sorted({str(name) for name in weight_map.values() if Path(str(name)).name != str(name)})
        if far:
            raise ValueError(f"{index} lists weight files outside {folder} ({far[0]!r}): a saved model's shards lie "
                             f"beside their index.")  # fmt: skip


def refuse_integer_weights(folder: Path, model: torch.nn.Module) -> None:
    """Refuse safetensors files that store floating-point parameters as integers (or booleans): transformers casts
    them without a word, and the model then tokenises and decodes noise."""
    import itertools

    from safetensors import safe_open

    from .files import saved_weights

    floating = {name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                if tensor.is_floating_point()}  # fmt: skip
    for path in saved_weights(folder):
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                if name in floating and dtype not in ("F64", "F32", "F16", "BF16"):
                    raise ValueError(f"the weights in {folder} store {name} as {dtype}, not floating point: they are "
                                     f"not a saved cdb-vq model's.")  # fmt: skip


def _hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that say where a file comes from (revision, cache, token, ...)."""
    hub_keys = ("revision", "cache_dir", "token", "local_files_only", "subfolder")
    return {key: kwargs[key] for key in hub_keys if key in kwargs}


def _has_processor_config(name_or_path: str, kwargs: dict[str, Any]) -> bool:
    """Whether the folder or Hub repository has a saved image processor (only then is a broken one an error).

    A Hub repository's file that could not be fetched (offline and not in the cache, the Hub unreachable) is an
    `OSError`: only a file the Hub said is absent (recorded in the cache) means "none", else the default processor
    would prepare the images another way than the saved one, without a word."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
    from transformers.utils import cached_file

    hub_options = _hub_options(kwargs)
    found = cached_file(
        name_or_path, PROCESSOR_CONFIG, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False, **hub_options,
    )  # fmt: skip
    if found is not None or Path(name_or_path).is_dir():
        return found is not None
    subfolder = hub_options.get("subfolder") or ""
    absent = try_to_load_from_cache(
        name_or_path, f"{subfolder}/{PROCESSOR_CONFIG}" if subfolder else PROCESSOR_CONFIG,
        cache_dir=hub_options.get("cache_dir"), revision=hub_options.get("revision"),
    )  # fmt: skip
    if absent is _CACHED_NO_EXIST:
        return False
    raise OSError(
        f"the {PROCESSOR_CONFIG} of {name_or_path} could not be fetched (not in the Hugging Face cache, and the Hub "
        f"not reachable or HF_HUB_OFFLINE set); the default image processor is not used in its place."
    )


def processor_image_size(processor) -> tuple[int, int] | None:
    """(height, width) of the images `processor` makes, when it makes a fixed size: its `size`, or the square of a
    `shortest_edge` it centre-crops to."""
    size = getattr(processor, "size", None) or {}
    height, width, shortest = (getattr(size, name, None) for name in ("height", "width", "shortest_edge"))
    if height is None and isinstance(size, dict):
        height, width, shortest = size.get("height"), size.get("width"), size.get("shortest_edge")
    if not (height and width) and shortest and getattr(processor, "do_center_crop", False):
        height = width = shortest
    return (int(height), int(width)) if height and width else None
