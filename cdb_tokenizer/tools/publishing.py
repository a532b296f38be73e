"""Publishing a trained cdb-vq tokenizer to the Hugging Face Hub, with a model card.

`training/train.py --push_to_hub` and `training/publish.py` both call `push_to_hub`, which stages one folder with
`stage_folder` (weights, config, remote code, image processor, figures, and a `README.md` rendered from the template
in `templates/`, package data shipped in the wheel) and uploads it with `huggingface_hub`. Training-time code: never imported by the modeling files.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .. import CDBVQConfig, CDBVQImageProcessor, CDBVQModel
from .files import replace_file, saved_weights
from .redaction import (
    HF_TOKEN,
    REDACTED,
    blank_tokens,
    collect_strings,
    cut_path_value,
    is_secret_key,
    public_value,
    scrub_local_paths,
)
from .roles import role_legend
from .teacher import labels_from_metadata, labels_metadata


# Package data (pyproject.toml `[tool.setuptools.package-data]`): found from a wheel install as from a checkout.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "cdb_vq_model_card.md"

# The image tokenizer maps an image to features (discrete token ids) for a downstream prior, which is what the Hub's
# "image-feature-extraction" task lists; "image-to-image" would advertise the reconstruction, a by-product.
PIPELINE_TAG = "image-feature-extraction"
TAGS = ["image-tokenization", "vector-quantization", "cdb-vq", "vqgan"]
DEFAULT_LICENSE = "apache-2.0"

# What `train.py` writes besides the model: copied when present. Everything else (checkpoints/, logs/, ...) stays.
FIGURES = {"reconstructions": "reconstructions.png", "usage": "codebook_usage.png", "role_map": "role_map.png",
           "restorations": "restorations.png"}
EXTRA_FILES = ("prototypes.safetensors",)
# JSON files published with secrets and local paths removed.
JSON_FILES = ("metrics.json", "training_config.json")
# Keys of training_config.json that are local folders: never published.
PRIVATE_CONFIG_KEYS = ("output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint")

ASSIGNMENT_DESCRIPTIONS = {
    "nearest": "nearest neighbour: each latent takes its closest code (classic VQ-VAE).",
    "sinkhorn": (
        "optimal transport while training (a balanced Sinkhorn plan over the batch, as in OptVQ); nearest neighbour "
        "at inference, so a token never depends on the rest of the batch."
    ),
    "cdb": (
        "the Codebook Decision Block: per-code transport potentials, learned by dual ascent on code usage, make each "
        "latent's cheapest code its balanced optimal-transport assignment, and a bounded learned term (reading the "
        "latent and its predicted CLIP semantics) re-ranks near-equal codes. Inference is deterministic and batch "
        "independent, and needs no CLIP model."
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Reading a training output folder
# ----------------------------------------------------------------------------------------------------------------


def _read_valid_json(path: Path) -> dict[str, Any]:
    """The JSON in `path`, {} when there is no such file; a `ValueError` naming the file when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def model_files(output_dir: str | Path) -> list[Path]:
    """The files `save_pretrained` wrote for the model and image processor: weights, configs and remote code.

    Raises `FileNotFoundError` / `ValueError` naming what is missing, so a folder that would not load from the Hub
    is never uploaded.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise NotADirectoryError(f"{output_dir} is a file: give the folder train.py wrote (or save_pretrained).")
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output directory {output_dir} does not exist.")
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        if output_dir.name.startswith("checkpoint-") or (output_dir / "optimizer.bin").is_file():
            raise FileNotFoundError(
                f"{output_dir} is a training checkpoint (to resume from), not a saved model: publish the run's "
                f"output folder, or save the model from this checkpoint with `model.save_pretrained`."
            )
        raise FileNotFoundError(f"{output_dir} has no config.json: save the model there with `model.save_pretrained`.")
    model_type = _read_valid_json(config_path).get("model_type")
    if model_type != "cdb_vq":  # a prior (train_prior.py) has a config.json and weights too: its language model's
        raise ValueError(f"{output_dir} holds a {model_type!r} model (its config.json), not a cdb-vq tokenizer: "
                         f"publish the output folder of training/train.py (a prior's folder is uploaded as it is, see "
                         f"docs/priors.md).")  # fmt: skip
    weights = saved_weights(output_dir)
    if not weights:
        raise FileNotFoundError(
            f"{output_dir} has no model.safetensors: save the model there with `model.save_pretrained`."
        )
    processor_path = output_dir / "preprocessor_config.json"
    if not processor_path.is_file():
        raise FileNotFoundError(
            f"{output_dir} has no preprocessor_config.json: save the image processor there with "
            f"`processor.save_pretrained`."
        )
    auto_map = {
        **_read_valid_json(config_path).get("auto_map", {}),
        **_read_valid_json(processor_path).get("auto_map", {}),
    }
    if not {"AutoConfig", "AutoModel", "AutoImageProcessor"} <= auto_map.keys():  # AutoModel reads AutoConfig's
        raise ValueError(
            f"{output_dir} has no auto_map for AutoConfig, AutoModel and AutoImageProcessor, so it would not load "
            f"with trust_remote_code=True; `import cdb_tokenizer` before calling save_pretrained."
        )
    modules = []
    for reference in auto_map.values():
        reference = reference[-1] if isinstance(reference, (list, tuple)) else reference
        module = str(reference).split("--")[-1].split(".")[0]
        if not re.fullmatch(r"[A-Za-z_]\w*", module):  # a path would publish a file from elsewhere on the machine
            raise ValueError(f"auto_map names {reference!r}, not a module of {output_dir} (module.ClassName).")
        module_file = output_dir / f"{module}.py"
        if not module_file.is_file():
            raise FileNotFoundError(f"auto_map points to {module_file.name}, which is not in {output_dir}.")
        modules.append(module_file)
    # save_pretrained writes the remote-code files flat next to the config; only the modules auto_map names and the
    # flat siblings they import (from .name import ...) are published, not every .py file that lies in the folder.
    return [config_path, processor_path, *weights, *_remote_code_files(modules)]


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_]\w*)\s+import\b", re.MULTILINE)


def _remote_code_files(modules: list[Path]) -> list[Path]:
    found: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module.name in found or not module.is_file():
            continue
        found[module.name] = module
        for name in _RELATIVE_IMPORT.findall(module.read_text(encoding="utf-8")):
            pending.append(module.parent / f"{name}.py")
    return [found[name] for name in sorted(found)]


def _package_remote_code() -> tuple[str, ...]:
    """The flat modules save_pretrained copies beside config.json (transformers' `custom_object_save`): those of the
    classes registered for the auto classes and the modules they import. Found as `model_files` finds a folder's,
    so the files a push uploads and those a later push cleans up cannot drift apart."""
    modules = [Path(inspect.getfile(cls)) for cls in (CDBVQConfig, CDBVQModel, CDBVQImageProcessor)]
    return tuple(path.name for path in _remote_code_files(modules))


REMOTE_CODE_FILES = _package_remote_code()
# Every file a push may publish: what a new push does not bring is removed from the repository in the same commit,
# so a stale model.safetensors never shadows new shards (transformers loads it first), nor an old figure a new card.
# Exact names at the repository's root only (`*` would also match "/" and reach the user's own files).
SHARD = "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"
PUBLISHED_PATTERNS = [
    "model.safetensors", SHARD, "model.safetensors.index.json", *REMOTE_CODE_FILES, *FIGURES.values(), *EXTRA_FILES,
    *JSON_FILES,
]  # fmt: skip


def public_fields(values: dict[str, Any]) -> dict[str, Any]:
    """What of `training_config.json` / `metrics.json` may be published: no secrets (`hub_token`, `*_token`,
    `*secret*`, `*password*`, `*api_key*`, at any depth, and `hf_...` tokens inside any string), no output, logging,
    cache or checkpoint folders (at any depth), and every local path cut to its last part (`/home/me/photos` ->
    `photos`, `C:\\Users\\me\\data` -> `data`), in nested lists and dicts too.
    """
    return public_value(_without_private_keys(values))


def _without_private_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_private_keys(item) for key, item in value.items() if key not in PRIVATE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_private_keys(item) for item in value]
    return value


def clip_teacher_hub_id(clip_model: str | None, clip_pretrained: str | None) -> str | None:
    """The Hub repository of an open_clip teacher: `("ViT-B-16", "openai")` -> `timm/vit_base_patch16_clip_224.openai`.

    Returns None when it cannot be told offline (open_clip missing, unknown tag, weights without a Hub copy).
    """
    for name in (clip_model, clip_pretrained):
        if name and str(name).startswith("hf-hub:"):
            return str(name)[len("hf-hub:") :].strip("/")
    if not clip_model or not clip_pretrained:
        return None
    try:
        import open_clip
    except ImportError:
        return None
    clip_model = str(clip_model).replace("/", "-")  # "ViT-B/16", as the teacher's loader reads it
    hub_id = (open_clip.get_pretrained_cfg(clip_model, clip_pretrained) or {}).get("hf_hub", "")
    return hub_id.strip("/") or None


# ----------------------------------------------------------------------------------------------------------------
# Codebook summary (shared with `cdb-vq inspect`)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def codebook_summary(model, top_k: int = 10) -> dict[str, Any]:
    """Codebook size, assignment rule, role ranges with their running usage, and the most used codes with labels.

    Usage is the model's running per-code share (`model.quantizer.usage`, updated during training). Without roles in
    the config, `roles` is empty and a code's `role` None, as in `model.code_report()`. A top code's `tied_prototype`
    and `tied_label` are those of the prototype it is tied to (`quantizer.code_to_prototype`), which need not be the
    nearest prototype by cosine that `code_report()` gives as `prototype`.
    """
    config = model.config
    usage = model.quantizer.usage.detach().float().cpu()
    share = usage / usage.sum().clamp_min(1e-12)
    labels = model.code_prototype_labels()
    code_to_prototype = model.quantizer.code_to_prototype.cpu()
    code_role = {}
    roles = []
    for name in config.role_names:
        start, end = config.code_roles[name]
        code_role.update({code: name for code in range(start, end)})
        roles.append(
            {"name": name, "start": start, "end": end, "size": end - start, "usage": float(share[start:end].sum())}
        )
    top = share.topk(min(top_k, config.codebook_size))
    # Without prototypes (no labels, no vectors) the ties are placeholders (code id modulo num_prototypes).
    tied = bool(config.prototype_labels) or model.quantizer.has_prototypes
    top_codes = [
        {
            "code": code,
            "usage": float(value),
            "role": code_role.get(code),
            "tied_prototype": int(code_to_prototype[code]) if tied else None,
            "tied_label": labels[code],
        }
        for value, code in zip(top.values.tolist(), top.indices.tolist())
    ]
    prototypes = []
    if tied:
        prototype_share = torch.zeros(config.num_prototypes).index_add_(0, code_to_prototype, share)
        prototype_codes = torch.bincount(code_to_prototype, minlength=config.num_prototypes)
        for index in prototype_share.argsort(descending=True).tolist():
            label = config.prototype_labels[index] if config.prototype_labels else None
            prototypes.append(
                {
                    "index": index,
                    "label": label,
                    "codes": int(prototype_codes[index]),
                    "usage": float(prototype_share[index]),
                }
            )
    return {
        "codebook_size": config.codebook_size,
        "codebook_dim": config.codebook_dim,
        "assignment": config.assignment,
        "resolution": config.resolution,
        "token_grid": list(model.token_grid_size()),
        "downsampling_factor": config.downsampling_factor,
        "dead_codes": int(model.quantizer.dead_codes().numel()),
        "roles": roles,
        "top_codes": top_codes,
        "prototypes": prototypes,
        "has_prototype_vectors": bool(model.quantizer.has_prototypes),
    }


# ----------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------


def code_report_summary(report: list[dict]) -> list[dict]:
    """Per role (and for all codes): how many codes, their usage, and usage-weighted mean signals and cosine."""
    groups: dict[str, list[dict]] = {}
    for record in report:
        if record["role"] is not None:
            groups.setdefault(record["role"], []).append(record)
    groups["all codes"] = report
    rows = []
    for group, records in groups.items():
        row = {"group": group, "codes": len(records), "usage": sum(r["usage"] for r in records)}
        for key in ("low_pass", "laplacian", "chroma", "prototype_cosine"):
            seen = [(r[key], r["usage"]) for r in records if r[key] is not None]
            weight = sum(w for _, w in seen)
            row[key] = (sum(v * w for v, w in seen) / weight if weight > 0 else sum(v for v, _ in seen) / len(seen)) if seen else None
        rows.append(row)
    return rows


def _format_value(value: Any) -> str:
    """A value as card text that keeps its table cell: one line, `|` escaped, and no markup of its own (a label
    such as `</details>`, `<unk>` or `__background__` must read as written)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    text = " ".join(str(value).split())  # newlines would end the table row
    for character, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(character, escaped)
    return re.sub(r"([|`*_\[\]\\])", r"\\\1", text)


def _evaluation_rows(metrics: dict[str, Any], codebook_size: int) -> list[tuple[str, str]]:
    rows = []
    formats = {
        "psnr": ("PSNR (dB, higher is better)", lambda v: f"{v:.2f}"),
        "ssim": ("SSIM (higher is better)", lambda v: f"{v:.4f}"),
        "lpips": ("LPIPS (lower is better)", lambda v: f"{v:.4f}"),
        "utilization": ("Codebook utilization", lambda v: f"{v:.1%} of {codebook_size} codes"),
        "perplexity": ("Code perplexity", lambda v: f"{v:.1f} (max {codebook_size})"),
        "num_images": ("Evaluation images", lambda v: f"{int(v)}"),
        "restoration_psnr": ("Restoration PSNR (dB, clean target from the degraded input)", lambda v: f"{v:.2f}"),
        "degraded_input_psnr": ("PSNR of the degraded input itself (dB)", lambda v: f"{v:.2f}"),
    }
    if metrics.get("rfid_features") == "inception":  # the random features of an offline smoke test are no rFID
        formats["rfid"] = ("rFID (Inception features, against the same held-out images; lower is better)", lambda v: f"{v:.2f}")
    for key, (name, render) in formats.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((name, render(value)))
    return rows


def _restoration_result(metrics: dict[str, Any]) -> dict[str, float] | None:
    """PSNR of the restored output and of the degraded input itself, when metrics.json has both: the card must not
    call a model restoring when its output is further from the clean image than its input was."""
    psnr, input_psnr = metrics.get("restoration_psnr"), metrics.get("degraded_input_psnr")
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in (psnr, input_psnr)):
        return None
    return {"psnr": psnr, "degraded_input_psnr": input_psnr, "restores": psnr > input_psnr}


def _hub_dataset(training_config: dict[str, Any]) -> str | None:
    """`--dataset_name` when it names a Hub data set (not a local folder given to `load_dataset`)."""
    name = training_config.get("dataset_name")
    if training_config.get("dataset_is_local"):  # recorded by train.py: a local folder, e.g. of `save_to_disk`
        return None
    return name if isinstance(name, str) and name and scrub_local_paths(name) == name else None


def _training_summary(training_config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    dataset_name = _hub_dataset(training_config)
    train_data_dir = training_config.get("train_data_dir") or training_config.get("dataset_name")
    if dataset_name:
        data = f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
        evaluation_data = "held-out images of the data set (its validation or test split, or held out of train)"
    elif train_data_dir:
        data = f"a local image folder (`{cut_path_value(str(train_data_dir))}`)"  # a Windows path too, on any system
        evaluation_data = "held-out images of the training folder (its validation or test split, or held out of train)"
    else:
        data = "the real photos that ship with scikit-image (the embedded default, no download)"
        evaluation_data = "crops of scikit-learn's two sample photos, a source never seen in training"
    steps = metrics.get("steps", training_config.get("max_train_steps"))
    seconds = metrics.get("wall_time_seconds")
    wall_time = None
    if isinstance(seconds, (int, float)):
        minutes, secs = divmod(round(seconds), 60)
        wall_time = f"{minutes // 60}h {minutes % 60:02d}m {secs:02d}s"
    return {"data": data, "evaluation_data": evaluation_data, "steps": steps, "wall_time": wall_time}


def render_model_card(
    output_dir: str | Path,
    hub_model_id: str,
    license: str = DEFAULT_LICENSE,
    figures: dict[str, str] | None = None,
    template_path: str | Path | None = None,
    training_config: dict[str, Any] | None = None,
    revision: str | None = None,
) -> ModelCard:
    """Render the model card of the tokenizer in `output_dir` (model files, metrics.json, training_config.json).

    `figures` maps "reconstructions" / "usage" to image files next to the README that the card shows.
    `training_config` replaces the folder's training_config.json: staging passes the run's own, in which a local
    `--dataset_name` can still be told from a Hub id (its published copy has the path cut to a bare name).
    `revision`: the branch the card is published on; its usage snippets load that branch, not main.
    """
    output_dir = Path(output_dir)
    model = _load_complete_model(output_dir)
    config = model.config
    metrics = _read_valid_json(output_dir / "metrics.json")
    if training_config is None:
        training_config = _read_valid_json(output_dir / "training_config.json")
    # The teacher that ran, not the one asked for: without its weights a run trains without it (metrics.json's
    # `teacher` is then null); an older metrics.json without the key leaves the flags to say.
    teacher_ran = metrics.get("teacher", "") is not None
    asked = bool(training_config.get("clip_model"))
    unused = {"clip_model", "clip_pretrained", "prototypes"} if asked and not teacher_ran else set()
    teacher_hub_id = (
        clip_teacher_hub_id(training_config.get("clip_model"), training_config.get("clip_pretrained")) if teacher_ran else None
    )
    public_config = public_fields(training_config)
    dataset_name = _hub_dataset(training_config)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=TAGS + [f"assignment-{config.assignment}"],
        license=license,
        datasets=[dataset_name] if dataset_name else None,
        metrics=[name for name in ("psnr", "ssim", "lpips") if name in metrics] or None,
        model_name=hub_model_id.split("/")[-1],
    )
    summary = codebook_summary(model, top_k=10)
    template_path = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found: it ships inside the package "
            f"(cdb_tokenizer/tools/templates/); reinstall cdb-tokenizer, or pass template_path."
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=hub_model_id,
        revision_argument=f', revision="{revision}"' if revision and revision != "main" else "",
        revision_flag=f" --revision {revision}" if revision and revision != "main" else "",
        model_title=hub_model_id.split("/")[-1],
        config=config,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        assignment_description=ASSIGNMENT_DESCRIPTIONS[config.assignment],
        summary=summary,
        code_rows=code_report_summary(model.code_report()) if config.code_roles else [],
        role_legend=_format_value(role_legend(config.role_names)),
        prototype_rows=[{**row, "label": _format_value(row["label"])} for row in summary["prototypes"][:20]],
        prototype_labels=[_format_value(label) for label in config.prototype_labels or []],
        evaluation_rows=_evaluation_rows(metrics, config.codebook_size),
        restoration=_restoration_result(metrics),
        figures=figures or {},
        teacher_model=public_config.get("clip_model") if teacher_ran else None,
        teacher_pretrained=public_config.get("clip_pretrained"),
        # No checkpoint and no hf-hub: repo (which brings its weights): the teacher distilled was random.
        teacher_random=not training_config.get("clip_pretrained")
        and not str(training_config.get("clip_model")).startswith("hf-hub:"),
        teacher_hub_id=teacher_hub_id,
        prototype_origin=_prototype_origin(training_config.get("prototypes")),
        training=_training_summary(training_config, metrics),
        training_rows=[
            (key, _format_value(value) + (" (unavailable, so not used)" if key in unused else ""))
            for key, value in sorted(public_config.items())
            # Unset flags are noise; nested dicts (the model config) are in config.json and training_config.json.
            if value is not None and not isinstance(value, dict)
        ],
    )


def _prototype_origin(spec: str | None) -> str:
    """Where prototypes without labels came from, by the run's --prototypes (None: set on the model from Python)."""
    if spec is None:
        return "vectors set on the model"
    return "k-means centres of CLIP image features" if str(spec).startswith("kmeans:") else "vectors given in a file"


def _load_complete_model(folder: Path):
    """The model saved in `folder`, refused when its weights do not all fit (transformers would start the missing
    ones at random and only log it: a card and an upload of an untrained model); stray weights are refused too."""
    from ..modeling_cdb_vq import CDBVQModel
    from .loading import quiet_loading_bars

    with quiet_loading_bars():
        model, info = CDBVQModel.from_pretrained(folder, output_loading_info=True)
    unexpected = sorted(str(key) for key in info.get("unexpected_keys") or ())
    if unexpected:
        raise ValueError(
            f"the weights in {folder} hold {len(unexpected)} tensors the model of its config.json does not have "
            f"(e.g. {unexpected[0]}): save the model with `model.save_pretrained`."
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Staging and upload
# ----------------------------------------------------------------------------------------------------------------


def stage_folder(
    output_dir: str | Path,
    staging_dir: str | Path,
    hub_model_id: str,
    license: str = DEFAULT_LICENSE,
    revision: str | None = None,
) -> Path:
    """Gather what the Hub repository holds into `staging_dir`, and render its `README.md` model card.

    Copies the weights, config, remote code and image processor config written by `save_pretrained`, the figures
    (`reconstructions.png`, `codebook_usage.png`), `metrics.json`, `prototypes.safetensors` and the training
    configuration without secrets or local paths. Checkpoints, logs and anything else in `output_dir` stay behind.
    Returns the staging folder.
    """
    return _stage(output_dir, staging_dir, hub_model_id, license=license, revision=revision)[0]


def _stage(
    output_dir: str | Path, staging_dir: str | Path, hub_model_id: str, license: str, revision: str | None
) -> tuple[Path, list[str]]:
    """`stage_folder`, and the private strings its last pass removed (a card rendered again must lose them too)."""
    _check_repo_id(hub_model_id)
    _check_license(license)
    output_dir, staging_dir = Path(output_dir), Path(staging_dir)
    files = model_files(output_dir)
    _check_staging_dir(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    # Copies follow links: one to a file outside the folder (a key, another run's weights) would be uploaded.
    for path in files + [output_dir / name for name in (*EXTRA_FILES, *JSON_FILES, *FIGURES.values())]:
        if path.is_symlink() and output_dir.resolve() not in path.resolve().parents:
            raise ValueError(f"{path} is a link to {path.resolve()}, outside {output_dir}: only the folder's own files "
                             f"are published; copy the file in instead.")  # fmt: skip
    for path in files + [output_dir / name for name in EXTRA_FILES]:
        if path.is_file():
            shutil.copy2(path, staging_dir / path.name)
    private = []  # every string that was changed on its way out: must appear in no staged file
    for path in sorted(staging_dir.glob("*.safetensors")):  # metadata too (the prototypes record their source)
        private += _scrub_safetensors_metadata(path)
    for name in JSON_FILES:
        if (output_dir / name).is_file():
            raw = _read_valid_json(output_dir / name)
            public = public_fields(raw)
            private += _removed_strings(raw, public)
            (staging_dir / name).write_text(json.dumps(public, indent=2) + "\n")
    for name in ("config.json", "preprocessor_config.json"):  # labels and other strings: tokens and paths out too
        raw = _read_valid_json(staging_dir / name)
        public = _public_config(raw)
        if public != raw:
            private += _removed_strings(raw, public)
            (staging_dir / name).write_text(json.dumps(public, indent=2, sort_keys=True) + "\n")
    for name in FIGURES.values():
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, staging_dir / name)
    # The card is rendered from the staged model, whose config is already clean, so that it shows what is published
    # and its escaping (`_` -> `\_`) cannot hide a private label from the last pass; loading it checks it too. The
    # training configuration's values reach the card through `public_fields` only.
    run_config = _read_valid_json(output_dir / "training_config.json")
    write_model_card(staging_dir, hub_model_id, license=license, training_config=run_config, revision=revision)
    private.append(str(output_dir.resolve()))
    _scrub_staged_text(staging_dir, private)
    return staging_dir, private


def write_model_card(
    staging_dir: str | Path,
    hub_model_id: str,
    license: str = DEFAULT_LICENSE,
    training_config: dict[str, Any] | None = None,
    revision: str | None = None,
) -> None:
    """Render the `README.md` of a staged folder from its model, showing the figures it holds."""
    staging_dir = Path(staging_dir)
    figures = {key: name for key, name in FIGURES.items() if (staging_dir / name).is_file()}
    card = render_model_card(
        staging_dir, hub_model_id, license=license, figures=figures, training_config=training_config, revision=revision
    )
    card.save(staging_dir / "README.md")


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (config.json, preprocessor_config.json) as it may be published: secret-named fields dropped,
    `hf_...` tokens blanked and local paths cut in every string. Nested keys are data (a code role named
    `text_tokens`) and are never dropped: the config must still load."""
    return scrub_local_paths(blank_tokens({key: value for key, value in config.items() if not is_secret_key(key, value)}))


def _check_staging_dir(staging_dir: Path) -> None:
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise FileExistsError(f"staging directory {staging_dir} is not empty.")


def _scrub_safetensors_metadata(path: Path) -> list[str]:
    """Rewrite a staged safetensors file whose metadata holds a secret or a local path (the prototypes' `source`,
    e.g. `text:/home/me/labels.txt`) with that metadata cleaned; returns the strings removed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = _decoded_metadata(handle.metadata() or {}, path)
    public = public_value(metadata)
    if public == metadata:
        return []
    tensors = load_file(str(path))
    encoded = {key: labels_metadata(value) if key == "labels" else value for key, value in public.items()}
    replace_file(path, lambda temporary: save_file(tensors, str(temporary), metadata=encoded))  # keeps the file's mode
    return _removed_strings(metadata, public)


def _decoded_metadata(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """The prototypes' `labels` as the list they encode, to be cleaned label by label: as text, a label's Windows path
    had its escaped backslashes read as part of the path, leaving the file's JSON invalid."""
    if "labels" not in metadata:
        return dict(metadata)
    try:
        return {**metadata, "labels": labels_from_metadata(metadata["labels"])}
    except ValueError:
        raise ValueError(f"{path.name}: its 'labels' metadata is not JSON; the file is corrupt.") from None


def _removed_strings(raw: Any, public: Any) -> list[str]:
    """Strings of `raw` that did not survive into `public` and are private: local paths, tokens, secret values."""
    kept = set(collect_strings(public))
    secrets = set(_secret_values(raw))
    return [
        text for text in collect_strings(raw)
        # cut_path_value changes every string scrub_local_paths does, and relative paths too
        if text not in kept and (text in secrets or HF_TOKEN.search(text) or cut_path_value(text) != text)
    ]  # fmt: skip


def _secret_values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [text for key, item in value.items()
                for text in (collect_strings(item) if is_secret_key(key, item) else _secret_values(item))]  # fmt: skip
    if isinstance(value, list):
        return [text for item in value for text in _secret_values(item)]
    return []


def _scrub_staged_text(staging_dir: Path, private: list[str]) -> None:
    """A last pass over every staged text file: no `hf_...` token and none of the private strings left anywhere."""
    private = sorted({text for text in private if len(text) >= 4}, key=len, reverse=True)
    for path in staging_dir.rglob("*"):
        if not path.is_file() or path.suffix not in (".json", ".md", ".txt", ".yaml", ".yml"):
            continue
        text = path.read_text(encoding="utf-8")
        cleaned = HF_TOKEN.sub(REDACTED, text)
        for secret in private:
            public = scrub_local_paths(HF_TOKEN.sub(REDACTED, secret))
            public = cut_path_value(public) if public == secret else public  # a relative path (under a file key)
            public = REDACTED if public == secret or not public else public  # a secret value: blanked
            for form in {secret, json.dumps(secret)[1:-1]}:  # as written, and JSON-escaped (Windows backslashes)
                # Whole occurrences only: "/data" (a --cache_dir) must not be cut out of "huggingface.co/datasets".
                cleaned = re.sub(rf"(?<![\w.]){re.escape(form)}(?!\w)", lambda _: public, cleaned)
        if cleaned != text:
            path.write_text(cleaned, encoding="utf-8")


def push_to_hub(
    output_dir: str | Path,
    hub_model_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    staging_dir: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
) -> CommitInfo:
    """Stage `output_dir` (see `stage_folder`) and upload it to the Hub model repository `hub_model_id`.

    The folder is staged (and so checked: it loads, its weights fit) before anything is created on the Hub. The
    repository is created when needed; `private` makes a new one private (else it takes the owner's default
    visibility), and refuses an existing public one (its visibility is the owner's to change on the Hub).
    `revision` is a branch, created from main when it does not exist. The token is `token`, else `HF_TOKEN` or the
    one saved by `hf auth login`. The staged folder is a temporary one unless `staging_dir` is given (then it is
    kept).
    """
    token = check_push_settings(hub_model_id, token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cdb-vq-hub-") as temporary:
        folder, private_strings = _stage(
            output_dir, staging_dir or temporary, hub_model_id, license=license, revision=revision
        )
        # private=None: a new repository takes its owner's default visibility (an organisation's may be private).
        repo_id = api.create_repo(hub_model_id, private=private or None, exist_ok=True).repo_id
        if private and not api.repo_info(repo_id).private:
            raise ValueError(
                f"{repo_id} already exists and is public, and private=True (--private) only applies to a new "
                f"repository: make it private on the Hub first, or publish without --private."
            )
        if repo_id != hub_model_id:  # "name" -> "user/name": the full id goes into the card's usage snippet
            run_config = _read_valid_json(Path(output_dir) / "training_config.json")
            write_model_card(folder, repo_id, license=license, training_config=run_config, revision=revision)
            _scrub_staged_text(folder, private_strings)  # the same last pass as staging's
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            delete_patterns=PUBLISHED_PATTERNS,
            commit_message=commit_message or "Upload cdb-vq image tokenizer",
        )


def check_push_settings(hub_model_id: str, token: str | None = None) -> str:
    """The token a push will use, once `hub_model_id` is a valid repo id and a token is at hand (`token`, else
    `HF_TOKEN` or `hf auth login`'s); train.py checks this before training, not after it."""
    _check_repo_id(hub_model_id)
    token = token or get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token: pass one (train.py --hub_token, publish.py --token), set HF_TOKEN, or log in with "
            "`hf auth login`."
        )
    return token


def _check_license(license: str) -> None:
    """Refuse what cannot be a Hub license id ("MIT", "Apache 2.0"): the Hub refuses the card's metadata only when the
    commit arrives, after the repository was created."""
    if not isinstance(license, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ValueError(
            f"license {license!r} is not a Hub license id: use one such as apache-2.0, mit or cc-by-4.0 (lower case, "
            f"no spaces), or 'other'."
        )


def _check_repo_id(hub_model_id: str) -> None:
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as error:
        raise ValueError(f"invalid hub_model_id {hub_model_id!r}: {error}") from None


__all__ = [
    "check_push_settings",
    "clip_teacher_hub_id",
    "codebook_summary",
    "model_files",
    "public_fields",
    "push_to_hub",
    "render_model_card",
    "stage_folder",
    "write_model_card",
]
