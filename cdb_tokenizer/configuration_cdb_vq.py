"""Configuration of the CDB-VQ image tokenizer."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from transformers import PretrainedConfig
from transformers.utils import CONFIG_NAME


ASSIGNMENT_RULES = ("nearest", "sinkhorn", "cdb")
# Version of the quantizer's rules and state. 1: the first CDB router (standardised distance, Sinkhorn imitation);
# 2: the transport-potential router; 3: the router's prototype cosines centred over its candidates. Only `cdb`
# changed between them.
QUANTIZER_FORMAT = 3
# Formats this version routes exactly as they were saved.
SUPPORTED_QUANTIZER_FORMATS = (2, 3)
FORMAT_1_FIELDS = ("router_distance_scale", "ot_imitation_weight")
# Roles whose target role-supervision knows how to derive from image signals (structure is the fallback).
SUPERVISED_ROLES = ("structure", "texture", "colour")
# Fields checked by type before their ranges are (a string or NaN would otherwise fail deep inside a comparison).
REAL_FIELDS = (
    "dropout", "sinkhorn_epsilon", "router_semantic_scale", "potential_step", "potential_bound", "role_prior_scale",
    "role_supervision_weight", "role_texture_threshold", "role_colour_threshold", "commitment_weight",
    "codebook_weight", "balance_weight", "semantic_distillation_weight", "token_alignment_weight",
    "code_alignment_weight", "usage_decay", "dead_code_threshold", "initializer_range",
)  # fmt: skip
OPTIONAL_REAL_FIELDS = ("router_logit_bound", "ema_decay")
BOOL_FIELDS = ("use_mid_attention", "l2_normalize_codes", "retie_prototypes")


class CDBVQConfig(PretrainedConfig):
    r"""
    Configuration of a [`CDBVQModel`]: a VQGAN-style convolutional autoencoder whose codebook assignment is
    decided by one of three rules (`nearest`, `sinkhorn`, or the learned Codebook Decision Block `cdb`).

    Args:
        num_channels (`int`, *optional*, defaults to 3): Channels of the input and reconstructed images (the image
            processor's `postprocess` turns 3-channel output into pictures; other counts stay tensors).
        resolution (`int`, *optional*, defaults to 256): Training resolution; the default grid of `decode_image_tokens`.
        base_channels (`int`, *optional*, defaults to 128): Width of the first encoder level.
        channel_multipliers (`list[int]`, *optional*, defaults to `[1, 1, 2, 2, 4]`): Width of each level as a
            multiple of `base_channels`; the downsampling factor is `2 ** (len(channel_multipliers) - 1)`.
        num_res_blocks (`int`, *optional*, defaults to 2): Residual blocks per level.
        use_mid_attention (`bool`, *optional*, defaults to `True`): Self-attention at the lowest resolution.
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of every GroupNorm; must divide every width.
        dropout (`float`, *optional*, defaults to 0.0): Dropout inside residual blocks.
        latent_dim (`int`, *optional*, defaults to 256): Channels of the encoder output before `quant_conv`.
        codebook_size (`int`, *optional*, defaults to 16384): Number of codes K.
        codebook_dim (`int`, *optional*, defaults to 32): Dimension of each code (latents are projected to it).
        l2_normalize_codes (`bool`, *optional*, defaults to `False`): Compare l2-normalised latents and codes.
        assignment (`str`, *optional*, defaults to `"cdb"`): Who picks a latent's code: `"nearest"`, `"sinkhorn"`
            (optimal transport while training, nearest at inference) or `"cdb"` (the learned router).
        sinkhorn_epsilon (`float`, *optional*, defaults to 10.0): Sharpness of the transport plan,
            `Q ~ exp(-epsilon * normalised_cost)` (OptVQ uses 10).
        sinkhorn_iterations (`int`, *optional*, defaults to 5): Sinkhorn iterations per batch.
        router_dim (`int`, *optional*, defaults to 64): Width of the router's query and per-code keys.
        router_candidates (`int`, *optional*, defaults to 8): Codes of lowest transport cost that the router's learned
            term re-ranks for each latent (1 turns the learned term off: pure transport assignment).
        router_logit_bound (`float`, *optional*, defaults to 0.5): Largest swing of the router's learned logits
            (`bound * tanh(score / bound)`), so it re-ranks near-equal codes instead of overriding the transport
            cost; `None` leaves them unbounded.
        router_semantic_scale (`float`, *optional*, defaults to 5.0): Initial weight of the router's prototype term
            (the cosine of a token's semantic features to each candidate's prototype, centred over the candidates);
            the term starts at 0 when `semantic_distillation_weight` is 0, since nothing then teaches the head.
        potential_step (`float`, *optional*, defaults to 0.02): Step of the dual ascent that learns the per-code
            transport potentials from usage (in units of the router temperature); 0 keeps them at zero.
        potential_bound (`float`, *optional*, defaults to 1.0): Largest absolute potential, in router temperatures.
        semantic_dim (`int`, *optional*, defaults to 512): Width of the semantic (CLIP) features.
        num_prototypes (`int`, *optional*, defaults to 1000): Number of semantic prototypes the codes are tied to.
        prototype_labels (`list[str]`, *optional*): Text label of each prototype, when they came from prompts.
        retie_prototypes (`bool`, *optional*, defaults to `True`): While training with a teacher, tie each code to the
            prototype nearest the running mean teacher feature of the tokens it wins (False keeps the given map).
        code_roles (`dict[str, list[int]]`, *optional*): Named `[start, end)` code ranges that tile the codebook,
            e.g. `{"structure": [0, 512], "texture": [512, 1024]}`; a role head adds a log-prior over them.
        role_hidden_dim (`int`, *optional*, defaults to 32): Hidden width of the role head.
        role_supervision_weight (`float`, *optional*, defaults to 0.0): Weight of the cross-entropy that trains the
            role head toward each token's target role from its image signals (0: roles are learned only through routing).
        role_prior_scale (`float`, *optional*, defaults to 0.35): Scale of the role log-prior in routing (in router
            temperatures): lower lets more tokens take a near code of another role when its own range is crowded
            (benchmarks/roles.py: 1.0 separates more, at ~0.9 dB; 0.35 keeps the separation above 2x chance at
            three seeds for <= 0.2 dB).
        role_texture_threshold (`float`, *optional*, defaults to 0.02): Laplacian energy of a cell (pixels in [-1, 1])
            from which its target role is `texture`.
        role_colour_threshold (`float`, *optional*, defaults to 0.4): Chroma of a cell from which a cell below the
            texture threshold gets the target role `colour`; other cells get `structure`.
        restoration_degradation (`str`, *optional*): The degradation the model was trained to undo (e.g.
            `"gaussian_blur:1.5"`), recorded by training with `--degradation`; `None` for a plain tokenizer.
        commitment_weight (`float`, *optional*, defaults to 0.25): Weight of the commitment loss.
        codebook_weight (`float`, *optional*, defaults to 1.0): Weight of the codebook loss (unused with EMA).
        balance_weight (`float`, *optional*, defaults to 0.0): Weight of KL(batch-averaged soft code distribution ||
            uniform) (`cdb` only; the transport potentials balance usage without it).
        semantic_distillation_weight (`float`, *optional*, defaults to 1.0): Weight of the semantic head's cosine
            loss to the teacher's patch features.
        token_alignment_weight (`float`, *optional*, defaults to 0.5): Weight of the cosine loss between each
            token's projected code and its patch's teacher feature.
        code_alignment_weight (`float`, *optional*, defaults to 0.5): Weight of the cosine loss between each
            projected code and its prototype.
        ema_decay (`float`, *optional*, defaults to 0.8): Decay of EMA codebook updates, so codes follow the cells
            their rule gives them; `None` learns the codebook by gradient (codebook loss).
        usage_decay (`float`, *optional*, defaults to 0.99): Decay of the running per-code usage statistics.
        dead_code_threshold (`float`, *optional*, defaults to 0.03): A code whose running usage share falls below
            `dead_code_threshold / codebook_size` is dead and may be restarted; 0 disables restarts.
        assignment_chunk_size (`int`, *optional*, defaults to 16777216): Most entries of the N x K distance matrix
            held at once (chunks of latents are scored in turn).
        initializer_range (`float`, *optional*, defaults to 0.02): Kept for transformers' conventions and unused:
            the layers start from PyTorch's default initialisation, which VQGAN-style conv stacks are tuned for.
        quantizer_format (`int`, *optional*): Version of the quantizer's rules and state this config was saved with;
            defaults to the current one (3), or to 1 for configs that carry the first router's fields.
    """

    model_type = "cdb_vq"

    def __init__(
        self,
        num_channels: int = 3,
        resolution: int = 256,
        base_channels: int = 128,
        channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        use_mid_attention: bool = True,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        latent_dim: int = 256,
        codebook_size: int = 16384,
        codebook_dim: int = 32,
        l2_normalize_codes: bool = False,
        assignment: str = "cdb",
        sinkhorn_epsilon: float = 10.0,
        sinkhorn_iterations: int = 5,
        router_dim: int = 64,
        router_candidates: int = 8,
        router_logit_bound: float | None = 0.5,
        router_semantic_scale: float = 5.0,
        potential_step: float = 0.02,
        potential_bound: float = 1.0,
        semantic_dim: int = 512,
        num_prototypes: int = 1000,
        prototype_labels: list[str] | None = None,
        retie_prototypes: bool = True,
        code_roles: dict[str, list[int]] | None = None,
        role_hidden_dim: int = 32,
        role_supervision_weight: float = 0.0,
        role_prior_scale: float = 0.35,
        role_texture_threshold: float = 0.02,
        role_colour_threshold: float = 0.4,
        restoration_degradation: str | None = None,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        balance_weight: float = 0.0,
        semantic_distillation_weight: float = 1.0,
        token_alignment_weight: float = 0.5,
        code_alignment_weight: float = 0.5,
        ema_decay: float | None = 0.8,
        usage_decay: float = 0.99,
        dead_code_threshold: float = 0.03,
        assignment_chunk_size: int = 2**24,
        initializer_range: float = 0.02,
        quantizer_format: int | None = None,
        **kwargs,
    ):
        if quantizer_format is None:
            # Configs saved before this field existed name the first router's fields.
            quantizer_format = 1 if any(name in kwargs for name in FORMAT_1_FIELDS) else QUANTIZER_FORMAT
        self.num_channels = num_channels
        self.resolution = resolution
        self.base_channels = base_channels
        self.channel_multipliers = list(channel_multipliers) if _is_range(channel_multipliers) else channel_multipliers
        self.num_res_blocks = num_res_blocks
        self.use_mid_attention = use_mid_attention
        self.norm_num_groups = norm_num_groups
        self.dropout = dropout
        self.latent_dim = latent_dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_normalize_codes = l2_normalize_codes
        self.assignment = assignment
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.router_dim = router_dim
        self.router_candidates = router_candidates
        self.router_logit_bound = router_logit_bound
        self.router_semantic_scale = router_semantic_scale
        self.potential_step = potential_step
        self.potential_bound = potential_bound
        self.semantic_dim = semantic_dim
        self.num_prototypes = num_prototypes
        # A lone string stays a string (and is refused below) instead of becoming a list of its characters.
        listable = isinstance(prototype_labels, Iterable) and not isinstance(prototype_labels, str)
        self.prototype_labels = list(prototype_labels) if listable else prototype_labels
        self.retie_prototypes = retie_prototypes
        # Ranges as lists (JSON's shape); anything but a mapping of ranges is kept as given, for validate_fields to name.
        roles_are_ranges = isinstance(code_roles, Mapping) and all(_is_range(b) for b in code_roles.values())
        if roles_are_ranges:
            code_roles = {name: list(bounds) for name, bounds in code_roles.items()}
        # Any empty container is "no roles"; 0 or False is named below (it silently meant no roles).
        empty = isinstance(code_roles, (Mapping, list, tuple, str)) and len(code_roles) == 0
        self.code_roles = None if code_roles is None or empty else code_roles
        self.role_hidden_dim = role_hidden_dim
        self.role_supervision_weight = role_supervision_weight
        self.role_prior_scale = role_prior_scale
        self.role_texture_threshold = role_texture_threshold
        self.role_colour_threshold = role_colour_threshold
        self.restoration_degradation = restoration_degradation
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.balance_weight = balance_weight
        self.semantic_distillation_weight = semantic_distillation_weight
        self.token_alignment_weight = token_alignment_weight
        self.code_alignment_weight = code_alignment_weight
        self.ema_decay = ema_decay
        self.usage_decay = usage_decay
        self.dead_code_threshold = dead_code_threshold
        self.assignment_chunk_size = assignment_chunk_size
        self.initializer_range = initializer_range
        self.quantizer_format = quantizer_format
        refuse_misspelled_fields(kwargs)
        refuse_unknown_dtype(kwargs)
        super().__init__(**kwargs)
        self.validate_fields()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> CDBVQConfig | tuple[CDBVQConfig, dict]:
        """`PretrainedConfig.from_pretrained`, except that a local folder without `config.json` is an error (transformers
        would return the default config, and a model loaded from such a folder fails far from the cause)."""
        name, expanded = pretrained_model_name_or_path, expand_home(pretrained_model_name_or_path)
        folder = Path(expanded)
        if folder.is_dir() and not (folder / kwargs.get("subfolder", "") / CONFIG_NAME).is_file():
            raise OSError(f"{folder} has no {CONFIG_NAME}: it is not a saved cdb-vq model (save_pretrained writes one).")
        if not folder.exists() and looks_like_path(str(name)):  # not "Repo id must be ..."
            raise OSError(f"{name}: no such folder (and, as a path, no Hub id).")
        return super().from_pretrained(expanded, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> CDBVQConfig | tuple[CDBVQConfig, dict]:
        """`PretrainedConfig.from_dict`, except that keyword overrides are checked as the constructor checks its
        arguments: transformers sets them after the constructor's checks, so `assignment="bogus"` passed, and a
        misspelled `asignment="nearest"` was dropped without a word."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        # NumPy values made Python's first: transformers writes the config as JSON (a log line) before any check.
        kwargs = {key: plain_value(value) for key, value in kwargs.items()}
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        refuse_misspelled_fields(unused)
        config.validate_fields()
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # A config.json of `null`, a list or a string failed inside transformers with a TypeError naming no file.
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{json_file} holds {json_kind(config_dict)}, not an object of config fields: it is not a "
                             f"cdb-vq config.")  # fmt: skip
        return config_dict

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """`PretrainedConfig.save_pretrained`, after the constructor's checks: a field edited since
        (`config.codebook_size = -3`) would otherwise be written, and refused only when the folder is next loaded."""
        self.validate_fields()
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def downsampling_factor(self) -> int:
        """Ratio of image side to token-grid side."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def role_names(self) -> list[str]:
        """Names of the code roles, in codebook order (empty when roles are off)."""
        return sorted(self.code_roles, key=lambda name: self.code_roles[name][0]) if self.code_roles else []

    def validate_fields(self) -> None:
        """Raise `ValueError` naming the first field whose value is not allowed (NumPy numbers, such as a size read
        from an array, are first made Python's, which JSON can write)."""
        for name in field_names():
            if hasattr(self, name):
                setattr(self, name, plain_value(getattr(self, name)))
        self._validate_types()
        if self.assignment not in ASSIGNMENT_RULES:
            raise ValueError(f"assignment must be one of {list(ASSIGNMENT_RULES)}, got {self.assignment!r}.")
        positive = (
            "num_channels", "resolution", "base_channels", "num_res_blocks", "norm_num_groups", "latent_dim",
            "codebook_size", "codebook_dim", "sinkhorn_iterations", "router_dim", "router_candidates", "semantic_dim",
            "num_prototypes", "role_hidden_dim", "assignment_chunk_size",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not _is_range(self.channel_multipliers) or not self.channel_multipliers or any(
            not _is_int(m) or m < 1 for m in self.channel_multipliers
        ):
            raise ValueError(f"channel_multipliers must be a non-empty list of positive integers, got {self.channel_multipliers!r}.")
        for multiplier in self.channel_multipliers:
            if (self.base_channels * multiplier) % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups ({self.norm_num_groups}) must divide every level width "
                    f"base_channels * channel_multipliers, but not {self.base_channels * multiplier}."
                )
        if self.resolution % self.downsampling_factor:
            raise ValueError(f"resolution ({self.resolution}) must be divisible by the downsampling factor ({self.downsampling_factor}).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {self.ema_decay!r}.")
        if not 0.0 < self.usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in (0, 1), got {self.usage_decay!r}.")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold!r}.")
        if self.router_logit_bound is not None and self.router_logit_bound <= 0:
            raise ValueError(f"router_logit_bound must be None or > 0, got {self.router_logit_bound!r}.")
        if self.sinkhorn_epsilon <= 0:
            raise ValueError(f"sinkhorn_epsilon must be > 0, got {self.sinkhorn_epsilon!r}.")
        if self.potential_step < 0 or self.potential_bound < 0:
            raise ValueError(
                f"potential_step and potential_bound must be >= 0, got {self.potential_step!r} and {self.potential_bound!r}."
            )
        for name in ("commitment_weight", "codebook_weight", "balance_weight", "router_semantic_scale",
                     "semantic_distillation_weight", "token_alignment_weight", "code_alignment_weight",
                     "role_supervision_weight", "role_prior_scale", "role_texture_threshold", "role_colour_threshold"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.prototype_labels is not None and len(self.prototype_labels) != self.num_prototypes:
            raise ValueError(
                f"prototype_labels must have num_prototypes ({self.num_prototypes}) entries, got {len(self.prototype_labels)}."
            )
        if self.code_roles is not None:  # 0 or False too: named, never taken for "no roles"
            self._validate_code_roles()
        if self.role_supervision_weight > 0:
            self._validate_role_supervision()
        if self.restoration_degradation is not None and (
            not isinstance(self.restoration_degradation, str) or not self.restoration_degradation.strip()
        ):
            raise ValueError(f"restoration_degradation must be None or a degradation spec, got {self.restoration_degradation!r}.")

    def _validate_types(self) -> None:
        for name in REAL_FIELDS + OPTIONAL_REAL_FIELDS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_REAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                optional = "None or " if name in OPTIONAL_REAL_FIELDS else ""
                raise ValueError(f"{name} must be {optional}a finite number, got {value!r}.")
            if abs(value) > FLOAT32_MAX:  # the model computes in float32: 1e300 failed in torch's init, or read as NaN
                raise ValueError(f"{name} is too large for float32 (at most {FLOAT32_MAX:.3g}), got {value!r}.")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not _is_int(self.quantizer_format) or self.quantizer_format < 1:  # 1 is the first format
            raise ValueError(f"quantizer_format must be an integer of at least 1, got {self.quantizer_format!r}.")
        if self.prototype_labels is not None and (
            not isinstance(self.prototype_labels, list) or not all(isinstance(label, str) for label in self.prototype_labels)
        ):
            raise ValueError(f"prototype_labels must be None or a list of strings, got {self.prototype_labels!r}.")

    def _validate_role_supervision(self) -> None:
        names = set(self.code_roles or ())
        if self.assignment != "cdb" or "structure" not in names or not names <= set(SUPERVISED_ROLES):
            raise ValueError(
                f"role_supervision_weight > 0 needs assignment='cdb' and code_roles named from {list(SUPERVISED_ROLES)} "
                f"including 'structure' (e.g. cdb_tokenizer.tools.roles.three_role_ranges(K)); got assignment "
                f"{self.assignment!r} and roles {sorted(names)}."
            )

    def _validate_code_roles(self) -> None:
        if not isinstance(self.code_roles, Mapping) or not all(
            isinstance(name, str) and _is_range(bounds) and bounds for name, bounds in self.code_roles.items()
        ):
            raise ValueError(
                f'code_roles must be None or a mapping of role names to [start, end) ranges, e.g. {{"structure": [0, 512], '
                f'"texture": [512, 1024]}}, got {self.code_roles!r}.'
            )
        position = 0
        for name in self.role_names:
            bounds = self.code_roles[name]
            if len(bounds) != 2 or not all(_is_int(bound) for bound in bounds) or bounds[0] != position or bounds[1] <= bounds[0]:
                raise ValueError(
                    f"code_roles must be [start, end) ranges that tile the codebook without gaps; "
                    f"role {name!r} has {bounds}, expected it to start at {position}."
                )
            position = bounds[1]
        if position != self.codebook_size:
            raise ValueError(f"code_roles must add up to codebook_size ({self.codebook_size}), but they cover {position} codes.")


def expand_home(name_or_path: str | os.PathLike | None) -> str | os.PathLike | None:
    """`~/model` as the path it names (transformers does not expand `~`, and takes it for a Hub id); else as given."""
    return os.path.expanduser(name_or_path) if str(name_or_path).startswith("~") else name_or_path


def looks_like_path(name: str) -> bool:
    """Names no Hub id can have: relative or absolute paths, home folders, a trailing slash, backslashes."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or "\\" in name or name.count("/") > 1


@functools.cache
def field_names() -> tuple[str, ...]:
    """The config's fields: the constructor's named arguments."""
    return tuple(name for name in inspect.signature(CDBVQConfig.__init__).parameters if name not in ("self", "kwargs"))


# Names other image models and tokenizers give these fields (ViT's image_size, a language model's vocab_size, ...).
FIELD_ALIASES = {"image_size": "resolution", "vocab_size": "codebook_size", "num_codes": "codebook_size",
                 "num_embeddings": "codebook_size", "n_embed": "codebook_size", "in_channels": "num_channels"}  # fmt: skip
# The largest float32: the model's numbers are float32, whatever Python holds.
FLOAT32_MAX = 3.4028234663852886e38


def refuse_misspelled_fields(kwargs: dict) -> None:
    """Refuse a keyword that is not a field but reads like one (`asignment`, `codebok_size`): it would be stored as a
    stray attribute while the field keeps its default, building another model without a word. Other unknown keys
    pass, as in transformers (metadata that a saved config.json carries)."""
    fields = field_names()
    for key in kwargs:
        if key in FIELD_ALIASES:  # other models' names for a field: stored aside, the field kept its default
            raise ValueError(f"CDBVQConfig has no field {key!r}; did you mean {FIELD_ALIASES[key]!r}?")
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if close and key not in FORMAT_1_FIELDS and not hasattr(PretrainedConfig, key):
            raise ValueError(f"CDBVQConfig has no field {key!r}; did you mean {close[0]!r}?")


def refuse_unknown_dtype(kwargs: dict) -> None:
    """Refuse a `dtype` (or `torch_dtype`) string that names no torch dtype: transformers looks it up with
    `getattr(torch, ...)`, and `"float17"` failed with "module 'torch' has no attribute 'float17'"."""
    import torch  # here: a config is read without building a model (as transformers' configs are)

    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key)
        if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
            raise ValueError(f"{key} must name a torch dtype such as 'float32', 'bfloat16' or 'float16', got "
                             f"{value!r}.")  # fmt: skip


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words ("null", "an array", ...), for messages about a file's content."""
    kinds = {type(None): "null", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}  # fmt: skip
    return kinds.get(type(value), "an object")


def plain_value(value: object) -> object:
    """A number given as a NumPy array, a tensor, a NumPy scalar, or a list, tuple or dict of those, as the plain
    number, list or dict of numbers it holds (what a JSON config can store); anything else as it is."""
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    return value.tolist() if hasattr(value, "tolist") else value


def _is_range(value) -> bool:
    """A [start, end) pair as a config may hold it: a list, a tuple or another sequence, never a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def as_int(value) -> int | None:
    """`value` as an int when it is any integer (Python's, NumPy's, a one-element integer tensor), else None (a
    float, a string, or a bool, which Python counts as an integer)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_int(value) -> bool:
    return as_int(value) is not None


__all__ = ["CDBVQConfig"]
