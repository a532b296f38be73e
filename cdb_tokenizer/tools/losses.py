"""The training loss of a cdb-vq tokenizer (training-only: never imported by the modeling files).

The model's forward already returns its quantizer and semantic terms (`vq_loss` and each term on its own). This
file adds what the model leaves to training: L1 / L2 reconstruction, the LPIPS perceptual loss, and a PatchGAN
discriminator with taming-transformers' adaptive weight, and puts it all together in `compute_losses`, which
returns the total and every term by name so a training loop can log them and find the one that went wrong.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_cdb_vq import LOSS_WEIGHTS
from .downloads import reachable
from .messages import first_line

logger = logging.getLogger(__name__)

# The model's quantizer / semantic terms (output field -> logged name), derived from the modeling file's one list.
VQ_TERMS = {field_name: field_name.removesuffix("_loss") for field_name in LOSS_WEIGHTS}

LPIPS_NETWORKS = ("vgg", "alex", "squeeze")


class LPIPSUnavailableError(RuntimeError):
    """The LPIPS backbone weights are not cached and cannot be downloaded."""


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ----------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix / taming-transformers: one real-vs-fake logit per image patch.

    GroupNorm replaces BatchNorm so the discriminator behaves the same whatever the batch split across processes
    (and real and fake images can share one forward pass).

    Args:
        num_channels: Image channels.
        base_channels: Width of the first layer (doubled per layer up to 8x).
        num_layers: Strided layers; the receptive field grows with each.
    """

    def __init__(self, num_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(num_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = base_channels
        for index in range(1, num_layers + 1):
            next_width = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, next_width // 4), next_width),
                nn.LeakyReLU(0.2, True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # taming-transformers' init: N(0, 0.02) convolutions, N(1, 0.02) norm scales.
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """VQGAN's hinge loss of the discriminator's patch logits on real images and reconstructions."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN loss (binary cross-entropy on logits) of the discriminator."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISCRIMINATOR_LOSSES = {"hinge": hinge_discriminator_loss, "vanilla": vanilla_discriminator_loss}


def adaptive_weight(
    reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """taming-transformers' adaptive GAN weight: ||grad of the reconstruction loss|| / ||grad of the GAN loss||.

    Both gradients are taken with respect to the decoder's last layer, so the adversarial term never outweighs
    the reconstruction at the output. The weight is a constant for backpropagation.
    """
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.float().norm() / (generator_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------


def lpips_backbone_file(network: str) -> tuple[str, str]:
    """(cache path, URL) of the ImageNet weights of an LPIPS backbone (`vgg`, `alex` or `squeeze`) in torch hub."""
    from torchvision import models

    weights = {
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[network]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path)), weights.url


def cached_lpips(network: str = "vgg") -> nn.Module | None:
    """LPIPS when its backbone weights are in the torch hub cache (never downloads), else `None`; a file there that
    does not load as the backbone's tensors raises `LPIPSUnavailableError` naming it (callers that can go on without
    LPIPS say so and do)."""
    if not os.path.isfile(lpips_backbone_file(network)[0]):
        return None
    return load_lpips(network, required=True)


def load_lpips(network: str = "vgg", required: bool = True) -> nn.Module | None:
    """A frozen LPIPS module (inputs in [-1, 1]), or an error / `None` when its backbone weights are missing.

    The LPIPS linear heads ship inside the `lpips` package; the ImageNet backbone comes from torch hub, so it is
    taken from the torch hub cache or downloaded when download.pytorch.org can be reached. With `required`, a
    missing backbone raises `LPIPSUnavailableError` with a message that says so; without, returns `None`. Both
    files are read as tensors only: one that holds anything else (a pickled object) is refused the same way.
    """
    if network not in LPIPS_NETWORKS:
        raise ValueError(f"lpips network must be one of {list(LPIPS_NETWORKS)}, got {network!r}.")
    path, url = lpips_backbone_file(network)
    if not os.path.isfile(path) and not reachable(url):
        if not required:
            return None
        raise LPIPSUnavailableError(
            f"the LPIPS loss needs the ImageNet weights of its {network} backbone ({url}), which are not in the torch "
            f"hub cache ({path}) and cannot be downloaded now. Download them once (e.g. on a machine with network, "
            f"into $TORCH_HOME/hub/checkpoints), or pass --lpips_weight 0 to train without LPIPS."
        )
    import lpips

    # Built empty, then filled with tensors only: lpips and torchvision alone would load whatever file lies at the
    # torch hub cache path as a full pickle, and so run any code it carries.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips still uses torchvision's deprecated `pretrained=` argument
        module = lpips.LPIPS(net=network, pretrained=False, pnet_rand=True, verbose=False)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{network}.pth")
    try:
        backbone = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
        module.net.load_state_dict({name: backbone["features." + name.split(".", 1)[1]] for name in module.net.state_dict()})
        head_weights = torch.load(heads, map_location="cpu", weights_only=True)
        # The heads are lin0..linN (also reachable as lins.i); the scaling layer's constants are not in the file.
        expected = {name for name in module.state_dict() if name.startswith("lin") and not name.startswith("lins.")}
        if set(head_weights) != expected:
            raise KeyError(f"expected the LPIPS heads {sorted(expected)}, found {sorted(head_weights)}")
        module.load_state_dict(head_weights, strict=False)
    except Exception as error:  # UnpicklingError for anything but tensors, others for damaged or foreign files
        message = f"cannot load the LPIPS {network} weights ({path} or {heads}) as tensors: {first_line(error)}"
        if required:
            raise LPIPSUnavailableError(message) from None
        logger.warning(message)
        return None
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# The full loss
# ----------------------------------------------------------------------------------------------------------------


class TokenizerLoss(nn.Module):
    """Reconstruction, perceptual and adversarial losses, each with its own weight.

    Args:
        l1_weight, l2_weight: Weights of the pixel L1 and L2 (mean squared) losses.
        lpips_weight: Weight of the LPIPS perceptual loss (needs `lpips`).
        lpips: A module `lpips(x, y)` on [-1, 1] images giving (B, 1, 1, 1) distances.
        disc_weight: Weight of the generator's adversarial loss (times the adaptive weight).
        disc_start: First step at which the adversarial losses are on.
        disc_loss: `"hinge"` or `"vanilla"` discriminator loss.
        adaptive_disc_weight: Scale the adversarial term by taming's adaptive weight.
        high_frequency_weight: Weight of the L1 distance between the Laplacian responses of the reconstruction and
            the target (restoration: rewards sharp detail that L1/L2 on pixels blur away).
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips: nn.Module | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_loss: str = "hinge",
        adaptive_disc_weight: bool = True,
        high_frequency_weight: float = 0.0,
    ):
        super().__init__()
        if disc_loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"disc_loss must be one of {list(DISCRIMINATOR_LOSSES)}, got {disc_loss!r}.")
        for name, value in (("l1_weight", l1_weight), ("l2_weight", l2_weight), ("lpips_weight", lpips_weight),
                            ("disc_weight", disc_weight), ("high_frequency_weight", high_frequency_weight)):  # fmt: skip
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if lpips_weight > 0 and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module (see load_lpips).")
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.lpips_weight = lpips_weight
        self.lpips = lpips
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_loss = disc_loss
        self.adaptive_disc_weight = adaptive_disc_weight
        self.high_frequency_weight = high_frequency_weight

    def adversarial_active(self, step: int) -> bool:
        """Whether the generator and discriminator adversarial losses are on at `step`."""
        return self.disc_weight > 0 and step >= self.disc_start

    def reconstruction_terms(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted L1, L2 and (when weighted) LPIPS terms, each a scalar."""
        original, reconstruction = pixel_values.float(), reconstruction.float()
        terms = {"l1": (reconstruction - original).abs().mean(), "l2": F.mse_loss(reconstruction, original)}
        if self.lpips_weight > 0:
            terms["lpips"] = self.lpips(reconstruction, original).mean()
        if self.high_frequency_weight > 0:
            # The Laplacian is linear: one response of the difference, without the cancellation of two.
            terms["high_frequency"] = laplacian(reconstruction - original).abs().mean()
        return terms

    def weighted_reconstruction(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of `reconstruction_terms`."""
        total = self.l1_weight * terms["l1"] + self.l2_weight * terms["l2"]
        if "lpips" in terms:
            total = total + self.lpips_weight * terms["lpips"]
        if "high_frequency" in terms:
            total = total + self.high_frequency_weight * terms["high_frequency"]
        return total

    def generator_adversarial(
        self,
        reconstruction: torch.Tensor,
        reconstruction_loss: torch.Tensor,
        discriminator: nn.Module,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's adversarial term (weighted) and its parts: `-D(reconstruction)` and the weight used.

        `discriminator` should be the plain (unwrapped) module: its parameters are frozen for this pass so that the
        generator's backward leaves them (and any DDP hooks on them) alone.
        """
        parameters = list(discriminator.parameters())
        flags = [parameter.requires_grad for parameter in parameters]
        for parameter in parameters:
            parameter.requires_grad_(False)
        try:
            generator_loss = -discriminator(reconstruction).float().mean()
        finally:
            for parameter, flag in zip(parameters, flags):
                parameter.requires_grad_(flag)
        if self.adaptive_disc_weight and last_layer is not None and torch.is_grad_enabled():
            weight = adaptive_weight(reconstruction_loss, generator_loss, last_layer) * self.disc_weight
        else:
            weight = reconstruction_loss.new_tensor(self.disc_weight)
        return weight * generator_loss, {"generator_adversarial": generator_loss, "adaptive_weight": weight}

    def discriminator_loss(
        self, discriminator: nn.Module, pixel_values: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real images and (detached) reconstructions, in one forward pass."""
        logits = discriminator(torch.cat([pixel_values, reconstruction.detach().to(pixel_values.dtype)])).float()
        logits_real, logits_fake = logits.chunk(2)
        loss = DISCRIMINATOR_LOSSES[self.disc_loss](logits_real, logits_fake)
        return loss, {"discriminator": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """Per-channel 3x3 Laplacian response of images (B, C, H, W), replicate padding; float32 even under autocast
    (in bf16 a small difference's response was off by 7%)."""
    images = images.float()
    kernel = images.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    with torch.autocast(device_type=images.device.type, enabled=False):
        return F.conv2d(padded, kernel[None, None].expand(channels, 1, 3, 3), groups=channels)


@dataclass
class LossOutput:
    """What `compute_losses` gives back: the total to backpropagate, every term by name, and the model output."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    model_output: object | None = None


def compute_losses(
    model: nn.Module,
    pixel_values: torch.Tensor,
    loss_module: TokenizerLoss,
    teacher=None,
    step: int = 0,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
    grid_size: tuple[int, int] | None = None,
    target_pixel_values: torch.Tensor | None = None,
) -> LossOutput:
    """One forward pass of the tokenizer and its full training loss.

    Args:
        model: The tokenizer (possibly wrapped by DDP / accelerate).
        pixel_values: Images (B, 3, H, W) in [-1, 1].
        loss_module: The reconstruction / perceptual / adversarial losses.
        teacher: A `CLIPTeacher`; its patch features, resized to the token grid, drive the semantic terms.
        step: The optimisation step (the adversarial term starts at `loss_module.disc_start`).
        discriminator: The plain discriminator module, used for the generator's adversarial term.
        last_layer: The decoder's last weight, for the adaptive adversarial weight.
        grid_size: The token grid (h, w); needed with a teacher.
        target_pixel_values: What the reconstruction should match (restoration: the clean images, while
            `pixel_values` are their degraded versions); default `pixel_values`. The teacher sees the target.

    Returns:
        `LossOutput` with `total` and `terms`: `l1`, `l2`, [`lpips`], [`generator_adversarial`, `adaptive_weight`],
        every quantizer / semantic term the model returned, unweighted, under its `VQ_TERMS` name (`codebook`,
        `commitment`, `balance`, `role_supervision`, `semantic_distillation`, `token_alignment`, `code_alignment`),
        `vq` (their config-weighted sum) and `total`.
    """
    target = pixel_values if target_pixel_values is None else target_pixel_values
    teacher_features = None
    if teacher is not None:
        if grid_size is None:
            raise ValueError("compute_losses needs the token grid_size to resize the teacher's patch features.")
        teacher_features = teacher.patch_features(target, grid_size=grid_size)
    output = model(pixel_values, teacher_features=teacher_features, return_dict=True)

    terms = loss_module.reconstruction_terms(target, output.reconstruction)
    reconstruction_loss = loss_module.weighted_reconstruction(terms)
    total = reconstruction_loss + output.vq_loss
    if discriminator is not None and loss_module.adversarial_active(step):
        adversarial, adversarial_terms = loss_module.generator_adversarial(
            output.reconstruction, reconstruction_loss, discriminator, last_layer
        )
        total = total + adversarial
        terms.update(adversarial_terms)
    for attribute, name in VQ_TERMS.items():
        value = getattr(output, attribute)
        if value is not None:
            terms[name] = value
    terms["vq"] = output.vq_loss
    terms["total"] = total
    return LossOutput(total=total, terms=terms, model_output=output)


def first_nonfinite(terms: dict[str, torch.Tensor]) -> str | None:
    """The name of the first term that is NaN or infinite (the total last, so the culprit is named), else None."""
    for name, value in sorted(terms.items(), key=lambda item: item[0] == "total"):
        if not bool(torch.isfinite(value.detach()).all()):
            return name
    return None


__all__ = [
    "LPIPSUnavailableError",
    "LossOutput",
    "PatchDiscriminator",
    "TokenizerLoss",
    "adaptive_weight",
    "cached_lpips",
    "compute_losses",
    "first_nonfinite",
    "hinge_discriminator_loss",
    "laplacian",
    "load_lpips",
    "vanilla_discriminator_loss",
]
