"""Flags, presets and config files of `training/train.py`: everything that turns a command line into `args`.

`parse_args(argv)` reads the flags (and `--config run.yaml`, whose keys are flag names), fills what was not given
from the preset (`PRESETS`: "tiny" without data flags, "base" with them), builds `args.model_config_dict` (the
`CDBVQConfig` fields: preset, then `--model_config`, then model flags) and checks the lot, so that a mistake stops
the run at start-up with a message rather than after training. Every `CDBVQConfig` field is a flag
(`--assignment`, `--codebook_size`, ...). Nothing here starts a run: see training/train.py.
"""

from __future__ import annotations

import argparse
import inspect
import math
import json
import os
import sys
from pathlib import Path

from ..configuration_cdb_vq import CDBVQConfig, expand_home, field_names
from ..quantization_cdb_vq import KMEANS_ITERATIONS
from .degradations import canonical_spec, degrades_nothing
from .redaction import hide_secret_arguments
from .roles import three_role_ranges
from .messages import OneLineErrorParser
from .teacher import DEFAULT_TEMPLATE, check_prompt_template

# Values that depend on the kind of run. "tiny" is the embedded demo (no data flags): a small f2 tokenizer that trains
# on a CPU in minutes, chosen by measurement (docs/training.md: f4 cannot reach 24 dB on the held-out crops, small
# batches with more steps beat large ones at the same CPU time, no discriminator at this length, 1,024 codes carry
# the colour that 512 leave to guesswork). "base" is a real run on your data (any data flag): the CDBVQConfig
# defaults at 256x256. The tiny preset's resolution, random_crop_scale and num_validation_images also define the
# demo's held-out crops: changing them changes the held-out set.
# Any flag or config-file key given explicitly wins over the preset.
PRESETS = {
    "tiny": {
        "model": {
            "base_channels": 16, "channel_multipliers": [1, 2], "num_res_blocks": 1, "use_mid_attention": False,
            "norm_num_groups": 1, "latent_dim": 32, "codebook_size": 1024, "codebook_dim": 8, "semantic_dim": 16,
            "num_prototypes": 16, "router_dim": 16, "commitment_weight": 0.05,
        },
        "training": {
            "resolution": 64, "train_batch_size": 4, "learning_rate": 2e-3, "lr_warmup_steps": 50,
            "max_train_steps": 1400, "validation_steps": 700, "checkpointing_steps": 1400,
            "dead_code_restart_steps": 100, "disc_start": 0, "disc_weight": 0.0, "lpips_weight": 0.0, "l2_weight": 1.0,
            "num_validation_images": 32, "random_crop_scale": [0.05, 0.5], "clip_model": "ViT-B-32",
            "output_dir": "outputs/cdb-vq-demo",
        },
    },
    "base": {
        "model": {},
        "training": {
            "resolution": 256, "train_batch_size": 8, "learning_rate": 1e-4, "lr_warmup_steps": 1000,
            "max_train_steps": 100_000, "validation_steps": 2000, "checkpointing_steps": 5000,
            "dead_code_restart_steps": 1000, "disc_start": 20_000, "disc_weight": 0.5, "lpips_weight": 1.0, "l2_weight": 0.0,
            "num_validation_images": 64, "random_crop_scale": [0.5, 1.0], "clip_model": "ViT-B-16",
            "output_dir": "outputs/cdb-vq",
        },
    },
}  # fmt: skip

DATA_FLAGS = ("train_data_dir", "dataset_name")
# Config fields that are not flags: set by the run (prototype labels) or by a training flag (--resolution).
NOT_FLAGS = {"prototype_labels", "resolution", "restoration_degradation"}


class _Unset:
    """Default of the flags a preset fills: tells 'not given' apart from an explicit value (even None)."""

    def __repr__(self) -> str:
        return "the preset's"


PRESET = _Unset()


# transformers' schedules that need nothing beyond the warm-up and the step count.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _optional_float(value: str) -> float | None:
    return None if str(value).lower() in ("none", "null", "") else float(value)


def _optional_int(value: str) -> int | None:
    return None if str(value).lower() in ("none", "null", "") else int(value)


def _optional_str(value: str) -> str | None:
    return None if str(value).lower() in ("none", "null", "") else value


def _model_config_fields() -> dict[str, inspect.Parameter]:
    """The config's fields that are training flags, with their defaults."""
    parameters = inspect.signature(CDBVQConfig.__init__).parameters
    return {name: parameters[name] for name in field_names() if name not in NOT_FLAGS}


CODE_ROLES_EXAMPLE = """'{"structure": [0, 512], "texture": [512, 1024]}'"""


def json_object(text: str) -> dict:
    """A flag's JSON object value (`--code_roles`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error.msg}); e.g. {CODE_ROLES_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; e.g. {CODE_ROLES_EXAMPLE}")
    return value


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (CDBVQConfig fields; default: the preset, then --model_config)")
    for name, parameter in _model_config_fields().items():
        default = parameter.default
        help_text = f"CDBVQConfig.{name} (CDBVQConfig default: {default!r})."
        if name == "channel_multipliers":
            group.add_argument(f"--{name}", type=int, nargs="+", default=PRESET, help=help_text)
        elif name == "code_roles":
            group.add_argument(
                f"--{name}", type=json_object, default=PRESET, help=f"{help_text} JSON, e.g. {CODE_ROLES_EXAMPLE}."
            )
        elif parameter.annotation == "int | None":  # quantizer_format
            group.add_argument(f"--{name}", type=_optional_int, default=PRESET, help=help_text + " 'none' for None.")
        elif "None" in str(parameter.annotation) and (default is None or isinstance(default, float)):
            group.add_argument(f"--{name}", type=_optional_float, default=PRESET, help=help_text + " 'none' for None.")
        elif isinstance(default, bool):
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=PRESET, help=help_text)
        elif name == "assignment":
            group.add_argument(f"--{name}", choices=["nearest", "sinkhorn", "cdb"], default=PRESET, help=help_text)
        else:
            group.add_argument(f"--{name}", type=type(default), default=PRESET, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: data, model (every `CDBVQConfig` field), losses, teacher, optimisation and the run."""
    parser = OneLineErrorParser(
        description="Train a cdb-vq image tokenizer (accelerate launch training/train.py ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=str, default=None, help="A YAML file whose keys are these flags' names; flags given on the command line win.")
    parser.add_argument("--model_preset", choices=sorted(PRESETS), default=None, help="Defaults for the model and the run: 'tiny' (the default without data flags) or 'base' (with them).")
    parser.add_argument("--model_config", type=str, default=None, help="A CDBVQConfig JSON file (e.g. the config.json of a saved tokenizer) to start the model config from.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="A folder of images (datasets' imagefolder layout).")
    data.add_argument("--dataset_name", type=_optional_str, default=None, help="A data set on the Hugging Face Hub ('none': unset a --config file's).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The data set's configuration.")
    data.add_argument("--image_column", type=str, default="image", help="The column with the images.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets and downloads are cached.")
    data.add_argument("--streaming", action="store_true", help="Stream the data set (for sets larger than the disk); split across processes.")
    data.add_argument("--validation_split", type=_optional_str, default=None, help="Split to validate on (default, or 'none': 'validation' or 'test' if present, else images held out of the training split).")
    data.add_argument("--num_validation_images", type=int, default=PRESET, help="How many held-out images to validate on.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N images of the training split (debugging): in the data set's order when it has a validation split, else of the shuffled rest once images are held out.")
    data.add_argument("--resolution", type=int, default=PRESET, help="Training crop size (and the model's config.resolution).")
    data.add_argument("--random_crop_scale", type=float, nargs=2, default=PRESET, metavar=("MIN", "MAX"), help="Area range of the random resized crop.")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True, help="Random horizontal flips.")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Shuffle buffer of a streamed data set.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes (0: in the main process).")

    teacher = parser.add_argument_group("CLIP teacher and semantic prototypes")
    teacher.add_argument("--clip_model", type=_optional_str, default=PRESET, help="open_clip model name, 'hf-hub:org/repo', or a model-config JSON path; 'none' trains without a teacher.")
    teacher.add_argument("--clip_pretrained", type=_optional_str, default="openai", help="open_clip tag, 'hf-hub:org/repo', or a checkpoint file; 'none' for random weights.")
    teacher.add_argument("--prototypes", type=_optional_str, default=None, help="'text:FILE' (a label or prompt per line), 'kmeans:N' (k-means of CLIP patch features), a prototypes .safetensors file, or 'none'.")
    teacher.add_argument("--prototype_template", type=str, default=DEFAULT_TEMPLATE, help="Prompt template for text prototypes ('{}' for the lines as they are).")
    teacher.add_argument("--prototype_kmeans_batches", type=int, default=32, help="Training batches whose CLIP patch features 'kmeans:N' clusters.")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--l1_weight", type=float, default=1.0, help="Weight of the L1 reconstruction loss.")
    loss.add_argument("--l2_weight", type=float, default=PRESET, help="Weight of the L2 (MSE) reconstruction loss.")
    loss.add_argument("--lpips_weight", type=float, default=PRESET, help="Weight of the LPIPS perceptual loss (needs the backbone weights).")
    loss.add_argument("--lpips_network", choices=["vgg", "alex", "squeeze"], default="vgg", help="LPIPS backbone.")
    loss.add_argument("--disc_weight", type=float, default=PRESET, help="Weight of the PatchGAN adversarial loss (0 disables the discriminator).")
    loss.add_argument("--disc_start", type=int, default=PRESET, help="Step at which the adversarial losses start.")
    loss.add_argument("--disc_loss", choices=["hinge", "vanilla"], default="hinge", help="Discriminator loss.")
    loss.add_argument("--disc_base_channels", type=int, default=64, help="Width of the discriminator's first layer.")
    loss.add_argument("--disc_num_layers", type=int, default=3, help="Strided layers of the discriminator.")
    loss.add_argument("--disc_learning_rate", type=float, default=None, help="Discriminator learning rate (default: --learning_rate).")
    loss.add_argument("--adaptive_disc_weight", action=argparse.BooleanOptionalAction, default=True, help="taming's adaptive weight on the adversarial term.")
    loss.add_argument("--high_frequency_weight", type=float, default=0.0, help="Weight of the L1 loss between Laplacian responses of the reconstruction and the target (sharper restorations).")

    roles = parser.add_argument_group("roles and restoration")
    roles.add_argument("--role_preset", choices=["three"], default=None, help="'three': code_roles = structure / texture / colour thirds of the codebook (with --role_supervision_weight to train them).")
    roles.add_argument("--degradation", type=str, default=None, help="Restoration training: degrade the encoder's input by this spec (e.g. 'gaussian_blur:0.5-2+noise:0.02'; names: gaussian_blur, motion_blur, noise, jpeg, downscale), reconstruct the clean image. Recorded in the config.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=PRESET, help="Batch size per device.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimiser step.")
    optim.add_argument("--learning_rate", type=float, default=PRESET, help="Peak learning rate.")
    optim.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by batch size x accumulation x processes.")
    optim.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS, help="transformers' learning-rate schedule.")
    optim.add_argument("--lr_warmup_steps", type=int, default=PRESET, help="Warm-up steps.")
    optim.add_argument("--max_train_steps", type=int, default=PRESET, help="Optimiser steps to train for.")
    optim.add_argument("--num_train_epochs", type=int, default=None, help="Epochs to train for (sets --max_train_steps when that is not given).")
    optim.add_argument("--adam_beta1", type=float, default=0.5, help="Adam beta1 (VQGAN uses 0.5).")
    optim.add_argument("--adam_beta2", type=float, default=0.9, help="Adam beta2 (VQGAN uses 0.9).")
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    optim.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is validated and saved.")
    optim.add_argument("--ema_weights_decay", type=float, default=0.999, help="Decay of the weight EMA.")
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Mixed precision (default: accelerate config).")
    optim.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    optim.add_argument("--seed", type=int, default=0, help="Seed of everything random: weights, data order, crops.")
    optim.add_argument("--max_nonfinite_steps", type=int, default=5, help="Stop after this many steps in a row with a NaN/inf loss.")

    codebook = parser.add_argument_group("codebook upkeep")
    codebook.add_argument("--kmeans_init_batches", type=int, default=None, help="Batches whose latents initialise the codebook by k-means (default: enough for ~4 latents per code, at most 64).")
    codebook.add_argument("--kmeans_init_iterations", type=int, default=KMEANS_ITERATIONS, help="k-means iterations of the codebook initialisation.")
    codebook.add_argument("--dead_code_restart_steps", type=int, default=PRESET, help="Restart dead codes every this many steps (0 disables).")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, default=PRESET, help="Where the model, pictures, metrics, checkpoints and logs go.")
    run.add_argument("--num_threads", type=int, default=None, help="torch's CPU threads per process (default: OMP_NUM_THREADS when set, else the CPU cores that are idle at start, shared among this machine's processes).")
    run.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    run.add_argument("--report_to", type=str, default="tensorboard", help="Trackers: tensorboard, wandb, all, or none.")
    run.add_argument("--tracker_project_name", type=str, default="cdb-vq", help="Tracker project / run name.")
    run.add_argument("--validation_steps", type=int, default=PRESET, help="Validate every this many steps (and at the end).")
    run.add_argument("--validation_fid", nargs="?", const="inception", default=None, choices=["inception", "random", "none"], help="Also compute rFID at validation (torchmetrics' FrechetInceptionDistance against the same held-out crops); without the Inception weights one line says so. 'random': a small random feature extractor, to smoke-test the path offline (not comparable); 'none': off (unsets a --config file's).")
    run.add_argument("--fid_weights", type=str, default=None, help="The FID Inception weights file (default: the torch hub cache, else a download when reachable).")
    run.add_argument("--num_grid_images", type=int, default=8, help="Held-out images in the reconstruction grid.")
    run.add_argument("--checkpointing_steps", type=int, default=PRESET, help="Save an accelerate checkpoint every this many steps.")
    run.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep at most this many checkpoints.")
    run.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' (the newest complete checkpoint) or a checkpoint folder to continue from.")
    run.add_argument("--overwrite_output_dir", action="store_true", help="Start over in an --output_dir that holds another run: its checkpoints, logs, model and metrics are deleted first.")
    run.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub at the end.")
    run.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (default: the output folder's name).")
    run.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one; prefer `hf auth login` or HF_TOKEN: a token on the command line shows in the process list). Never written to training_config.json or the trackers.")
    run.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private (an existing public one is refused, not changed).")
    _add_model_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (and `--config`), fill the preset's defaults and check the model config; errors exit clearly."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        values = _read_config_file(parser, known.config)
        if any(getattr(known, flag) is not None for flag in DATA_FLAGS):  # a data source given here replaces the file's
            for flag in (*DATA_FLAGS, "dataset_config_name"):  # (the file's configuration is of its own data set)
                values.pop(flag, None)
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.validation_fid == "none":
        args.validation_fid = None
    if args.model_preset is None:
        args.model_preset = "base" if any(getattr(args, flag) for flag in DATA_FLAGS) else "tiny"
    preset = PRESETS[args.model_preset]
    # --num_train_epochs sets the steps unless --max_train_steps is given as high up: the command line beats the
    # --config file (the recipes' max_train_steps silently beat a command-line --num_train_epochs).
    on_command_line = known.max_train_steps is not PRESET or known.num_train_epochs is not None
    steps_given = (known if on_command_line else args).max_train_steps is not PRESET
    epochs_decide = args.num_train_epochs is not None and not steps_given
    if args.model_config is not None and args.resolution is PRESET and os.path.isfile(args.model_config):
        args.resolution = CDBVQConfig.from_json_file(args.model_config).resolution  # train at the model's resolution
    for key, value in preset["training"].items():
        if getattr(args, key) is PRESET:
            setattr(args, key, value)
    if epochs_decide:
        args.max_train_steps = None  # set from --num_train_epochs once the data is known

    try:
        args.model_config_dict = _model_config_dict(args, preset)
        CDBVQConfig(**args.model_config_dict)
        _check_training_args(args)
        _check_validation_can_run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if argv is None:  # the real command line, which trackers (W&B) copy
        hide_secret_arguments(sys.argv)
    return args


# Beyond any tokenizer's training size (LlamaGen's: 256-512): one float32 RGB crop of 8192 pixels is 0.8 GB.
MAX_RESOLUTION = 8192

# Flags checked by value, as intervals: "[0, inf)" is any finite number from 0 on (infinity and NaN never pass).
FLAG_RANGES = {
    **dict.fromkeys(("l1_weight", "l2_weight", "lpips_weight", "disc_weight", "high_frequency_weight",
                     "adam_weight_decay", "max_grad_norm"), "[0, inf)"),
    **dict.fromkeys(("learning_rate", "disc_learning_rate", "adam_epsilon"), "(0, inf)"),
    **dict.fromkeys(("adam_beta1", "adam_beta2"), "[0, 1)"),
    **dict.fromkeys(("lr_warmup_steps", "disc_start", "dead_code_restart_steps", "kmeans_init_iterations",
                     "max_nonfinite_steps", "dataloader_num_workers"), "[0, inf)"),
    **dict.fromkeys(("kmeans_init_batches", "num_threads"), "[0, inf)"),  # 0: the default / one thread
    **dict.fromkeys(("num_grid_images", "checkpoints_total_limit", "disc_num_layers"), "[1, inf)"),
    "disc_base_channels": "[4, inf)",  # the discriminator's group norms take a quarter of its width as groups
}


def check_in(name: str, value, interval: str) -> None:
    """Raise a ValueError naming --name unless `value` (None: not set) lies in `interval`, such as "(0, inf)"."""
    if value is None:
        return
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below and math.isfinite(value)):  # NaN fails every comparison: it never gets through
        raise ValueError(f"--{name} must be {'an integer' if isinstance(value, int) else 'a number'} in {interval}, "
                         f"got {value}.")


def _check_validation_can_run(args: argparse.Namespace) -> None:
    """Refuse at start-up a run whose validation would fail after training (e.g. images too small for SSIM)."""
    factor = CDBVQConfig(**args.model_config_dict).downsampling_factor
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the model's downsampling factor {factor}.")
    from .evaluation import check_image_size

    check_image_size(args.resolution, args.resolution, name="--resolution")
    if args.validation_fid is not None and args.num_validation_images < 2:
        raise ValueError(
            f"--validation_fid needs --num_validation_images of at least 2 (rFID compares the statistics of two image "
            f"sets), got {args.num_validation_images}."
        )


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        parser.error(f"--config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        parser.error(f"--config file {path!r} must hold a mapping of flag names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config file {path!r} has unknown keys {unknown}; keys are flag names such as 'learning_rate'.")
    actions = {action.dest: action for action in parser._actions}
    try:
        return {key: _config_value(actions[key], value) for key, value in values.items()}
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        parser.error(f"--config file {path!r}: {error}")


def _config_value(action: argparse.Action, value):
    """A --config file's value as its flag would parse it: argparse converts string defaults only, so YAML's
    `2.5` for an int flag, or `'no'` for a switch (a true string: the switch stayed on), went through unchecked."""
    name = action.option_strings[0] if action.option_strings else action.dest
    if action.nargs == 0:  # a switch (store_true, --flag/--no-flag)
        if not isinstance(value, bool):
            raise ValueError(f"{action.dest} must be true or false, got {value!r}.")
        return value
    if action.nargs == "?" and isinstance(value, bool):  # YAML's way to give the flag bare (true) or not (false)
        return action.const if value else None
    if value is None:
        return None
    if isinstance(value, bool) and action.type is not json_object:
        if action.type in (None, str, _optional_str):  # a word YAML took for a boolean
            raise ValueError(f"{action.dest} got {value}: YAML reads an unquoted yes/no/on/off as true/false; quote "
                             f"it ('no').")  # fmt: skip
        raise ValueError(f"{action.dest} is not a valid value of {name} (got {value}).")
    convert = action.type or str
    many = action.nargs not in (None, "?")
    if many != isinstance(value, list) and action.type is not json_object:
        raise ValueError(f"{action.dest} takes {'a list' if many else 'one value'}, got {value!r}.")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ValueError(f"{action.dest} takes {action.nargs} values, got {value!r}.")
    try:
        if many:
            converted = [convert(str(item)) for item in value]
        elif isinstance(value, (dict, list)):  # a JSON-valued flag (--code_roles), written as YAML
            converted = convert(json.dumps(value))
        else:
            converted = convert(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{action.dest} is not a valid value of {name} ({error}).") from None
    items = converted if isinstance(converted, list) else [converted]
    if action.choices is not None and any(item not in action.choices for item in items):
        raise ValueError(f"{action.dest} must be one of {sorted(map(str, action.choices))}, got {value!r}.")
    return converted


def _model_config_dict(args: argparse.Namespace, preset: dict) -> dict:
    config = dict(preset["model"])
    if args.model_config is not None:
        if not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--model_config file {args.model_config!r} does not exist.")
        saved = CDBVQConfig.from_json_file(args.model_config).to_dict()
        fields = set(inspect.signature(CDBVQConfig.__init__).parameters) - {"self", "kwargs", "prototype_labels"}
        config.update({key: value for key, value in saved.items() if key in fields})
    for name in _model_config_fields():
        value = getattr(args, name)
        if value is not PRESET:
            config[name] = value
    config["resolution"] = args.resolution
    if getattr(args, "role_preset", None) == "three" and config.get("code_roles"):
        source = "--code_roles" if args.code_roles is not PRESET else "--model_config"
        raise ValueError(f"--role_preset three and {source} both set the code roles; give one of them.")
    if getattr(args, "role_preset", None) == "three":
        config["code_roles"] = three_role_ranges(config.get("codebook_size", CDBVQConfig().codebook_size))
    config.pop("restoration_degradation", None)  # only what this run trains on (not a --model_config's)
    if getattr(args, "degradation", None) is not None:  # "" too: an error, never a plain run
        config["restoration_degradation"] = canonical_spec(args.degradation)
        if degrades_nothing(args.degradation):
            raise ValueError(f"--degradation {args.degradation!r} degrades nothing (every strength turns it off).")
    return args_without_sentinels(args, config)


def args_without_sentinels(args: argparse.Namespace, config: dict) -> dict:
    """Replace the remaining 'not given' markers of model flags by the config's values (for logs and JSON)."""
    for name in _model_config_fields():
        if getattr(args, name) is PRESET:
            setattr(args, name, config.get(name, _model_config_fields()[name].default))
    return config


def check_output_dir_flags(args: argparse.Namespace) -> None:
    """Expand `~` in --output_dir, then refuse --overwrite_output_dir with a --resume_from_checkpoint it would delete
    (`latest`, or a checkpoint inside --output_dir); resuming another folder's checkpoint into a cleared one is
    allowed. (train.py and train_prior.py.)"""
    # No shell expands `output_dir: ~/runs/x` in a YAML config or `--output_dir=~/runs/x`; the home folder is meant.
    args.output_dir = expand_home(args.output_dir)
    if not args.overwrite_output_dir or args.resume_from_checkpoint is None:
        return
    if resumes_its_own_run(args):
        raise ValueError(
            "--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue from: give one or "
            "the other."
        )


def resumes_its_own_run(args: argparse.Namespace) -> bool:
    """Whether --resume_from_checkpoint continues the run in --output_dir (`latest`, or a checkpoint inside it, by
    path or by name) rather than another folder's."""
    resume = args.resume_from_checkpoint
    if resume is None:
        return False
    checkpoint = named_checkpoint(resume, args.output_dir)
    return resume == "latest" or Path(args.output_dir).resolve() in checkpoint.resolve().parents


def named_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The folder --resume_from_checkpoint names: a path, or a bare name of one of --output_dir's checkpoints
    (`checkpoint-800`, as diffusers' scripts take it) when no such folder is in the working directory."""
    path, in_output_dir = Path(resume), Path(output_dir) / "checkpoints" / resume
    if not path.is_dir() and len(path.parts) == 1 and in_output_dir.is_dir():
        return in_output_dir
    return path


def _refuse_output_dir_among_the_images(args: argparse.Namespace) -> None:
    """Refuse an --output_dir inside the folders --train_data_dir reads: the run's pictures (reconstructions.png,
    ...) would be training and held-out images of its resume and of later runs, and shift the held-out split."""
    if args.train_data_dir is None:
        return
    from .data import split_folders

    output_dir = Path(args.output_dir).resolve()
    for root in split_folders(Path(args.train_data_dir).expanduser()).values():
        if output_dir == root.resolve() or root.resolve() in output_dir.parents:
            raise ValueError(f"--output_dir {args.output_dir} is inside the images of --train_data_dir ({root}): its "
                             f"pictures would become training images; choose an --output_dir outside it.")  # fmt: skip


def _check_training_args(args: argparse.Namespace) -> None:
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise ValueError("give either --train_data_dir or --dataset_name, not both.")
    if args.train_data_dir is None and args.dataset_name is None:
        ignored = [f"--{name}" for name in ("streaming", "max_train_samples", "validation_split", "dataset_config_name")
                   if getattr(args, name) not in (None, False)]  # fmt: skip
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} only apply to --train_data_dir or --dataset_name data; without data flags the "
                f"run trains on the demo photos."
            )
    if args.validation_split and args.validation_split.split("[")[0].strip().lower() == "train":  # train[:1%] too
        raise ValueError("--validation_split train validates on the training images; name another split, or leave it "
                         "out to hold images out of the training split.")  # fmt: skip
    check_output_dir_flags(args)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise FileNotFoundError(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a directory.")
    positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "validation_steps",
                "checkpointing_steps", "num_validation_images", "resolution", "max_train_samples", "num_train_epochs")  # fmt: skip
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.resolution > MAX_RESOLUTION:  # 100000 went on to a 120 GB allocation, in torch's words
        raise ValueError(f"--resolution {args.resolution} is above {MAX_RESOLUTION}: a batch of such crops alone would "
                         f"take {args.train_batch_size * 12 * args.resolution**2 / 1e9:.0f} GB.")  # fmt: skip
    low, high = args.random_crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--random_crop_scale must be two numbers with 0 < MIN <= MAX <= 1, got {low} {high}.")
    if args.prototypes is not None:
        kind, _, value = args.prototypes.partition(":")
        if kind == "kmeans" and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"--prototypes kmeans:N needs a positive N, got {args.prototypes!r}.")
        if kind == "text" and not os.path.isfile(value):
            raise FileNotFoundError(f"--prototypes text file {value!r} does not exist.")
        if kind not in ("text", "kmeans") and not os.path.isfile(args.prototypes):
            raise ValueError(f"--prototypes must be 'text:FILE', 'kmeans:N' or a .safetensors file, got {args.prototypes!r}.")
    check_prompt_template(args.prototype_template)
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps, not --num_train_epochs (a stream has no length).")
    for name, interval in FLAG_RANGES.items():
        check_in(name, getattr(args, name), interval)
    if not 0 < args.ema_weights_decay < 1:
        raise ValueError(f"--ema_weights_decay must be in (0, 1), got {args.ema_weights_decay}.")
    _refuse_output_dir_among_the_images(args)
