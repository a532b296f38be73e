"""CDBVQModel: public API shapes, gradients, dtypes, and clear errors on bad input."""

import numpy as np
import pytest
import torch

from cdb_tokenizer import CDBVQConfig, CDBVQImageProcessor, CDBVQModel
from conftest import tiny_config, tiny_model


RULES = ["nearest", "sinkhorn", "cdb"]


@pytest.mark.parametrize("assignment", RULES)
def test_forward_shapes_and_terms(assignment, photo_batch):
    model = tiny_model(assignment=assignment)
    output = model(photo_batch)
    assert output.reconstruction.shape == photo_batch.shape
    assert output.image_tokens.shape == (4, 8, 8)
    assert output.image_tokens.dtype == torch.long
    assert output.quantized.shape == output.latents.shape == (4, 8, 8, 8)
    assert output.commitment_loss is not None
    assert (output.codebook_loss is None) == (model.config.ema_decay is not None)  # EMA codes need no codebook loss
    assert output.balance_loss is None  # at its default weight of 0 it is not computed
    balanced = tiny_model(assignment=assignment, balance_weight=0.1)(photo_batch)
    assert (balanced.balance_loss is not None) == (assignment == "cdb")  # a term of the router's
    assert output.semantic_distillation_loss is None  # no teacher features given
    assert 0 < float(output.utilization) <= 1
    assert 1 <= float(output.perplexity) <= 64
    assert torch.isfinite(output.vq_loss)


@pytest.mark.parametrize("assignment", RULES)
def test_gradients_reach_encoder_codebook_and_router(assignment, photo_batch):
    model = tiny_model(assignment=assignment, ema_decay=None)
    teacher = torch.randn(4, 32, 8, 8)
    output = model(photo_batch, teacher_features=teacher)
    loss = output.vq_loss + (output.reconstruction - photo_batch).abs().mean()
    loss.backward()
    grad = lambda p: 0.0 if p.grad is None else float(p.grad.abs().sum())  # noqa: E731
    assert grad(model.encoder.conv_in.weight) > 0
    assert grad(model.decoder.conv_out.weight) > 0
    assert grad(model.quantizer.codebook.weight) > 0
    assert grad(model.semantic_head.conv_out.weight) > 0
    assert grad(model.quantizer.code_projection.weight) > 0
    if assignment == "cdb":
        assert grad(model.quantizer.router.code_keys) > 0
        assert grad(model.quantizer.router.query.weight) > 0


def test_teacher_features_give_semantic_terms(photo_batch):
    model = tiny_model()
    output = model(photo_batch, teacher_features=torch.randn(4, 32, 8, 8))
    assert output.semantic_distillation_loss is not None and output.token_alignment_loss is not None
    assert output.code_alignment_loss is None  # prototypes not set yet
    model.set_prototypes(torch.randn(8, 32), labels=[f"class {i}" for i in range(8)])
    labels = model.code_prototype_labels()
    assert len(labels) == 64 and labels[0] == "class 0" and labels[9] == "class 1"
    output = model(photo_batch, teacher_features=torch.randn(4, 32, 8, 8))
    assert output.code_alignment_loss is not None
    weighted = sum(
        getattr(model.config, weight) * getattr(output, term) if getattr(output, term) is not None else 0.0
        for term, weight in [
            ("codebook_loss", "codebook_weight"), ("commitment_loss", "commitment_weight"),
            ("balance_loss", "balance_weight"),
            ("semantic_distillation_loss", "semantic_distillation_weight"),
            ("token_alignment_loss", "token_alignment_weight"), ("code_alignment_loss", "code_alignment_weight"),
        ]
    )  # fmt: skip
    torch.testing.assert_close(output.vq_loss, weighted)


def test_semantic_terms_compare_each_token_with_the_teacher_feature_of_its_own_grid_cell(photo_batch):
    model = tiny_model().eval()  # out of training the prototype ties stay put
    model.set_prototypes(torch.randn(8, 32))
    teacher = torch.randn(4, 32, 8, 8)
    with torch.no_grad():
        output = model(photo_batch, teacher_features=teacher)
        quantizer = model.quantizer
        codes = quantizer.code_projection(quantizer.codebook.weight)  # W e_k + b for every code k
        tokens = codes[output.image_tokens].permute(0, 3, 1, 2)  # (4, 32, 8, 8): each token's projected code
        ties = quantizer.prototypes[quantizer.code_to_prototype]
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1)  # noqa: E731
    expected = {
        "semantic_distillation_loss": (1 - cosine(output.semantic_features, teacher)).mean(),
        "token_alignment_loss": (1 - cosine(tokens, teacher)).mean(),
        "code_alignment_loss": (1 - cosine(codes, ties)).mean(),
    }
    for term, value in expected.items():
        torch.testing.assert_close(getattr(output, term), value, atol=1e-5, rtol=1e-5, msg=term)
    # Random teacher features sit near cosine 0 from everything, so a term against the wrong cell would still land
    # near 1: pin the cells by giving the teacher the tokens' own projected codes, which costs nothing.
    with torch.no_grad():
        aligned = model(photo_batch, teacher_features=tokens)
    assert torch.equal(aligned.image_tokens, output.image_tokens)
    assert float(aligned.token_alignment_loss) == pytest.approx(0.0, abs=1e-5)


def test_semantic_features_passed_in_are_used_by_router(photo_batch):
    model = tiny_model().eval()
    model.set_prototypes(torch.randn(8, 32))
    model.quantizer.router.semantic_scale.data.fill_(50.0)
    features = torch.randn(4, 32, 8, 8)
    own = model.encode(photo_batch, semantic_features=features)
    assert torch.equal(own.semantic_features, features)
    predicted = model.encode(photo_batch)
    assert not torch.equal(own.image_tokens, predicted.image_tokens)


@pytest.mark.parametrize("assignment", RULES)
def test_tokens_do_not_depend_on_the_batch(assignment, photo_batch):
    model = tiny_model(assignment=assignment)
    model.train()
    model(photo_batch)  # k-means init and one training step's statistics
    model.eval()
    batched = model.get_image_tokens(photo_batch)
    for index in range(photo_batch.shape[0]):
        alone = model.get_image_tokens(photo_batch[index : index + 1])
        assert torch.equal(alone[0], batched[index])


def test_public_token_api_round_trip(photo_batch):
    model = tiny_model().eval()
    encoded = model.encode(photo_batch)
    tokens = model.get_image_tokens(photo_batch)
    assert tokens.shape == (4, 64)
    assert torch.equal(tokens, encoded.image_tokens.flatten(1))  # raster order
    from_flat = model.decode_image_tokens(tokens)
    from_grid = model.decode_image_tokens(encoded.image_tokens)
    assert from_flat.shape == photo_batch.shape
    torch.testing.assert_close(from_flat, from_grid)
    torch.testing.assert_close(from_flat, model(photo_batch).reconstruction)


def test_non_square_images_and_explicit_size():
    model = tiny_model().eval()
    pixel_values = torch.rand(2, 3, 32, 48) * 2 - 1
    tokens = model.get_image_tokens(pixel_values)
    assert tokens.shape == (2, 8 * 12)
    images = model.decode_image_tokens(tokens, height=32, width=48)
    assert images.shape == (2, 3, 32, 48)


def test_bfloat16(photo_batch):
    model = tiny_model().to(torch.bfloat16)
    output = model(photo_batch.to(torch.bfloat16))
    assert output.reconstruction.dtype == torch.bfloat16
    assert torch.isfinite(output.reconstruction.float()).all()
    output.vq_loss.backward()
    model.eval()
    images = model.decode_image_tokens(model.get_image_tokens(photo_batch.to(torch.bfloat16)))
    assert images.dtype == torch.bfloat16


def _quantizer_state_dtypes(model) -> set:
    return {buffer.dtype for buffer in model.quantizer.buffers() if buffer.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_quantizer_keeps_its_running_statistics_in_float32(tmp_path, dtype):
    """Cast to half precision, the usage and EMA statistics rounded away their 1% steps, and the EMA smoothing
    underflowed float16 into an infinite codebook after ~50 training steps."""
    model = tiny_model(assignment="nearest", codebook_size=1024).to(dtype).train()
    assert _quantizer_state_dtypes(model) == {torch.float32}
    pixel_values = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    with torch.no_grad():
        # 512 latents a step on 1,024 codes: some go unused for 55 steps (0.8 ** 55 ~ 5e-6); bfloat16 has float32's range
        for _ in range(70 if dtype == torch.float16 else 2):
            model(pixel_values)
    assert torch.isfinite(model.quantizer.codebook.weight.float()).all()
    # Loaded in half precision (the model is built under that default dtype): float32 too.
    model.float().save_pretrained(tmp_path)
    loaded = CDBVQModel.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.dtype == dtype and _quantizer_state_dtypes(loaded) == {torch.float32}
    assert loaded.quantizer.code_to_prototype.dtype == torch.long


def test_gradient_checkpointing_gives_same_gradients(photo_batch):
    def gradients(checkpointing: bool):
        model = tiny_model(assignment="nearest")
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.encoder.down[0].blocks[0].gradient_checkpointing
        output = model(photo_batch)
        (output.reconstruction.square().mean() + output.vq_loss).backward()
        return model.encoder.conv_in.weight.grad.clone()

    torch.testing.assert_close(gradients(True), gradients(False))


@pytest.mark.parametrize("assignment", RULES)
@pytest.mark.parametrize("ema_decay", [None, 0.8])
@pytest.mark.parametrize("code_roles", [None, {"structure": [0, 32], "texture": [32, 64]}])
def test_every_documented_combination_trains(assignment, ema_decay, code_roles, photo_batch):
    """Each rule, with a gradient or an EMA codebook, with or without roles: a few optimizer steps stay finite and
    move the codebook (the EMA update must not corrupt the autograd graph of the forward that made it)."""
    model = tiny_model(assignment=assignment, ema_decay=ema_decay, code_roles=code_roles).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(photo_batch)  # k-means initialisation
    before = model.quantizer.codebook.weight.detach().clone()
    for step in range(3):
        output = model(photo_batch * (1 - 0.1 * step))
        loss = (output.reconstruction - photo_batch).pow(2).mean() + output.vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert not torch.equal(before, model.quantizer.codebook.weight)


def test_ema_codebook_moves_without_gradient(photo_batch):
    model = tiny_model(assignment="nearest", ema_decay=0.5)
    assert not model.quantizer.codebook.weight.requires_grad
    output = model(photo_batch)  # initialises, then one EMA update
    assert output.codebook_loss is None
    before = model.quantizer.codebook.weight.clone()
    model(photo_batch * 0.5)
    assert not torch.equal(before, model.quantizer.codebook.weight)


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (torch.zeros(1, 4, 32, 32), ValueError, "4 channels but the model expects 3"),
        (torch.zeros(1, 32, 32, 3), ValueError, r"channels last; .*permute\(0, 3, 1, 2\)"),
        (torch.zeros(1, 3, 30, 32), ValueError, "not divisible by the downsampling factor 4"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.zeros(3, 32, 32), ValueError, r"shape \(batch, channels, height, width\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_pixel_values(model, pixel_values, error, message):
    with pytest.raises(error, match=message):
        model.get_image_tokens(pixel_values)


def test_inference_helpers_leave_a_training_model_unchanged(photo_batch):
    # In training mode `encode` updates the codebook (EMA) and usage; the inference helpers must not.
    model = tiny_model().train()
    model(photo_batch)  # initialises the codebook, as training would
    state = {name: value.clone() for name, value in model.state_dict().items()}
    model.encoder.eval()  # a frozen part stays as it was set, too
    tokens = model.get_image_tokens(photo_batch)
    roles = model.role_map(photo_batch)
    assert model.training and model.quantizer.training and not model.encoder.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    model.eval()
    assert torch.equal(tokens, model.get_image_tokens(photo_batch))
    assert roles.shape == (4, 8, 8)


def test_decoding_tokens_gives_the_same_images_in_training_mode(photo_batch):
    # decode_image_tokens ran in the model's mode: with dropout the same tokens decoded to other images on each call.
    model = tiny_model(dropout=0.5).eval()
    tokens = model.get_image_tokens(photo_batch)
    expected = model.decode_image_tokens(tokens)
    model.train()
    model.encoder.eval()
    for grid in (tokens, tokens.view(-1, 8, 8)):
        assert torch.equal(model.decode_image_tokens(grid), expected)
    assert model.training and model.decoder.training and not model.encoder.training


def test_two_threads_tokenising_with_a_training_model_leave_it_unchanged(photo_batch):
    # The second thread read the modes while the first had switched the model to eval mode: it encoded in training
    # mode once the first switched back (k-means initialised the codebook on its images) and left it in eval mode.
    import threading

    model = tiny_model().train()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    first_encoding, second_encoding, first_done = threading.Event(), threading.Event(), threading.Event()

    def meet(module, args):  # inside its encode, the first waits (1 s at most) for the second to start one
        if threading.current_thread().name == "first":
            first_encoding.set()
            second_encoding.wait(1.0)
        else:
            second_encoding.set()
            first_done.wait(10.0)

    def first():
        model.get_image_tokens(photo_batch)
        first_done.set()

    hook = model.encoder.register_forward_pre_hook(meet)
    try:
        threads = [threading.Thread(target=first, name="first"),
                   threading.Thread(target=model.get_image_tokens, args=(photo_batch,), name="second")]  # fmt: skip
        threads[0].start()
        assert first_encoding.wait(10.0)
        threads[1].start()
        for thread in threads:
            thread.join(30.0)
    finally:
        hook.remove()
    assert model.training and model.quantizer.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_float64_pixel_values_are_cast_under_autocast_too(model, photo_batch):
    # Autocast casts float32 and half inputs, never float64: "Input type (double) and bias type ... should be the
    # same".
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.get_image_tokens(photo_batch.double()), model.get_image_tokens(photo_batch))
        quantized = model.encode(photo_batch).quantized
        assert model.decode_latents(quantized.double()).shape == photo_batch.shape


@pytest.mark.parametrize("config", ["outputs/demo", {"codebook_size": 64}, None])
def test_a_model_built_from_something_else_than_a_config_is_named(config):
    with pytest.raises(TypeError, match=r"CDBVQModel takes a CDBVQConfig, got \w+; .*CDBVQModel.from_pretrained"):
        CDBVQModel(config)  # was "'str' object has no attribute 'validate_fields'"


def test_bad_tokens(model):
    with pytest.raises(ValueError, match=r"code ids in \[0, 64\)"):
        model.decode_image_tokens(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match=r"code ids in \[0, 64\)"):
        model.decode_image_tokens(torch.full((1, 64), -1))
    with pytest.raises(ValueError, match="got 63 tokens per image"):
        model.decode_image_tokens(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model.decode_image_tokens(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="not divisible"):
        model.decode_image_tokens(torch.zeros(1, 64, dtype=torch.long), height=30, width=30)


def corrupt(model, part: str, value: float = float("nan")):
    """Put `value` into one weight of the encoder side or one code of the codebook (code 5), as a diverged run or a
    damaged checkpoint would."""
    with torch.no_grad():
        if part == "encoder":
            model.encoder.conv_out.weight[0, 0, 0, 0] = value
        elif part == "codebook":
            model.quantizer.codebook.weight[5, 0] = value
        else:  # finite latents so large that their distance to the codes overflows float32
            model.quant_conv.weight.mul_(1e20)
    return model


@pytest.mark.parametrize("assignment", RULES)
@pytest.mark.parametrize(
    "part, value, message",
    [
        ("encoder", float("nan"), "the encoder produced NaN or infinite latents"),
        ("encoder", float("inf"), "the encoder produced NaN or infinite latents"),
        ("codebook", float("nan"), r"the codebook holds NaN or infinite values in 1 of 64 codes \(first: code 5\)"),
        ("codebook", float("-inf"), r"the codebook holds NaN or infinite values in 1 of 64 codes"),
        ("latents", None, "overflow"),
    ],
)
def test_corrupt_weights_are_refused_at_inference(assignment, part, value, message, photo_batch):
    # Before: argmin over NaN distances gave arbitrary (often all the same) token ids and exit 0.
    model = corrupt(tiny_model(assignment=assignment).eval(), part, value)
    with pytest.raises(ValueError, match=message):
        model.get_image_tokens(photo_batch)
    with pytest.raises(ValueError, match=message):
        model(photo_batch)  # eval mode with gradients on: a reconstruction too


def test_a_corrupt_semantic_head_or_nan_semantic_features_are_refused(photo_batch):
    model = tiny_model(assignment="cdb").eval()
    features = torch.full((len(photo_batch), model.config.semantic_dim, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="semantic_features contains NaN"):  # checked on the way in
        model.encode(photo_batch, semantic_features=features)
    with torch.no_grad():
        next(model.semantic_head.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="semantic head's weights are corrupt"):
        model.get_image_tokens(photo_batch)


@pytest.mark.parametrize("part", ["query", "code_keys", "potentials", "temperature", "prototypes"])
def test_a_corrupt_router_is_refused_at_inference(part, photo_batch):
    # Before: NaN scores made the router's argmax fall back to each latent's first candidate, silently.
    model = tiny_model(assignment="cdb").eval()
    router = model.quantizer.router
    tensor = {"query": router.query.weight, "code_keys": router.code_keys, "potentials": router.potentials,
              "temperature": router.temperature, "prototypes": model.quantizer.prototypes}[part]  # fmt: skip
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="cdb router's weights or state .* hold NaN"):
        model.get_image_tokens(photo_batch)


def test_a_corrupt_codebook_is_refused_by_decode(model):
    broken = corrupt(tiny_model().eval(), "codebook")
    tokens = torch.zeros(1, 64, dtype=torch.long)  # code 0 is fine, code 5 is not: the codebook is corrupt
    with pytest.raises(ValueError, match=r"codebook holds NaN or infinite values .*code 5"):
        broken.decode_image_tokens(tokens)
    assert torch.isfinite(model.decode_image_tokens(tokens)).all()


def test_a_corrupt_decoder_is_refused_by_decode(photo_batch):
    # A NaN decoder weight loaded, encoded, and decoded NaN images without a word (the CLI failed only later, at
    # postprocess, naming the images instead of the weights).
    model = tiny_model().eval()
    tokens = model.get_image_tokens(photo_batch)
    with torch.no_grad():
        next(model.decoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"the decoder produced NaN or infinite pixels .* weights .* are corrupt"):
        model.decode_image_tokens(tokens)
    with pytest.raises(ValueError, match="the decoder produced NaN"):
        model(photo_batch)
    model.train()(photo_batch)  # in training the loss shows it and the loop skips the step: no exception


def test_a_healthy_float16_codebook_whose_sum_overflows_float16_is_not_refused(photo_batch):
    model = tiny_model().eval().half()
    with torch.no_grad():
        model.quantizer.codebook.weight.fill_(300.0)  # finite codes; their sum, 153,600, is past float16's 65,504
    tokens = model.get_image_tokens(photo_batch.half())
    assert torch.isfinite(model.decode_image_tokens(tokens).float()).all()


@pytest.mark.parametrize("part", ["encoder", "codebook"])
def test_a_nan_training_step_reaches_the_loss_instead_of_raising(part, photo_batch):
    # The training loop skips a step whose loss is not finite and rolls the quantizer back (tools/steps.py), so in
    # training mode a NaN must come out as a loss, never as an exception.
    model = tiny_model().train()
    model(photo_batch)  # initialises the codebook, as training would
    output = corrupt(model, part)(photo_batch)
    assert not torch.isfinite(output.vq_loss)


def test_bad_feature_shapes(model, photo_batch):
    with pytest.raises(ValueError, match=r"semantic_features must have shape \(4, 32, 8, 8\)"):
        model.encode(photo_batch, semantic_features=torch.zeros(4, 16, 8, 8))
    with pytest.raises(ValueError, match="teacher_features contains NaN"):
        model.encode(photo_batch, teacher_features=torch.full((4, 32, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"prototypes must have shape \(8, 32\)"):
        model.set_prototypes(torch.zeros(3, 32))
    with pytest.raises(TypeError, match="semantic_features must be a floating-point torch.Tensor .* got ndarray"):
        model.encode(photo_batch, semantic_features=np.zeros((4, 32, 8, 8), dtype=np.float32))


def test_inputs_on_another_device_than_the_model_are_named(model, photo_batch):
    # Features on another device failed deep in the router (torch.cat) or in torch.Tensor.item(); "meta" stands in
    # for a GPU here: the check compares devices, whichever they are.
    meta = {"device": "meta"}
    with pytest.raises(ValueError, match=r"pixel_values is on meta but the model is on cpu: move it"):
        model.encode(photo_batch.to(**meta))
    with pytest.raises(ValueError, match=r"semantic_features is on meta but the model is on cpu"):
        model.encode(photo_batch, semantic_features=torch.zeros(4, 32, 8, 8, **meta))
    with pytest.raises(ValueError, match=r"teacher_features is on meta but the model is on cpu"):
        model(photo_batch, teacher_features=torch.zeros(4, 32, 8, 8, **meta))
    with pytest.raises(ValueError, match=r"image_tokens is on meta but the model is on cpu"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long, **meta))
    with pytest.raises(ValueError, match=r"quantized is on meta but the model is on cpu"):
        model.decode_latents(torch.zeros(1, 8, 8, 8, **meta))


def test_set_prototypes_checks_everything_before_writing_anything():
    model = tiny_model()
    prototypes = torch.randn(8, 32)
    before = (model.quantizer.prototypes.clone(), model.quantizer.code_to_prototype.clone(), model.config.prototype_labels)
    bad_calls = [
        # A float map was truncated (2.9 -> 2) into the long buffer.
        (TypeError, r"code_to_prototype must be an integer tensor \(torch.int64 or int32\)", {"code_to_prototype": torch.full((64,), 2.9)}),
        # The prototypes were written before the map was refused.
        (ValueError, r"code_to_prototype must be 64 prototype ids in \[0, 8\)", {"code_to_prototype": torch.full((64,), 99)}),
        (TypeError, "labels must be a list of strings", {"labels": "abcdefgh"}),  # was split into letters
        (TypeError, "labels must be a list of strings", {"labels": list(range(8))}),  # failed at from_pretrained
        (ValueError, "got 3 prototype labels for 8", {"labels": ["a", "b", "c"]}),
    ]
    for error, message, kwargs in bad_calls:
        with pytest.raises(error, match=message):
            model.set_prototypes(prototypes, **kwargs)
    with pytest.raises(ValueError, match="prototypes contain NaN"):
        model.set_prototypes(torch.full((8, 32), float("nan")))
    with pytest.raises(TypeError, match="prototypes must be a floating-point torch.Tensor, got ndarray"):
        model.set_prototypes(prototypes.numpy())
    assert torch.equal(model.quantizer.prototypes, before[0]) and torch.equal(model.quantizer.code_to_prototype, before[1])
    assert model.config.prototype_labels == before[2]
    model.set_prototypes(prototypes, labels=list("abcdefgh"), code_to_prototype=torch.arange(64) % 8)
    assert torch.equal(model.quantizer.prototypes, prototypes) and model.code_prototype_labels()[9] == "b"


def test_a_corrupt_prototype_tie_in_a_saved_model_is_named_not_an_index_error(tmp_path, photo_batch):
    from safetensors.torch import load_file, save_file

    from cdb_tokenizer import CDBVQModel

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["quantizer.code_to_prototype"][5] = 999
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = CDBVQModel.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match=r"code_to_prototype ties codes to prototype ids 0\.\.999, outside \[0, 8\)"):
        model.get_image_tokens(photo_batch)


def test_decode_latents_checks_its_input_and_casts_it(model, photo_batch):
    quantized = model.encode(photo_batch).quantized
    with torch.no_grad():
        expected = model(photo_batch).reconstruction
        assert torch.allclose(model.decode_latents(quantized.double()), expected, atol=1e-5)  # cast, not an error
    for bad, message in [
        (torch.randn(2, 7, 8, 8), r"shape \(batch, codebook_dim=8, h, w\), got \(2, 7, 8, 8\)"),
        (torch.randn(8, 8, 8), r"got \(8, 8, 8\)"),
        (torch.full((1, 8, 8, 8), float("nan")), "quantized latents contain NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.decode_latents(bad)
    with pytest.raises(TypeError, match="floating-point torch.Tensor, got a torch.int64 tensor"):
        model.decode_latents(torch.zeros(1, 8, 8, 8, dtype=torch.long))
    # Finite but huge latents overflow the decoder: that was blamed on corrupt weights.
    with pytest.raises(ValueError, match=r"the quantized latents reach 1e\+30, far beyond the codebook's values"):
        model.decode_latents(torch.full((1, 8, 8, 8), 1e30))


def test_a_size_that_disagrees_with_a_token_grid_is_refused(model):
    tokens = torch.randint(0, 64, (2, 8, 8))
    with pytest.raises(ValueError, match=r"a 64x64 image disagrees with the 8x8 token grid \(32x32 pixels\)"):
        model.decode_image_tokens(tokens, height=64, width=64)  # decoded at 32x32 without a word before
    with pytest.raises(ValueError, match="a 32x16 image disagrees"):
        model.decode_image_tokens(tokens, height=32, width=16)
    with pytest.raises(ValueError, match="a 16x16 image disagrees"):  # one side: a square ("width None" before)
        model.decode_image_tokens(tokens, height=16)
    assert model.decode_image_tokens(tokens, height=32).shape == model.decode_image_tokens(tokens).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"assignment": "greedy"}, r"assignment must be one of \['nearest', 'sinkhorn', 'cdb'\], got 'greedy'"),
        ({"codebook_size": 0}, "codebook_size must be a positive integer"),
        ({"norm_num_groups": 5}, "norm_num_groups"),
        ({"resolution": 30}, "resolution"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"code_roles": {"a": [0, 10], "b": [12, 64]}}, "role 'b' has"),
        ({"code_roles": {"a": [0, 10], "b": [10, 50]}}, "add up to codebook_size"),
        ({"prototype_labels": ["x"]}, "prototype_labels must have num_prototypes"),
        ({"channel_multipliers": []}, "channel_multipliers"),
        ({"channel_multipliers": [True, 2, 2]}, "channel_multipliers"),
        ({"dropout": "0.1"}, r"dropout must be a finite number, got '0.1'"),
        ({"commitment_weight": float("nan")}, "commitment_weight must be a finite number"),
        ({"sinkhorn_epsilon": None}, "sinkhorn_epsilon must be a finite number"),
        ({"router_logit_bound": "1"}, "router_logit_bound must be None or a finite number"),
        ({"use_mid_attention": "false"}, "use_mid_attention must be True or False"),
        ({"quantizer_format": "3"}, "quantizer_format must be an integer"),
        ({"prototype_labels": "abcdefgh"}, "prototype_labels must be None or a list of strings"),
        ({"code_roles": {"a": [0.0, 32], "b": [32, 64.0]}}, "role 'a' has"),
        ({"code_roles": [[0, 64]]}, "code_roles must be None or a mapping of role names"),  # an AttributeError before
        ({"code_roles": {"a": 64}}, "code_roles must be None or a mapping of role names"),  # a TypeError before
        ({"channel_multipliers": 3}, "channel_multipliers must be a non-empty list"),  # a TypeError before
        ({"channel_multipliers": None}, "channel_multipliers must be a non-empty list"),
        # Stored as stray attributes while the field kept its default: another model, built without a word.
        ({"asignment": "nearest"}, "CDBVQConfig has no field 'asignment'; did you mean 'assignment'"),
        ({"codebok_size": 8}, "no field 'codebok_size'; did you mean 'codebook_size'"),
        # Accepted: 0 and -1 were then described as "the first CDB router"; 0 gave Python's "not iterable"; 0 and
        # False silently became "no roles".
        ({"quantizer_format": 0}, "quantizer_format must be an integer of at least 1, got 0"),
        ({"quantizer_format": -1}, "quantizer_format must be an integer of at least 1, got -1"),
        ({"prototype_labels": 0}, "prototype_labels must be None or a list of strings, got 0"),
        ({"code_roles": 0}, "code_roles must be None or a mapping of role names"),
        ({"code_roles": False}, "code_roles must be None or a mapping of role names"),
        # Stored as stray attributes while the field kept its default; 1e300 failed in torch's init (float32).
        ({"image_size": 64}, "no field 'image_size'; did you mean 'resolution'"),
        ({"vocab_size": 128}, "no field 'vocab_size'; did you mean 'codebook_size'"),
        ({"router_semantic_scale": 1e300}, r"router_semantic_scale is too large for float32 \(at most 3.4e\+38\)"),
        # transformers looked the name up on torch: "module 'torch' has no attribute 'float17'".
        ({"dtype": "float17"}, "dtype must name a torch dtype such as 'float32'.*got 'float17'"),
        ({"torch_dtype": "bfloat"}, "torch_dtype must name a torch dtype"),
    ],
)
def test_invalid_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_numpy_numbers_are_taken_as_python_numbers():
    # A size read from an array was refused: "resolution must be a positive integer, got np.int64(32)".
    import json

    config = tiny_config(resolution=np.int64(32), dropout=np.float32(0.5), channel_multipliers=[np.int64(1), 2, 2],
                         use_mid_attention=np.bool_(False))  # fmt: skip
    assert type(config.resolution) is int and type(config.dropout) is float and config.use_mid_attention is False
    assert json.loads(config.to_json_string())["channel_multipliers"] == [1, 2, 2]  # JSON can write them
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        tiny_config(resolution=np.array([32]))
    roles = tiny_config(code_roles={"structure": [np.int64(0), np.int64(32)], "texture": [32, 64]}).code_roles
    assert roles["structure"] == [0, 32] and type(roles["structure"][0]) is int


@pytest.mark.parametrize("content, kind", [("null", "null"), ("[1, 2]", "an array"), ('"cdb"', "a string")])
def test_a_config_file_that_holds_no_json_object_is_named(tmp_path, content, kind):
    # It failed inside transformers: "argument of type 'NoneType' is not iterable", "must be a mapping, not list".
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"config.json holds {kind}, not an object of config fields"):
        CDBVQConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"holds {kind}"):
        CDBVQModel.from_pretrained(tmp_path)


def test_a_config_edited_after_its_checks_is_not_saved(tmp_path):
    # `config.codebook_size = -3` was written, and refused only when the folder was next loaded.
    config = tiny_config()
    config.codebook_size = -3
    with pytest.raises(ValueError, match="codebook_size must be a positive integer, got -3"):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config" / "config.json").exists()
    model = tiny_model()
    model.config.dropout = 2.0
    with pytest.raises(ValueError, match="dropout must be in"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "config.json").exists()
    assert tiny_config(dtype="bfloat16").dtype == torch.bfloat16  # a real name still passes


def test_numpy_numbers_are_taken_at_load_too(tmp_path):
    # transformers writes the config as JSON for a log line before any check: "int64 is not JSON serializable".
    tiny_model().save_pretrained(tmp_path)
    assert CDBVQConfig.from_pretrained(tmp_path, dropout=np.float32(0.25)).dropout == 0.25
    assert CDBVQModel.from_pretrained(tmp_path, resolution=np.int64(64)).config.resolution == 64


def test_unknown_keys_unlike_any_field_pass_as_in_transformers():
    # Metadata a saved config.json may carry (or a later version's field) is kept, not refused.
    assert tiny_config(custom_note="x").custom_note == "x"
    assert tiny_config(torch_dtype="float32").dtype == torch.float32


def test_pixel_values_in_zero_one_are_said_to_be_on_the_wrong_scale(caplog):
    # torchvision's ToTensor scale lies inside the [-1, 1] tolerance: it encoded washed-out images without a word.
    from transformers.utils import logging as transformers_logging

    model = tiny_model().eval()
    transformers_logging.warning_once.cache_clear()  # said once per process: another test may have said it
    model.get_image_tokens(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    # Nor a bright image prepared right (a grey card of 200: all in [0, 1], far from 0), which the CLI and training
    # warned about though they had used the processor.
    model.get_image_tokens(CDBVQImageProcessor()(np.full((32, 32, 3), 200, np.uint8), return_tensors="pt").pixel_values)
    assert "pixel_values all lie in [0, 1]" not in caplog.text
    model.get_image_tokens(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert "pixel_values all lie in [0, 1], but the model takes [-1, 1]" in caplog.text


def test_from_pretrained_names_a_misspelled_field_too(tmp_path):
    # A keyword that is no config field reaches the model's constructor: a bare "unexpected keyword argument".
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no field 'asignment'; did you mean 'assignment'"):
        CDBVQModel.from_pretrained(tmp_path, asignment="nearest")
    with pytest.raises(TypeError, match=r"neither config fields nor its own: \['foo_bar_baz'\]"):
        CDBVQModel.from_pretrained(tmp_path, foo_bar_baz=3)
    assert CDBVQModel.from_pretrained(tmp_path, assignment="nearest").config.assignment == "nearest"


def test_config_overrides_at_load_are_checked_like_constructor_arguments(tmp_path):
    # transformers sets overrides after the constructor's checks: a misspelled one was dropped (the default router
    # built without a word) and an invalid one kept until a model was built from it, or saved as it was.
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no field 'asignment'; did you mean 'assignment'"):
        CDBVQConfig.from_pretrained(tmp_path, asignment="nearest")
    with pytest.raises(ValueError, match="assignment must be one of"):
        CDBVQConfig.from_pretrained(tmp_path, assignment="bogus")
    with pytest.raises(ValueError, match="codebook_size must be a positive integer, got -5"):
        CDBVQConfig.from_dict(tiny_config().to_dict(), codebook_size=-5)
    assert CDBVQConfig.from_pretrained(tmp_path, assignment="nearest").assignment == "nearest"
    config, unused = CDBVQConfig.from_pretrained(tmp_path, return_unused_kwargs=True, foo_bar_baz=3)
    assert unused == {"foo_bar_baz": 3}  # left to the caller, as in transformers


def test_a_size_changed_at_load_is_named(tmp_path):
    # transformers raised "You set ignore_mismatched_sizes to False, thus raising an error" and pointed at its table.
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit the config: a size field .*codebook_size.* differs"):
        CDBVQModel.from_pretrained(tmp_path, codebook_size=32)


def test_weights_that_lack_parameters_or_a_file_path_are_refused_at_load(tmp_path):
    # The CLI refused these; from_pretrained returned a model with the missing parameters at random, with only
    # transformers' load report (a dropped decoder, or a state dict saved with a "model." prefix: every parameter).
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert type(CDBVQModel.from_pretrained(tmp_path)) is CDBVQModel  # complete weights load as before
    model, info = CDBVQModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, CDBVQModel) and not info["missing_keys"]
    for kept in ({k: v for k, v in weights.items() if not k.startswith("decoder.")},
                 {f"model.{k}": v for k, v in weights.items()}):  # fmt: skip
        save_file(kept, str(tmp_path / "model.safetensors"))
        for load in (CDBVQModel.from_pretrained, lambda path: AutoModel.from_pretrained(path, trust_remote_code=True)):
            with pytest.raises(ValueError, match=r"do not fit the model its config.json describes: \d+ of its \d+ "
                                                 r"parameters are missing \(e.g. "):  # fmt: skip
                load(tmp_path)
    # A file for the folder: transformers tried to unpickle config.json as weights, inviting weights_only=False.
    with pytest.raises(OSError, match=r"config.json is a file: give the folder"):
        CDBVQModel.from_pretrained(tmp_path / "config.json")
    # transformers' in-memory form (no folder) still loads, and is held to the same rule.
    model = tiny_model()
    loaded = CDBVQModel.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert torch.equal(loaded.quantizer.codebook.weight, model.quantizer.codebook.weight)
    with pytest.raises(ValueError, match="parameters are missing"):
        partial = {key: value for key, value in model.state_dict().items() if not key.startswith("decoder.")}
        CDBVQModel.from_pretrained(None, config=model.config, state_dict=partial)


def test_code_roles_that_are_not_the_weights_are_refused_at_load(tmp_path):
    # The role names and maps come from the config, the routing from the saved per-code roles: an edited config.json
    # made `cdb-vq inspect` list code 19 as structure in one table and texture in the next.
    import json

    from transformers import AutoModel

    trained = {"structure": [0, 32], "texture": [32, 64]}
    tiny_model(code_roles=trained).save_pretrained(tmp_path)
    assert CDBVQModel.from_pretrained(tmp_path).config.code_roles == trained
    with pytest.raises(ValueError, match=r"codes per role, in order: \[32, 32\]\) are not config.code_roles"):
        CDBVQModel.from_pretrained(tmp_path, code_roles={"structure": [0, 16], "texture": [16, 64]})
    config = json.loads((tmp_path / "config.json").read_text())
    config["code_roles"] = {"structure": [0, 8], "texture": [8, 64]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was edited after training"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert CDBVQModel.from_pretrained(tmp_path, device_map="meta", code_roles=trained).device.type == "meta"


@pytest.mark.parametrize("name", ["missing", "./missing", "a/b/missing"])
def test_a_path_that_does_not_exist_is_named_as_such(tmp_path, monkeypatch, name):
    # transformers answered "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / name) if name == "missing" else name
    for loader in (CDBVQConfig, CDBVQModel):
        with pytest.raises(OSError, match="no such folder"):
            loader.from_pretrained(path)


def test_a_folder_under_the_home_folder_loads_by_its_tilde_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_model().save_pretrained(tmp_path / "model")
    assert CDBVQModel.from_pretrained("~/model").config.codebook_size == 64


def test_a_folder_without_config_json_is_refused_by_name(tmp_path):
    # transformers would build the default config and fail on the weights' shapes, 200 lines later.
    from cdb_tokenizer import CDBVQModel

    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    for load in (CDBVQConfig.from_pretrained, CDBVQModel.from_pretrained):
        with pytest.raises(OSError, match=r"has no config\.json: it is not a saved cdb-vq model"):
            load(tmp_path)


def test_code_roles_may_be_any_mapping_of_ranges():
    from types import MappingProxyType

    config = tiny_config(code_roles=MappingProxyType({"a": (0, 32), "b": [32, 64]}))  # a read-only mapping, tuples
    assert config.code_roles == {"a": [0, 32], "b": [32, 64]} and type(config.code_roles) is dict  # JSON's shape


@pytest.mark.parametrize(
    "overrides, message",
    [({"assignment": "Sinkhorn"}, "assignment must be one of"), ({"router_candidates": 0}, "router_candidates must be a positive")],
)
def test_config_fields_set_after_the_check_are_refused_when_the_model_is_built(overrides, message, tmp_path):
    # from_pretrained's keyword overrides (and config.update) set fields after the config's own check: "Sinkhorn"
    # built a model that routed by nearest without a word, 0 candidates crashed deep inside argmax.
    tiny_model(assignment="sinkhorn").save_pretrained(tmp_path)
    model_class = type(tiny_model())
    with pytest.raises(ValueError, match=message):
        model_class.from_pretrained(tmp_path, **overrides)
    config = tiny_config()
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        model_class(config)


def test_config_defaults_and_derived_values():
    config = CDBVQConfig()
    assert config.assignment == "cdb"
    assert config.downsampling_factor == 16
    roles = tiny_config(code_roles={"texture": [32, 64], "structure": [0, 32]})
    assert roles.role_names == ["structure", "texture"]


def test_a_cdb_model_of_quantizer_format_2_loads_and_routes_by_its_own_rule(tmp_path, photo_batch):
    """Format 2 added the raw prototype cosines to the router's scores; format 3 centres them over the candidates.
    A format-2 folder loads and keeps its own rule, so its tokens do not change under the user."""
    from cdb_tokenizer import CDBVQModel

    model = tiny_model(quantizer_format=2, router_semantic_scale=2.0)
    assert model.quantizer.router.semantic_scale.item() == 2.0
    model.set_prototypes(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    model.train()
    model(photo_batch)  # k-means init
    model.eval()
    features = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.quantizer_format == 2
    raw = model.encode(photo_batch, semantic_features=features).image_tokens
    assert torch.equal(loaded.encode(photo_batch, semantic_features=features).image_tokens, raw)
    loaded.quantizer.router.centre_prototype_similarity = True  # the format-3 rule routes these tokens differently
    assert not torch.equal(loaded.encode(photo_batch, semantic_features=features).image_tokens, raw)
    with pytest.raises(ValueError, match="router_semantic_scale must be >= 0"):
        tiny_config(router_semantic_scale=-1.0)


def test_the_router_prototype_term_starts_off_when_no_teacher_distils_the_semantic_head():
    """With `semantic_distillation_weight` 0 nothing trains the semantic head, so its cosines would route at random."""
    assert tiny_model(router_semantic_scale=2.0).quantizer.router.semantic_scale.item() == 2.0
    untaught = tiny_model(router_semantic_scale=2.0, semantic_distillation_weight=0.0)
    assert untaught.quantizer.router.semantic_scale.item() == 0.0
    assert untaught.quantizer.router.semantic_scale.requires_grad  # still a learned weight


def test_a_cdb_model_of_the_first_quantizer_format_is_refused_by_name(tmp_path, photo_batch):
    """A folder saved by the first router (format 1) fails with a message naming the format; `nearest` and
    `sinkhorn` folders of that format, whose rules did not change, load and tokenise as before."""
    import json

    from cdb_tokenizer import CDBVQModel

    for assignment in RULES:
        model = tiny_model(assignment=assignment).eval()
        model.save_pretrained(tmp_path / assignment)
        config_file = tmp_path / assignment / "config.json"
        config = json.loads(config_file.read_text())
        del config["quantizer_format"]
        config.update(router_distance_scale=10.0, ot_imitation_weight=1.0)  # what format 1 wrote
        config_file.write_text(json.dumps(config))
        if assignment == "cdb":
            with pytest.raises(ValueError, match="quantizer format 1"):
                CDBVQModel.from_pretrained(tmp_path / assignment)
        else:
            loaded = CDBVQModel.from_pretrained(tmp_path / assignment).eval()
            assert loaded.config.quantizer_format == 1
            assert torch.equal(loaded.get_image_tokens(photo_batch), model.get_image_tokens(photo_batch))


def test_a_model_saved_for_use_leaves_out_the_teacher_statistics_and_keeps_its_ties(tmp_path, photo_batch, caplog):
    """The running teacher means only serve further training (checkpoints keep the whole state dict); the saved
    folder keeps the ties they produced, and the model loads without a missing-weights warning."""
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from cdb_tokenizer import CDBVQModel

    model = tiny_model()
    model.set_prototypes(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    model.train()
    teacher = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(photo_batch, teacher_features=teacher)
    assert float(model.quantizer.teacher_statistics.counts.sum()) > 0
    assert "quantizer.teacher_statistics.sums" in model.state_dict()  # what a training checkpoint saves
    model.eval().save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("teacher_statistics" in key for key in saved)
    assert "quantizer.signal_statistics.sums" in saved  # code_report reads these: they stay
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            loaded = type(model).from_pretrained(tmp_path).eval()
    finally:
        hf_logging.disable_propagation()
    assert "teacher_statistics" not in caplog.text
    assert float(loaded.quantizer.teacher_statistics.counts.abs().sum()) == 0.0
    assert torch.equal(loaded.quantizer.code_to_prototype, model.quantizer.code_to_prototype)
    assert torch.equal(loaded.get_image_tokens(photo_batch), model.get_image_tokens(photo_batch))


@pytest.mark.parametrize("missing", ["quantizer.usage", "quantizer.router.potentials", "quantizer.router.temperature"])
def test_a_buffer_missing_from_a_checkpoint_gets_its_fresh_value_and_the_rest_stay_loaded(missing, tmp_path, photo_batch):
    # transformers builds the model empty and initialises only what the file lacks. The quantizer used to reset all
    # its buffers (a trained model lost its codebook state, `initialized` included) and left the router's missing
    # ones as uninitialised memory: finite garbage potentials that routed silently.
    from safetensors.torch import load_file, save_file

    model = tiny_model(assignment="cdb").train()
    model(photo_batch)
    with torch.no_grad():
        model.quantizer.router.potentials.normal_()
        model.quantizer.router.temperature.fill_(0.37)
    model.eval().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({name: value for name, value in weights.items() if name != missing}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip

    loaded = type(model).from_pretrained(tmp_path)
    fresh = {"quantizer.usage": torch.full((64,), 1 / 64), "quantizer.router.potentials": torch.zeros(64),
             "quantizer.router.temperature": torch.ones(())}  # fmt: skip
    state = loaded.state_dict()
    assert torch.equal(state[missing], fresh[missing])
    for name in ("quantizer.initialized", "quantizer.prototypes", "quantizer.code_to_prototype", *fresh):
        if name != missing:
            assert torch.equal(state[name], weights[name]), name


def test_config_return_dict_decides_the_output_type_unless_the_call_does(tmp_path, photo_batch):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path, return_dict=False).eval()
    with torch.no_grad():
        assert isinstance(plain(photo_batch), tuple) and isinstance(plain.encode(photo_batch), tuple)
        assert not isinstance(plain(photo_batch, return_dict=True), tuple)
        assert torch.equal(plain.get_image_tokens(photo_batch), model.get_image_tokens(photo_batch))  # inner calls unaffected
        assert not isinstance(model(photo_batch), tuple)


@pytest.mark.parametrize("size", [32.0, True, "32"])
def test_token_grid_size_takes_whole_numbers_of_pixels_only(model, size):
    assert model.token_grid_size(32, np.int64(48)) == (8, 12)
    with pytest.raises(ValueError, match="image height must be a positive integer number of pixels"):
        model.token_grid_size(size, 32)  # 32.0 gave a grid of floats (4.0, 8)


# ------------------------------------------------------------------ decode_image_tokens sizes


def test_decode_image_tokens_with_only_height_or_only_width_decodes_a_square_of_that_side(model):
    # Documented: flat tokens with one of height/width are a square image of that side (not that side by the
    # config's resolution: 48 x 32 would be a 12x8 grid, 96 tokens, and these are 144).
    pixel_values = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = model.get_image_tokens(pixel_values)
    assert tokens.shape == (2, 144)
    expected = model.decode(tokens.view(2, 12, 12))
    for size in ({"height": 48}, {"width": 48}):
        images = model.decode_image_tokens(tokens, **size)
        assert images.shape == (2, 3, 48, 48), size
        torch.testing.assert_close(images, expected, msg=lambda m, s=size: f"{s}: {m}")


def test_decode_image_tokens_with_height_and_width_uses_that_grid_in_raster_order(model):
    pixel_values = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = model.encode(pixel_values).image_tokens
    assert grid.shape == (1, 12, 8)
    images = model.decode_image_tokens(grid.flatten(1), height=48, width=32)
    assert images.shape == (1, 3, 48, 32)
    torch.testing.assert_close(images, model.decode(grid))
    # The same 96 tokens read as the transposed 8x12 grid are another (scrambled) picture: the sizes are not swapped.
    transposed = model.decode_image_tokens(grid.flatten(1), height=32, width=48)
    assert transposed.shape == (1, 3, 32, 48) and not torch.allclose(transposed.transpose(-1, -2), images)


@pytest.mark.parametrize(
    "size, message",
    [
        ({}, r"got 144 tokens per image, but the model's default 8x8 token grid \(32x32 pixels\) needs 64"),
        ({"height": 32}, r"got 144 tokens per image, but a 8x8 token grid needs 64"),
        ({"width": 40}, r"got 144 tokens per image, but a 10x10 token grid needs 100"),
        ({"height": 48, "width": 32}, r"got 144 tokens per image, but a 12x8 token grid needs 96"),
        ({"height": 0}, "height must be a positive integer number of pixels, got 0"),
        ({"width": 48.0}, "width must be a positive integer number of pixels, got 48.0"),
        ({"width": torch.tensor(48.0)}, r"width must be a positive integer number of pixels, got tensor\(48\.\)"),
    ],
)
def test_decode_image_tokens_refuses_a_token_count_that_does_not_fit_the_grid(model, size, message):
    # Never a guessed grid: a wrong one decodes a scrambled picture without any error.
    with pytest.raises(ValueError, match=message):
        model.decode_image_tokens(torch.zeros(1, 144, dtype=torch.long), **size)


@pytest.mark.parametrize("size", [{}, {"height": 32, "width": 32}])
def test_decode_image_tokens_says_when_flat_tokens_are_one_grid_without_its_batch(model, size):
    # An (h, w) grid read as h flat rows of w tokens was refused with no word of the missing batch dimension.
    grid = torch.zeros(8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"a single 8x8 grid needs a batch dimension: image_tokens\[None\]"):
        model.decode_image_tokens(grid, **size)
    assert model.decode_image_tokens(grid[None], **size).shape == (1, 3, 32, 32)


def test_decode_image_tokens_checks_a_size_given_with_a_token_grid(model):
    # `height or width` read height=0 as "not given" for (B, h, w) tokens, while flat tokens refused it.
    grid = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="height must be a positive integer number of pixels, got 0"):
        model.decode_image_tokens(grid, height=0, width=32)
    assert model.decode_image_tokens(grid, height=np.int64(32)).shape == (1, 3, 32, 32)


def test_decode_image_tokens_takes_any_integer_size(model):
    # NumPy and tensor integers (a size read from an array) were refused for flat tokens, not for (B, h, w) ones.
    tokens = torch.zeros(1, 96, dtype=torch.long)
    expected = model.decode_image_tokens(tokens, height=32, width=48)
    for height, width in ((np.int64(32), np.int64(48)), (torch.tensor(32), 48)):
        assert torch.equal(model.decode_image_tokens(tokens, height=height, width=width), expected)
