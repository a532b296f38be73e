"""CDB-VQ: a VQGAN-style image tokenizer whose codes are picked by a learned, CLIP-guided Codebook Decision Block.

This file ships as Hugging Face Hub remote code: it imports only torch, transformers and its flat siblings.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_cdb_vq import CDBVQConfig, as_int, expand_home, refuse_misspelled_fields
from .quantization_cdb_vq import (
    SIGNAL_NAMES,
    CDBVQQuantizer,
    CDBVQRouter,
    CodeStatistics,
    image_signal_features,
    require_float_tensor,
)


logger = logging.get_logger(__name__)
# Held while `get_image_tokens` or `role_map` switches a model in training mode to eval mode and back.
_MODE_SWITCH = threading.RLock()


@dataclass
class CDBVQEncoderOutput(ModelOutput):
    r"""
    Output of [`CDBVQModel.encode`].

    Args:
        image_tokens (`torch.LongTensor` of shape `(batch_size, height, width)`): Code index of each latent cell.
        quantized (`torch.FloatTensor` of shape `(batch_size, codebook_dim, height, width)`): The chosen codes
            (straight-through: gradients reach the encoder).
        latents (`torch.FloatTensor` of shape `(batch_size, codebook_dim, height, width)`): Pre-quantization latents.
        semantic_features (`torch.FloatTensor` of shape `(batch_size, semantic_dim, height, width)`, *optional*):
            The semantic features the router read (predicted by the semantic head, or passed in).
        codebook_loss, commitment_loss, balance_loss, role_supervision_loss (`torch.FloatTensor`, *optional*):
            Quantizer loss terms (unweighted); `None` where the rule or mode has no such term.
        semantic_distillation_loss, token_alignment_loss, code_alignment_loss (`torch.FloatTensor`, *optional*):
            Semantic loss terms (unweighted), computed when `teacher_features` are given.
        vq_loss (`torch.FloatTensor`): Weighted sum of all the terms above (weights from the config).
        utilization (`torch.FloatTensor`): Share of the codebook used by this batch.
        perplexity (`torch.FloatTensor`): Perplexity of this batch's code histogram.
        signal_features (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*): Per-cell image
            statistics (low-pass, Laplacian, chroma) the role prior read; computed with code roles, and in training.
    """

    image_tokens: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    semantic_features: torch.FloatTensor | None = None
    vq_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    role_supervision_loss: torch.FloatTensor | None = None
    semantic_distillation_loss: torch.FloatTensor | None = None
    token_alignment_loss: torch.FloatTensor | None = None
    code_alignment_loss: torch.FloatTensor | None = None
    utilization: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    signal_features: torch.FloatTensor | None = None


@dataclass
class CDBVQModelOutput(CDBVQEncoderOutput):
    r"""
    Output of [`CDBVQModel.forward`]: everything of [`CDBVQEncoderOutput`] plus the reconstruction.

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): Decoded images,
            in the image processor's normalised range ([-1, 1]).
    """

    reconstruction: torch.FloatTensor | None = None


# The one list of the quantizer and semantic loss terms: each output field and the config field that weights it in
# `vq_loss`. Training logs each term unweighted under its field name without "_loss" (`codebook`, `commitment`, ...).
LOSS_WEIGHTS = {
    "codebook_loss": "codebook_weight",
    "commitment_loss": "commitment_weight",
    "balance_loss": "balance_weight",
    "role_supervision_loss": "role_supervision_weight",
    "semantic_distillation_loss": "semantic_distillation_weight",
    "token_alignment_loss": "token_alignment_weight",
    "code_alignment_loss": "code_alignment_weight",
}


def weighted_vq_loss(config: CDBVQConfig, terms: dict[str, torch.Tensor | None]) -> torch.Tensor | float:
    """The sum of `terms` (keys of `LOSS_WEIGHTS`) weighted by their config fields; terms that are None are skipped."""
    return sum(getattr(config, LOSS_WEIGHTS[name]) * value for name, value in terms.items() if value is not None)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder blocks (VQGAN layout)
# ----------------------------------------------------------------------------------------------------------------


class CDBVQResnetBlock(GradientCheckpointingLayer):
    """Two GroupNorm-SiLU-conv layers with dropout and a residual connection (a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(F.silu(self.norm2(hidden_states))))
        return residual + hidden_states


class CDBVQAttentionBlock(GradientCheckpointingLayer):
    """Single-head self-attention over the spatial positions."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        query, key, value = self.qkv(self.norm(hidden_states)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None])[:, 0]
        attended = attended.transpose(1, 2).reshape(batch, channels, height, width)
        return hidden_states + self.proj_out(attended)


class CDBVQDownsample(nn.Module):
    """Halves the spatial size with a stride-2 3x3 convolution (padded on the right and bottom, as in VQGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding keeps an exact factor of two (as in taming-transformers).
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1)))


class CDBVQUpsample(nn.Module):
    """Doubles the spatial size: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class CDBVQMiddle(nn.Module):
    """The bottleneck: a residual block, self-attention (`use_mid_attention`), and another residual block."""

    def __init__(self, channels: int, config: CDBVQConfig):
        super().__init__()
        groups, dropout = config.norm_num_groups, config.dropout
        self.block_1 = CDBVQResnetBlock(channels, channels, groups, dropout)
        self.attention = CDBVQAttentionBlock(channels, groups) if config.use_mid_attention else nn.Identity()
        self.block_2 = CDBVQResnetBlock(channels, channels, groups, dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attention(self.block_1(hidden_states)))


class CDBVQEncoder(nn.Module):
    """Pixels (B, C, H, W) -> latents (B, latent_dim, H / f, W / f), f = `config.downsampling_factor`."""

    def __init__(self, config: CDBVQConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        groups, dropout = config.norm_num_groups, config.dropout
        self.conv_in = nn.Conv2d(config.num_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        channels = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(CDBVQResnetBlock(channels, width, groups, dropout))
                channels = width
            stage = nn.Module()
            stage.blocks = blocks
            stage.downsample = CDBVQDownsample(channels) if level < len(widths) - 1 else nn.Identity()
            self.down.append(stage)
        self.middle = CDBVQMiddle(channels, config)
        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, config.latent_dim, 3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for stage in self.down:
            for block in stage.blocks:
                hidden_states = block(hidden_states)
            hidden_states = stage.downsample(hidden_states)
        hidden_states = self.middle(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class CDBVQDecoder(nn.Module):
    """Latents (B, latent_dim, h, w) -> pixels (B, C, h * f, w * f), the encoder's mirror."""

    def __init__(self, config: CDBVQConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        groups, dropout = config.norm_num_groups, config.dropout
        channels = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_dim, channels, 3, padding=1)
        self.middle = CDBVQMiddle(channels, config)
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(CDBVQResnetBlock(channels, width, groups, dropout))
                channels = width
            stage = nn.Module()
            stage.blocks = blocks
            stage.upsample = CDBVQUpsample(channels) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, config.num_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.middle(self.conv_in(latents))
        for stage in self.up:
            for block in stage.blocks:
                hidden_states = block(hidden_states)
            hidden_states = stage.upsample(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class CDBVQSemanticHead(nn.Module):
    """Predicts the teacher's (CLIP) patch features from the encoder output, so inference needs no CLIP."""

    def __init__(self, config: CDBVQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(config.latent_dim, config.semantic_dim, 3, padding=1)
        self.conv_out = nn.Conv2d(config.semantic_dim, config.semantic_dim, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.gelu(self.conv_in(hidden_states)))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def _single_grid_hint(image_tokens: torch.Tensor, grid_height: int, grid_width: int) -> str:
    """The end of a refusal of (batch, h * w) tokens that are one (h, w) grid without its batch dimension."""
    if tuple(image_tokens.shape) != (grid_height, grid_width):
        return ""
    return f" (a single {grid_height}x{grid_width} grid needs a batch dimension: image_tokens[None])"


def _pixel_count(name: str, value) -> int | None:
    """`value` (None, or an image side) as a positive int."""
    if value is None:
        return None
    count = as_int(value)
    if count is None or count < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}.")
    return count


class CDBVQPreTrainedModel(PreTrainedModel):
    """Weight initialisation, loading and saving conventions shared by the cdb-vq models (`CDBVQModel`)."""

    config_class = CDBVQConfig
    config: CDBVQConfig
    base_model_prefix = "cdb_vq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CDBVQResnetBlock", "CDBVQAttentionBlock"]
    # The running teacher means behind the prototype ties only serve further training: training checkpoints keep
    # them (they hold the whole state dict), a model saved for use does not (K x semantic_dim, 32 MiB at the default
    # config). A model trained on from such a folder gathers them afresh; its ties (`code_to_prototype`) are kept.
    _keys_to_ignore_on_save = ["quantizer.teacher_statistics.sums", "quantizer.teacher_statistics.counts"]
    _keys_to_ignore_on_load_missing = [r"quantizer\.teacher_statistics\."]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, **kwargs
    ) -> CDBVQPreTrainedModel | tuple[CDBVQPreTrainedModel, dict]:
        """`PreTrainedModel.from_pretrained`, then checks that every parameter was in the weights (see
        `refuse_missing_parameters`) and that the code roles saved with the weights are the config's (an edited
        config.json, or `code_roles=` passed here, labelled codes with roles they were not trained for)."""
        pretrained_model_name_or_path = expand_home(pretrained_model_name_or_path)
        if pretrained_model_name_or_path is not None and os.path.isfile(pretrained_model_name_or_path):  # as weights
            raise OSError(f"{pretrained_model_name_or_path} is a file: give the folder that holds config.json and "
                          f"model.safetensors (what save_pretrained writes).")  # fmt: skip
        with_info = kwargs.pop("output_loading_info", False)
        report = []
        try:
            with held_load_report(report):
                model, loading_info = super().from_pretrained(
                    pretrained_model_name_or_path, *args, **kwargs, output_loading_info=True
                )
        except Exception as error:
            for record in report:  # the table transformers' error (and the one below) points at
                logging.get_logger(record.name).handle(record)
            if not isinstance(error, RuntimeError) or "ignore_mismatched_sizes" not in str(error):
                raise
            # transformers' message only points at its load report; say what usually causes it.
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not fit the "
                f"config: a size field (codebook_size, codebook_dim, latent_dim, semantic_dim, num_prototypes, "
                f"channel_multipliers, ...) differs from the one they were trained with, in config.json or passed "
                f"here; the load report above names the tensors."
            ) from None
        refuse_missing_parameters(model, loading_info, pretrained_model_name_or_path)
        log_loading_differences(loading_info, pretrained_model_name_or_path)
        quantizer = getattr(model, "quantizer", None)
        if quantizer is not None:
            quantizer.check_code_roles()
        return (model, loading_info) if with_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # PyTorch's default init, which VQGAN-style conv stacks are tuned for.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Placeholder scale only: training k-means-initialises the codebook from latents before its first step.
            init.normal_(module.weight, std=1.0 / math.sqrt(module.weight.shape[1]))
        elif isinstance(module, CDBVQRouter):
            # Tiny keys: the router starts as the distance term alone (nearest neighbour) and learns from there.
            init.normal_(module.code_keys, std=1e-3)
            # A head no teacher distils gives cosines that are noise: its term starts off (and may still be learned).
            distilled = self.config.semantic_distillation_weight > 0
            init.constant_(module.semantic_scale, self.config.router_semantic_scale if distilled else 0.0)
            if module.role_head is not None:
                init.zeros_(module.role_head[-1].weight)
                init.zeros_(module.role_head[-1].bias)
        if isinstance(module, (CDBVQQuantizer, CDBVQRouter, CodeStatistics)):
            # Through `init.copy_`, which leaves alone what a checkpoint loaded: a buffer missing from an older or
            # partial checkpoint gets its fresh value, and only it (never uninitialised memory, never a reset of the rest).
            for name, value in module.fresh_state().items():
                init.copy_(getattr(module, name), value)


class CDBVQModel(CDBVQPreTrainedModel):
    r"""
    The CDB-VQ image tokenizer: encoder, codebook with its assignment rule (nearest / Sinkhorn / CDB router), and
    decoder. `get_image_tokens` turns images into raster-order token ids for a transformer prior, and
    `decode_image_tokens` turns ids back into images.

    Example:

    ```python
    >>> from transformers import AutoImageProcessor, AutoModel
    >>> model = AutoModel.from_pretrained("org/cdb-vq", trust_remote_code=True)
    >>> processor = AutoImageProcessor.from_pretrained("org/cdb-vq", trust_remote_code=True)
    >>> pixel_values = processor(images, return_tensors="pt").pixel_values
    >>> tokens = model.get_image_tokens(pixel_values)          # (batch, h * w)
    >>> images = processor.postprocess(model.decode_image_tokens(tokens)).pixel_values
    ```
    """

    def __init__(self, config: CDBVQConfig, **kwargs):
        if not isinstance(config, PretrainedConfig) or config.model_type != CDBVQConfig.model_type:
            # `CDBVQModel("outputs/demo")` or a dict failed with "'str' object has no attribute 'validate_fields'".
            raise TypeError(f"CDBVQModel takes a CDBVQConfig, got {type(config).__name__}; a saved model loads with "
                            f"CDBVQModel.from_pretrained(folder).")  # fmt: skip
        # `from_pretrained(folder, asignment=...)`: transformers passes a keyword that is no config field on to here.
        if kwargs:
            refuse_misspelled_fields(kwargs)  # "did you mean 'assignment'?"
            raise TypeError(f"CDBVQModel got keyword arguments that are neither config fields nor its own: {sorted(kwargs)}.")
        # Again here: `from_pretrained(..., assignment="...")` and `config.update` set fields after the config's own
        # check, and a typo would otherwise build another model without a word.
        config.validate_fields()
        super().__init__(config)
        self.encoder = CDBVQEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_dim, config.codebook_dim, 1)
        self.quantizer = CDBVQQuantizer(config)
        self.semantic_head = CDBVQSemanticHead(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.latent_dim, 1)
        self.decoder = CDBVQDecoder(config)
        self.post_init()

    # ------------------------------------------------------------------ input checks
    # Pixel values are expected in [-1, 1]; this much overshoot (resampling ringing, rounding) is still accepted.
    _PIXEL_RANGE_TOLERANCE = 0.5
    # Pixel values all in [0, 1] whose darkest is at most this (13 of 255 on ToTensor's scale) are taken for that scale.
    _ZERO_ONE_DARKEST = 0.05

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Check `pixel_values` and return them in the model's dtype (float64/half inputs are cast)."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor (use CDBVQImageProcessor to turn images into one), got {type(pixel_values).__name__}."
            )
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must have shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        if pixel_values.shape[1] != self.config.num_channels:
            if pixel_values.shape[-1] == self.config.num_channels:
                raise ValueError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}, channels last; the model takes (batch, "
                    f"channels, height, width): use pixel_values.permute(0, 3, 1, 2), or CDBVQImageProcessor."
                )
            fix = "convert the images to RGB, e.g. with CDBVQImageProcessor" if self.config.num_channels == 3 else "give images of that many channels"
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects {self.config.num_channels} "
                f"(config.num_channels); {fix}."
            )
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"pixel_values is empty (shape {tuple(pixel_values.shape)}): pass at least one image.")
        height, width = pixel_values.shape[-2:]
        factor = self.config.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor {factor}; "
                f"resize or crop to a multiple of {factor} (the image processor saved with the model does, at its "
                f"default size)."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor in [-1, 1], got dtype {pixel_values.dtype}; "
                f"prepare images with CDBVQImageProcessor (or the model's AutoImageProcessor)."
            )
        self._check_device(pixel_values, "pixel_values")
        bounds = [*torch.aminmax(pixel_values.detach())]
        if self.quantizer.router is not None:  # in the same sync: a corrupt tie would index past the prototypes
            bounds += [*torch.aminmax(self.quantizer.code_to_prototype)]
        low, high, *ties = torch.stack([bound.float() for bound in bounds]).tolist()  # one device sync
        if ties and not 0 <= ties[0] <= ties[1] < self.config.num_prototypes:
            raise ValueError(
                f"quantizer.code_to_prototype ties codes to prototype ids {int(ties[0])}..{int(ties[1])}, outside [0, "
                f"{self.config.num_prototypes}): the weights are corrupt."
            )
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("pixel_values contains NaN or infinite values.")
        limit = 1.0 + self._PIXEL_RANGE_TOLERANCE
        if low < -limit or high > limit:
            raise ValueError(
                f"pixel_values range from {low:.4g} to {high:.4g}, far outside the model's [-1, 1] (raw [0, 255] or "
                f"otherwise unnormalised pixels?); prepare images with CDBVQImageProcessor (or the model's "
                f"AutoImageProcessor), which rescales and normalises them."
            )
        # Inside the tolerance, but torchvision's ToTensor scale: a washed-out image. A photo on that scale has dark
        # pixels near 0; a bright image in [-1, 1] (snow, a light card) lies in [0, 1] too, but away from 0, unless
        # its darkest pixel is mid-grey (then the message says to ignore it).
        if 0.0 <= low <= self._ZERO_ONE_DARKEST and high <= 1.0:
            logger.warning_once(
                "pixel_values all lie in [0, 1], but the model takes [-1, 1] (images scaled to [0, 1], e.g. by "
                "torchvision's ToTensor, encode washed out); prepare images with CDBVQImageProcessor. (A batch of "
                "only bright images in [-1, 1] looks the same: then ignore this.)"
            )
        return self._in_model_dtype(pixel_values)

    def _in_model_dtype(self, values: torch.Tensor) -> torch.Tensor:
        """float64 or half inputs on a float32 model, and the reverse, cast to its dtype. Autocast casts the others
        itself, but never float64 ("Input type (double) and bias type (c10::BFloat16) should be the same")."""
        dtype = self.quant_conv.weight.dtype
        autocast = torch.is_autocast_enabled(values.device.type)
        if values.dtype != dtype and (values.dtype == torch.float64 or not autocast):
            return values.to(dtype)
        return values

    # Integer dtypes that can hold any code id; narrower ones (uint8, int16) wrap ids of larger codebooks.
    _TOKEN_DTYPES = (torch.int32, torch.int64)

    def _check_image_tokens(self, image_tokens: torch.Tensor) -> None:
        if not isinstance(image_tokens, torch.Tensor):
            raise TypeError(f"image_tokens must be a torch.Tensor of integer code ids, got {type(image_tokens).__name__}.")
        if image_tokens.dtype not in self._TOKEN_DTYPES:
            raise TypeError(
                f"image_tokens must be an integer tensor of code ids (torch.int64 or torch.int32), got dtype "
                f"{image_tokens.dtype}; convert ids you trust with .long() (bool, float and narrow integer tokens "
                f"are refused: they are not, or may not hold, code ids)."
            )
        if image_tokens.numel() == 0:
            raise ValueError(f"image_tokens is empty (shape {tuple(image_tokens.shape)}): there is nothing to decode.")
        self._check_device(image_tokens, "image_tokens")

    def _check_token_range_and_codebook(self, image_tokens: torch.Tensor) -> None:
        """Token ids within the codebook, and a codebook without NaN/inf: one device sync for both (float64 holds
        any code id exactly; the codebook's sum is NaN/inf if any code is)."""
        low, high, total = torch.stack(
            [*(bound.double() for bound in torch.aminmax(image_tokens)), self._codebook_sum().double()]
        ).tolist()
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(
                f"image_tokens must be code ids in [0, {self.config.codebook_size}), got values in "
                f"[{int(low)}, {int(high)}]; if they come from a prior, remove its "
                f"special-token offset first."
            )
        if not math.isfinite(total):
            self._check_codebook()

    def _check_quantization(
        self, latents: torch.Tensor, commitment_loss: torch.Tensor, router_features: torch.Tensor | None = None
    ) -> None:
        """Refuse NaN/inf latents, codes or router features: argmin (or the router's argmax) over NaN scores silently
        gives arbitrary ids.

        One scalar, one sync: `commitment_loss` (the mean squared distance of the latents to their chosen codes) is
        NaN for NaN latents or chosen codes, the sum of the codebook catches a NaN/inf code no latent chose (the
        `cdb` router scores an infinite code -inf, so it is never chosen, yet the model is corrupt), and that of the
        router's semantic features a corrupt semantic head (`semantic_features` passed in are checked on the way in).
        The `cdb` router's own weights and state are summed in too: NaN there silently degrades every token to one of
        its candidates."""
        total = commitment_loss + self._codebook_sum()
        if router_features is not None:
            total = total + router_features.detach().sum(dtype=torch.float32)
        router_total = self._router_sum()
        if router_total is not None:
            total = total + router_total
        if bool(torch.isfinite(total)):
            return
        if not bool(torch.isfinite(latents).all()):
            raise ValueError(
                "the encoder produced NaN or infinite latents from finite pixel values: the encoder weights are "
                "corrupt (NaN/inf) or training diverged."
            )
        self._check_codebook()
        if router_features is not None and not bool(torch.isfinite(router_features).all()):
            raise ValueError(
                "the semantic head produced NaN or infinite features for the router: the semantic head's weights are "
                "corrupt (NaN/inf) or training diverged."
            )
        if router_total is not None and not bool(torch.isfinite(router_total)):
            raise ValueError(
                "the cdb router's weights or state (query, code keys, potentials, temperature, role head) hold NaN or "
                "infinite values: they are corrupt or training diverged."
            )
        raise ValueError(
            f"the latents reach {latents.abs().max().item():.3g}, so large that their squared distances to the codes "
            f"overflow: the encoder weights are corrupt or training diverged."
        )

    def _router_sum(self) -> torch.Tensor | None:
        """The float32 sum of every floating tensor the `cdb` router reads (NaN/inf if any is); None without router."""
        router = self.quantizer.router
        if router is None:
            return None
        tensors = [*router.parameters(), *router.buffers(), self.quantizer.prototypes]
        return torch.stack([tensor.detach().sum(dtype=torch.float32) for tensor in tensors]).sum()

    def _codebook_sum(self) -> torch.Tensor:
        """One reduction, NaN/inf if any code is; in float32, since a healthy float16 codebook can sum past 65,504."""
        return self.quantizer.codebook.weight.detach().sum(dtype=torch.float32)

    def _check_codebook(self) -> None:
        if bool(torch.isfinite(self._codebook_sum())):
            return
        bad = (~torch.isfinite(self.quantizer.codebook.weight.detach()).all(-1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"the codebook holds NaN or infinite values in {len(bad)} of {self.config.codebook_size} codes "
                f"(first: code {bad[0]}): the weights are corrupt or training diverged."
            )

    def token_grid_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Token grid (h, w) of an image of `height` x `width` pixels (default: the configured resolution)."""
        factor = self.config.downsampling_factor
        height = self.config.resolution if height is None else _pixel_count("image height", height)
        width = self.config.resolution if width is None else _pixel_count("image width", width)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not divisible by the downsampling factor {factor}.")
        return height // factor, width // factor

    # ------------------------------------------------------------------ public API
    def encode(
        self,
        pixel_values: torch.Tensor,
        semantic_features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> CDBVQEncoderOutput | tuple:
        r"""
        Encode images into codes.

        In training mode this also updates the quantizer (k-means initialisation, EMA codes, usage, potentials), even
        under `torch.no_grad()`, so the same images can get other tokens on the next call: call `model.eval()` first,
        or use `get_image_tokens`, to tokenize.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): Images in [-1, 1];
                height and width must be multiples of `config.downsampling_factor`.
            semantic_features (`torch.FloatTensor` of shape `(batch_size, semantic_dim, h, w)`, *optional*): Your own
                CLIP patch features on the token grid, read by the `cdb` router instead of the semantic head's.
            teacher_features (`torch.FloatTensor` of shape `(batch_size, semantic_dim, h, w)`, *optional*): Teacher
                patch features for the semantic losses (training).
            return_dict (`bool`, *optional*): A [`CDBVQEncoderOutput`] or a plain tuple; defaults to
                `config.return_dict` (True), as in transformers (`forward` likewise). As in transformers, the tuple
                leaves out the fields that are None, so positions depend on the assignment rule and the mode: read
                fields by name.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        hidden_states = self.encoder(pixel_values)
        latents = self.quant_conv(hidden_states)
        batch, dim, height, width = latents.shape
        grid = (batch, height, width)

        predicted_features = None
        if self.config.assignment == "cdb" or teacher_features is not None:
            predicted_features = self.semantic_head(hidden_states)
        if semantic_features is not None:
            self._check_feature_grid(semantic_features, "semantic_features", grid)
        router_features = semantic_features if semantic_features is not None else predicted_features
        signal_features = None
        if self.config.code_roles or self.training:  # the role prior; in training also the per-code signal statistics
            signal_features = image_signal_features(pixel_values, self.config.downsampling_factor)

        quantizer_output = self.quantizer(
            flatten_grid(latents),
            semantic_features=flatten_grid(router_features) if router_features is not None else None,
            signal_features=flatten_grid(signal_features) if signal_features is not None else None,
        )
        if not self.training:
            # Only outside training: there a NaN must reach the loss, whose step the training loop skips (rolling
            # the quantizer back) and only stops after several in a row (tools/steps.py, --max_nonfinite_steps).
            self._check_quantization(latents, quantizer_output.commitment_loss, router_features)
        terms = {
            "codebook_loss": quantizer_output.codebook_loss,
            "commitment_loss": quantizer_output.commitment_loss,
            "balance_loss": quantizer_output.balance_loss,
            "role_supervision_loss": quantizer_output.role_supervision_loss,
        }
        if teacher_features is not None:
            self._check_feature_grid(teacher_features, "teacher_features", grid)
            terms.update(
                self.quantizer.semantic_losses(
                    quantizer_output.indices, flatten_grid(predicted_features), flatten_grid(teacher_features)
                )
            )
        vq_loss = weighted_vq_loss(self.config, terms)
        output = CDBVQEncoderOutput(
            image_tokens=quantizer_output.indices.view(grid),
            quantized=quantizer_output.quantized.view(batch, height, width, dim).permute(0, 3, 1, 2),
            latents=latents,
            semantic_features=router_features,
            vq_loss=vq_loss,
            utilization=quantizer_output.utilization,
            perplexity=quantizer_output.perplexity,
            signal_features=signal_features,
            **terms,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict  # transformers' convention
        return output if return_dict else output.to_tuple()

    def decode(self, image_tokens: torch.Tensor) -> torch.FloatTensor:
        """Decode a (batch, h, w) grid of code ids (int64 or int32) into images (batch, num_channels, H, W), in about
        [-1, 1] (not clamped: `CDBVQImageProcessor.postprocess` clamps), with H = h * `config.downsampling_factor`
        and W likewise. Ids outside [0, `config.codebook_size`) or a tensor of another shape raise a `ValueError` that
        names them; for the flat (batch, h * w) ids of `get_image_tokens`, use `decode_image_tokens`."""
        self._check_image_tokens(image_tokens)
        if image_tokens.ndim != 3:
            raise ValueError(f"decode expects image_tokens of shape (batch, h, w), got {tuple(image_tokens.shape)}; use decode_image_tokens for (batch, h * w).")
        self._check_token_range_and_codebook(image_tokens)
        codes = self.quantizer.lookup(image_tokens).permute(0, 3, 1, 2)
        return self._decode_quantized(codes.to(self.post_quant_conv.weight.dtype))

    def decode_latents(self, quantized: torch.FloatTensor) -> torch.FloatTensor:
        """Decode quantized latents (batch, codebook_dim, h, w), e.g. `encode(...).quantized`, into images (cast to
        the model's dtype)."""
        require_float_tensor(quantized, "quantized latents")
        if quantized.ndim != 4 or quantized.shape[1] != self.config.codebook_dim or quantized.numel() == 0:
            raise ValueError(
                f"quantized latents must have shape (batch, codebook_dim={self.config.codebook_dim}, h, w), got "
                f"{tuple(quantized.shape)}."
            )
        self._check_device(quantized, "quantized")
        if not bool(torch.isfinite(quantized).all()):
            raise ValueError("quantized latents contain NaN or infinite values.")
        return self._decode_quantized(self._in_model_dtype(quantized), from_latents=True)

    def _decode_quantized(self, quantized: torch.Tensor, from_latents: bool = False) -> torch.Tensor:
        images = self.decoder(self.post_quant_conv(quantized))
        # Its input is finite (checked codes or latents), so NaN here is the decoder's own. Only outside training:
        # there the loss shows it, and the loop skips the step.
        if not self.training and not bool(torch.isfinite(images).all()):
            largest, codebook_largest = (float(x.detach().abs().max()) for x in (quantized, self.quantizer.codes()))
            if from_latents and largest > 1e3 * codebook_largest:  # the caller's latents, not the weights
                raise ValueError(
                    f"the decoder overflowed to NaN or infinite pixels: the quantized latents reach {largest:.3g}, far "
                    f"beyond the codebook's values (at most {codebook_largest:.3g}); pass latents such as "
                    f"`encode(...).quantized`."
                )
            raise ValueError(
                "the decoder produced NaN or infinite pixels from finite codes: its weights (post_quant_conv, decoder) "
                "are corrupt (NaN/inf), training diverged, or the model's dtype overflowed (float16)."
            )
        return images

    @torch.no_grad()
    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        r"""
        Token ids for a transformer prior: what `encode` picks in eval mode, whatever mode the model is in (so the
        codebook never changes here), deterministic and independent of the rest of the batch.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): Images in [-1, 1],
                as `CDBVQImageProcessor` makes them; height and width must be multiples of
                `config.downsampling_factor`.

        Returns:
            `torch.LongTensor` of shape `(batch_size, h * w)`: code ids in [0, `config.codebook_size`) in raster order
            (row by row), `h = height // downsampling_factor`, `w = width // downsampling_factor`;
            `decode_image_tokens` turns them back into images.

        Raises:
            `ValueError` or `TypeError` naming the problem: a wrong shape or channel count, a size that is not a
            multiple of the downsampling factor, NaN or infinite values, an integer or empty tensor.
        """
        return self._inference_tokens(pixel_values).flatten(1)

    def _inference_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """The (batch, h, w) tokens `encode` picks in eval mode, whatever mode the model is in: in training mode it
        would also update the codebook and usage statistics (and `sinkhorn` would pick by the batch's plan)."""
        with self._in_eval_mode():
            return self.encode(pixel_values, return_dict=True).image_tokens

    @contextmanager
    def _in_eval_mode(self):
        """Runs the block in eval mode and then puts every module back in the mode it was in (a frozen encoder stays
        in eval mode). A model in training mode is switched under `_MODE_SWITCH`, so that two threads never see each
        other's switch: one that read the modes while another had switched them ran in training mode once the other
        switched back (updating the codebook), and left the model in eval mode."""
        with _MODE_SWITCH:
            modes = [(module, module.training) for module in self.modules()]
            if any(training for _, training in modes):
                self.eval()
                try:
                    yield
                finally:
                    for module, training in modes:
                        module.training = training
                return
        yield  # in eval mode already: no switch to guard

    @torch.no_grad()
    def decode_image_tokens(
        self, image_tokens: torch.Tensor, height: int | None = None, width: int | None = None
    ) -> torch.FloatTensor:
        """
        Decode token ids into images in about [-1, 1] (not clamped; `CDBVQImageProcessor.postprocess` clamps), in
        eval mode whatever mode the model is in, so that the same tokens always give the same images.

        Args:
            image_tokens (`torch.Tensor` of shape `(batch_size, h * w)` or `(batch_size, h, w)`): Code ids (int64 or
                int32).
            height, width (`int`, *optional*): Image size in pixels for flat tokens: with neither, the
                `config.resolution` square; with one, a square of that side. Flat tokens whose count does not fit
                that grid are refused (never guessed).
        """
        self._check_image_tokens(image_tokens)
        height, width = _pixel_count("height", height), _pixel_count("width", width)
        if image_tokens.ndim == 3:
            if (height, width) != (None, None):
                size = (height or width, width or height)  # one side alone: a square, as for flat tokens
                if self.token_grid_size(*size) != tuple(image_tokens.shape[1:]):
                    factor = self.config.downsampling_factor
                    raise ValueError(
                        f"a {size[0]}x{size[1]} image disagrees with the {image_tokens.shape[1]}x{image_tokens.shape[2]} "
                        f"token grid ({image_tokens.shape[1] * factor}x{image_tokens.shape[2] * factor} pixels); (batch, "
                        f"h, w) tokens need no size."
                    )
            with self._in_eval_mode():
                return self.decode(image_tokens)
        if image_tokens.ndim != 2:
            raise ValueError(f"image_tokens must have shape (batch, h * w) or (batch, h, w), got {tuple(image_tokens.shape)}.")
        count = image_tokens.shape[1]
        if height is None and width is None:
            grid_height, grid_width = self.token_grid_size()
            if grid_height * grid_width != count:
                # Never guess a grid: a wrong one decodes into a scrambled picture without any error.
                raise ValueError(
                    f"got {count} tokens per image, but the model's default {grid_height}x{grid_width} token grid "
                    f"({self.config.resolution}x{self.config.resolution} pixels) needs {grid_height * grid_width}; "
                    f"pass the image height and width in pixels, or (batch, h, w) tokens"
                    f"{_single_grid_hint(image_tokens, grid_height, grid_width)}."
                )
        else:
            grid_height, grid_width = self.token_grid_size(height or width, width or height)
        if grid_height * grid_width != count:
            raise ValueError(
                f"got {count} tokens per image, but a {grid_height}x{grid_width} token grid needs {grid_height * grid_width}; "
                f"pass the image height and width in pixels{_single_grid_hint(image_tokens, grid_height, grid_width)}."
            )
        with self._in_eval_mode():
            return self.decode(image_tokens.view(-1, grid_height, grid_width))

    def forward(
        self,
        pixel_values: torch.Tensor,
        semantic_features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> CDBVQModelOutput | tuple:
        r"""
        Encode, quantize and decode.

        Returns a [`CDBVQModelOutput`] with the reconstruction, the tokens, every loss term of the quantizer and of the
        semantic head (see [`CDBVQEncoderOutput`]) and usage statistics. Reconstruction losses (L1/L2, perceptual,
        adversarial) are left to the training script. Like `encode`, it updates the quantizer in training mode, and
        its `return_dict=False` tuple leaves out the fields that are None.
        """
        encoded = self.encode(
            pixel_values, semantic_features=semantic_features, teacher_features=teacher_features, return_dict=True
        )
        output = CDBVQModelOutput(**encoded, reconstruction=self._decode_quantized(encoded.quantized))
        return_dict = self.config.return_dict if return_dict is None else return_dict  # transformers' convention
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ semantics
    def set_prototypes(
        self, prototypes: torch.Tensor, labels: list[str] | None = None, code_to_prototype: torch.Tensor | None = None
    ) -> None:
        """Store semantic prototypes (num_prototypes, semantic_dim), their optional text labels, and the code map."""
        if labels is not None:
            if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
                raise TypeError(f"labels must be a list of strings, one per prototype, got {labels!r}.")
            if len(labels) != self.config.num_prototypes:
                raise ValueError(f"got {len(labels)} prototype labels for {self.config.num_prototypes} prototypes.")
        self.quantizer.set_prototypes(prototypes, code_to_prototype)
        self.config.prototype_labels = list(labels) if labels is not None else None

    def code_prototype_labels(self) -> list[str | None]:
        """The prototype label each code is tied to, one per code (each None when the prototypes have no labels)."""
        labels = self.config.prototype_labels
        return [labels[p] if labels else None for p in self.quantizer.code_to_prototype.tolist()]

    # ------------------------------------------------------------------ roles and the codebook readout
    @torch.no_grad()
    def role_map(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Role id (index into `config.role_names`) of each token's code, (batch, h, w); all zeros without roles.

        Computed from the tokens `encode` picks in eval mode, so it is as deterministic and batch independent as they
        are.
        """
        tokens = self._inference_tokens(pixel_values)
        return self.quantizer.code_to_role[tokens]

    @torch.no_grad()
    def code_report(self) -> list[dict]:
        """One record per code: what it is used for and what it learned.

        Keys: `code`; `usage` (running share of the tokens it took in training, normalised to sum to 1); `role`
        (name, or None without roles); `prototype`, `prototype_label`, `prototype_cosine` (the prototype nearest to
        the projected code `W e_k` by cosine, its label and that cosine; None without prototypes); `low_pass`,
        `laplacian`, `chroma` (mean image signals of the latents it won in training; None for a code never seen) and
        `signal_weight` (the decayed token count behind those means).
        """
        quantizer = self.quantizer
        usage = quantizer.usage.float().clamp_min(0)
        usage = usage / usage.sum().clamp_min(1e-12)
        names = self.config.role_names
        roles = [names[r] if names else None for r in quantizer.code_to_role.tolist()]
        prototype_ids = cosines = None
        if quantizer.has_prototypes:
            projected = F.normalize(quantizer.code_projection(quantizer.codes().to(quantizer.code_projection.weight.dtype)).float(), dim=-1)
            similarity = projected @ F.normalize(quantizer.prototypes.float(), dim=-1).t()
            best = similarity.max(-1)
            prototype_ids, cosines = best.indices.tolist(), best.values.tolist()
        labels = self.config.prototype_labels
        means = quantizer.signal_statistics.means().tolist()
        weights = quantizer.signal_statistics.counts.float().tolist()
        records = []
        for code in range(self.config.codebook_size):
            prototype = prototype_ids[code] if prototype_ids is not None else None
            record = {
                "code": code,
                "usage": float(usage[code]),
                "role": roles[code],
                "prototype": prototype,
                "prototype_label": labels[prototype] if labels and prototype is not None else None,
                "prototype_cosine": cosines[code] if cosines is not None else None,
            }
            for name, value in zip(SIGNAL_NAMES, means[code]):
                record[name] = None if math.isnan(value) else value
            record["signal_weight"] = weights[code]
            records.append(record)
        return records

    def _check_device(self, tensor: torch.Tensor, name: str) -> None:
        # With a device_map, accelerate's hooks move inputs to each part's device; otherwise torch would fail deep
        # inside a layer ("Expected all tensors to be on the same device").
        device = self.quant_conv.weight.device
        if getattr(self, "hf_device_map", None) is None and device.type != "meta" and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {device}: move it with .to(model.device).")

    def _check_feature_grid(self, features: torch.Tensor, name: str, grid: tuple[int, int, int]) -> None:
        expected = (grid[0], self.config.semantic_dim, grid[1], grid[2])
        require_float_tensor(features, name, str(expected))
        if tuple(features.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (batch, semantic_dim, h, w), got {tuple(features.shape)}.")
        self._check_device(features, name)
        if not bool(torch.isfinite(features).all()):
            raise ValueError(f"{name} contains NaN or infinite values.")


@contextmanager
def held_load_report(held: list) -> Iterator[None]:
    """Hold back, into `held`, the LOAD REPORT table transformers logs while this thread loads weights: for running
    statistics a model saved by an earlier version lacks, it advises to train them ("newly initialized"), where one
    line says what matters (`log_loading_differences`). A caller shows `held` when the load fails, as transformers'
    error refers to the table."""
    thread = threading.get_ident()  # another thread's load keeps its own table

    def hold(record) -> bool:
        if record.thread == thread and "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    library = logging.get_logger("transformers.modeling_utils")
    library.addFilter(hold)
    try:
        yield
    finally:
        library.removeFilter(hold)


def log_loading_differences(loading_info: dict, source) -> None:
    """One line each for the tensors a loaded model's weights file lacks (running statistics that a model saved by an
    earlier version does not have: they start empty; missing parameters are refused) or holds beyond it."""
    missing = sorted(loading_info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        logger.warning(f"{source} was saved without {missing[0]}{more} (running statistics of a later version): they "
                       f"start empty, as in a new model.")  # fmt: skip
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        logger.warning(f"{source} holds tensors this model does not have ({unexpected[0]}{more}), which are ignored "
                       f"(saved by another version of cdb-vq, or loaded with another assignment than it was saved "
                       f"with?).")  # fmt: skip


def refuse_missing_parameters(model: nn.Module, loading_info: dict, source) -> None:
    """Refuse a model whose weights file lacks some of its parameters: transformers starts them at random and only
    logs a table, and the model then tokenises and decodes noise without an error (a dropped decoder, or a state
    dict saved with a `model.` prefix: every parameter). Buffers that a model saved by an earlier version lacks
    (running statistics it gathers afresh) are not parameters, and pass."""
    parameters = {name for name, _ in model.named_parameters()}
    missing = sorted(key for key in loading_info.get("missing_keys") or () if key in parameters)
    if missing:
        raise ValueError(
            f"the weights in {source} do not fit the model its config.json describes: {len(missing)} of its "
            f"{len(parameters)} parameters are missing (e.g. {missing[0]}), and would start at random."
        )


def flatten_grid(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), raster order."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


__all__ = ["CDBVQModel", "CDBVQPreTrainedModel", "CDBVQEncoderOutput", "CDBVQModelOutput"]
