"""The training loss: reconstruction, LPIPS, PatchGAN with the adaptive weight, and the model's own terms."""

import dataclasses
import inspect
import os

import pytest
import torch

import cdb_tokenizer.tools.losses as losses_module
from cdb_tokenizer import CDBVQConfig, CDBVQModel
from cdb_tokenizer.modeling_cdb_vq import LOSS_WEIGHTS, CDBVQModelOutput
from cdb_tokenizer.tools.losses import (
    LPIPSUnavailableError,
    PatchDiscriminator,
    TokenizerLoss,
    adaptive_weight,
    compute_losses,
    first_nonfinite,
    hinge_discriminator_loss,
    load_lpips,
    lpips_backbone_file,
)
from cdb_tokenizer.tools.roles import three_role_ranges
from cdb_tokenizer.tools.teacher import TINY_CLIP_CONFIG, CLIPTeacher, build_clip_model
from conftest import RunsCode

TINY = {
    "resolution": 32, "base_channels": 16, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "norm_num_groups": 8,
    "latent_dim": 16, "codebook_size": 64, "codebook_dim": 8, "semantic_dim": 32, "num_prototypes": 8, "router_dim": 8,
}  # fmt: skip


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CDBVQModel(CDBVQConfig(**TINY)).train()


def pixels(batch=2):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_reconstruction_terms_and_their_weights(model):
    loss = TokenizerLoss(l1_weight=2.0, l2_weight=3.0)
    original, reconstruction = pixels(), pixels() * 0.5
    terms = loss.reconstruction_terms(original, reconstruction)
    assert set(terms) == {"l1", "l2"}
    torch.testing.assert_close(terms["l1"], (original - reconstruction).abs().mean())
    torch.testing.assert_close(terms["l2"], ((original - reconstruction) ** 2).mean())
    torch.testing.assert_close(loss.weighted_reconstruction(terms), 2 * terms["l1"] + 3 * terms["l2"])
    with pytest.raises(ValueError, match="needs an LPIPS module"):
        TokenizerLoss(lpips_weight=1.0)
    with pytest.raises(ValueError, match="l2_weight must be >= 0"):
        TokenizerLoss(l2_weight=-1.0)
    with pytest.raises(ValueError, match="disc_loss"):
        TokenizerLoss(disc_loss="wasserstein")


def test_the_high_frequency_term_is_exact_under_autocast():
    # Under bf16 autocast the Laplacian convolutions ran in bf16: a small error's term read 7% high.
    loss = TokenizerLoss(l1_weight=0.0, l2_weight=0.0, high_frequency_weight=1.0)
    original = pixels(4)
    reconstruction = original + 0.003 * torch.randn(original.shape, generator=torch.Generator().manual_seed(2))
    exact = loss.reconstruction_terms(original, reconstruction)["high_frequency"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss.reconstruction_terms(original, reconstruction)["high_frequency"]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-4, atol=0)


def test_compute_losses_without_teacher_has_no_semantic_terms(model):
    result = compute_losses(model, pixels(), TokenizerLoss())
    # EMA codebook: no codebook loss; balance_weight 0 (the default): no balance term
    assert {"l1", "l2", "commitment", "vq", "total"} == set(result.terms)
    torch.testing.assert_close(result.total, result.terms["l1"] + result.model_output.vq_loss)
    result.total.backward()
    assert model.decoder.conv_out.weight.grad is not None and model.quantizer.router.code_keys.grad is not None


def test_compute_losses_with_a_teacher_adds_the_semantic_terms(model):
    torch.manual_seed(0)
    teacher = CLIPTeacher(build_clip_model(TINY_CLIP_CONFIG))
    model.set_prototypes(torch.randn(8, 32))
    result = compute_losses(model, pixels(), TokenizerLoss(), teacher=teacher, grid_size=(8, 8))
    for term in ("semantic_distillation", "token_alignment", "code_alignment"):
        assert torch.isfinite(result.terms[term]), term
    # The terms are the model's own against the teacher's patch features on the token grid, and with a restoration
    # target it is the clean target the teacher looks at, not the degraded input (eval: the same codes both times).
    model.eval()
    degraded, clean = pixels(), pixels() * 0.5
    with torch.no_grad():
        result = compute_losses(model, degraded, TokenizerLoss(), teacher=teacher, grid_size=(8, 8), target_pixel_values=clean)
        expected = model(degraded, teacher_features=teacher.patch_features(clean, grid_size=(8, 8)))
        of_the_input = model(degraded, teacher_features=teacher.patch_features(degraded, grid_size=(8, 8)))
    for term in ("semantic_distillation", "token_alignment", "code_alignment"):
        torch.testing.assert_close(result.terms[term], getattr(expected, f"{term}_loss"), msg=term)
    assert not torch.allclose(result.terms["token_alignment"], of_the_input.token_alignment_loss)
    with pytest.raises(ValueError, match="grid_size"):
        compute_losses(model, pixels(), TokenizerLoss(), teacher=teacher)


def test_one_list_of_weighted_terms_for_the_config_the_model_and_the_logs():
    """`LOSS_WEIGHTS` is the only list: every `*_weight` config field is in it, each term is an output field, and
    compute_losses logs each term the model returns, unweighted, under its name without "_loss"."""
    weight_fields = {name for name in inspect.signature(CDBVQConfig.__init__).parameters if name.endswith("_weight")}
    assert set(LOSS_WEIGHTS.values()) == weight_fields
    assert set(LOSS_WEIGHTS) <= {field.name for field in dataclasses.fields(CDBVQModelOutput)}

    # Distinct weights and a setting where the model returns every term (gradient codebook, roles, a teacher).
    weights = {field: 0.1 * (index + 1) for index, field in enumerate(sorted(weight_fields))}
    config = CDBVQConfig(**TINY, ema_decay=None, code_roles=three_role_ranges(64), **weights)
    torch.manual_seed(0)
    model = CDBVQModel(config).train()
    model.set_prototypes(torch.randn(8, 32))
    teacher = CLIPTeacher(build_clip_model(TINY_CLIP_CONFIG))
    result = compute_losses(model, pixels(), TokenizerLoss(), teacher=teacher, grid_size=(8, 8))
    output = result.model_output
    assert all(getattr(output, term) is not None for term in LOSS_WEIGHTS), "the setting should return every term"
    for term in LOSS_WEIGHTS:
        assert result.terms[term.removesuffix("_loss")] is getattr(output, term), term
    expected = sum(weights[field] * getattr(output, term) for term, field in LOSS_WEIGHTS.items())
    torch.testing.assert_close(result.terms["vq"], expected)


def test_training_flags_of_the_weighted_terms_only_set_config_fields(tmp_path):
    """`--commitment_weight` and the like go into the model config, which weights the terms; the pixel loss of the
    training script weights only its own terms, so there is no second weight for a quantizer or semantic term."""
    from cdb_tokenizer.tools.train_args import parse_args

    argv = [arg for field in LOSS_WEIGHTS.values() for arg in (f"--{field}", "0.125")]
    args = parse_args(argv + ["--role_preset", "three", "--output_dir", str(tmp_path)])
    assert {field: args.model_config_dict[field] for field in LOSS_WEIGHTS.values()} == dict.fromkeys(LOSS_WEIGHTS.values(), 0.125)
    pixel_weights = {name for name in inspect.signature(TokenizerLoss.__init__).parameters if name.endswith("_weight")}
    assert pixel_weights and not pixel_weights & set(LOSS_WEIGHTS.values())


def test_adversarial_term_starts_at_disc_start_with_the_adaptive_weight(model):
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    loss = TokenizerLoss(disc_weight=0.5, disc_start=5)
    last_layer = model.decoder.conv_out.weight
    before = compute_losses(model, pixels(), loss, step=4, discriminator=discriminator, last_layer=last_layer)
    assert "generator_adversarial" not in before.terms and not loss.adversarial_active(4)
    after = compute_losses(model, pixels(), loss, step=5, discriminator=discriminator, last_layer=last_layer)
    assert "generator_adversarial" in after.terms and after.terms["adaptive_weight"] > 0
    after.total.backward()
    assert all(p.grad is None for p in discriminator.parameters())  # the generator pass leaves D alone
    assert all(p.requires_grad for p in discriminator.parameters())


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    reconstruction, generator = (layer * 3).sum(), (layer * 0.5).sum()
    weight = adaptive_weight(reconstruction, generator, layer)
    torch.testing.assert_close(weight, torch.tensor(3.0 / (0.5 + 1e-4 / 2**0.5)), rtol=1e-3, atol=1e-3)
    assert not weight.requires_grad


def test_discriminator_loss_and_patch_logits():
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    logits = discriminator(pixels(3))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1  # one logit per patch
    loss, terms = TokenizerLoss(disc_weight=1.0).discriminator_loss(discriminator, pixels(), pixels() * 0)
    assert set(terms) == {"discriminator", "logits_real", "logits_fake"}
    loss.backward()
    assert all(p.grad is not None for p in discriminator.parameters())
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (0.5 + 0.75)))


def test_first_nonfinite_names_the_culprit_before_the_total():
    terms = {"total": torch.tensor(float("nan")), "l1": torch.tensor(1.0), "lpips": torch.tensor(float("inf"))}
    assert first_nonfinite(terms) == "lpips"
    assert first_nonfinite({"l1": torch.tensor(1.0)}) is None


def test_missing_lpips_weights_stop_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(losses_module, "reachable", lambda url, timeout=3.0: False)
    with pytest.raises(LPIPSUnavailableError, match="--lpips_weight 0"):
        load_lpips("vgg")
    assert load_lpips("vgg", required=False) is None
    with pytest.raises(ValueError, match="lpips network"):
        load_lpips("resnet")


def test_lpips_weights_load_as_tensors_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_file("squeeze")[0]
    os.makedirs(os.path.dirname(path))
    backbone = torchvision.models.squeezenet1_1()
    torch.save(backbone.state_dict(), path)
    module = load_lpips("squeeze")
    assert torch.equal(module.net.slice1._modules["0"].weight, backbone.features[0].weight)  # the file's weights
    assert torch.equal(module.net.slice7._modules["12"].expand3x3.weight, backbone.features[12].expand3x3.weight)

    marker = tmp_path / "code-ran"
    torch.save({"features.0.weight": RunsCode(marker)}, path)
    with pytest.raises(LPIPSUnavailableError, match="as tensors"):
        load_lpips("squeeze")
    assert load_lpips("squeeze", required=False) is None
    assert not marker.exists()


def _accumulating_parts(max_grad_norm: float = 1.0):
    from accelerate import Accelerator

    from cdb_tokenizer.tools.steps import TrainingParts

    torch.manual_seed(0)
    model = CDBVQModel(CDBVQConfig(**{**TINY, "ema_decay": 0.8}))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return TrainingParts(accelerator, model, optimizer, TokenizerLoss(l2_weight=1.0), max_grad_norm=max_grad_norm)


@pytest.mark.parametrize("failure", ["second batch", "gradient norm"])
def test_a_skipped_accumulation_window_leaves_weights_and_codebook_as_they_were(monkeypatch, failure):
    import cdb_tokenizer.tools.steps as steps_module

    parts = _accumulating_parts()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    bad_term = None
    for _ in range(2):  # one good window: the codebook is initialised and has moved
        _, bad_term, _ = steps_module.training_step(parts, images, 0, bad_term)
    before = {name: value.clone() for name, value in parts.unwrapped.state_dict().items()}
    if failure == "second batch":
        real, calls = steps_module.compute_losses, []

        def nan_in_the_second_batch(*args, **kwargs):
            losses = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                losses.terms["l1"] = losses.terms["l1"] * float("nan")
                losses.total = losses.total + losses.terms["l1"]
            return losses

        monkeypatch.setattr(steps_module, "compute_losses", nan_in_the_second_batch)
    else:
        monkeypatch.setattr(parts.accelerator, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    bad_term = None
    for _ in range(2):  # the first batch of the window is fine and updates the EMA codebook and usage
        _, bad_term, _ = steps_module.training_step(parts, images, 1, bad_term)
    assert bad_term == ("l1" if failure == "second batch" else "gradient norm")
    changed = [name for name, value in parts.unwrapped.state_dict().items() if not torch.equal(value, before[name])]
    assert changed == []
    assert parts.window_snapshot is None
