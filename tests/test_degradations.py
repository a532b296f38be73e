"""Degradations for restoration training: seeded, shape/dtype/range preserving, zero strength is the identity."""

import math

import pytest
import torch

from cdb_tokenizer.tools.degradations import DEGRADATIONS, Degradation, canonical_spec, degrade

STRENGTHS = {"gaussian_blur": 1.5, "motion_blur": 7, "noise": 0.05, "jpeg": 30, "downscale": 2}


@pytest.fixture
def images(photo_batch):
    return photo_batch.clone()


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_each_degradation_is_seeded_and_keeps_shape_dtype_and_range(images, name):
    spec = f"{name}:{STRENGTHS[name]}"
    first = degrade(images, spec, seed=7)
    assert torch.equal(first, degrade(images, spec, seed=7))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert float(first.min()) >= -1 and float(first.max()) <= 1
    assert (first - images).abs().mean() > 1e-3  # it did something
    assert torch.equal(degrade(images, f"{name}:0", seed=7), images.clamp(-1, 1))
    half = degrade(images.half(), spec, seed=7)
    assert half.dtype == torch.float16 and half.shape == images.shape
    double = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(degrade(double, f"{name}:0"), double)  # exactly: not a round trip through float32
    assert degrade(double, spec).dtype == torch.float64


def test_random_parts_change_with_the_seed_and_compose(images):
    assert not torch.equal(degrade(images, "noise:0.05", seed=1), degrade(images, "noise:0.05", seed=2))
    assert not torch.equal(degrade(images, "gaussian_blur:0.5-3", seed=1), degrade(images, "gaussian_blur:0.5-3", seed=2))
    chained = degrade(images, "gaussian_blur:1.5+noise:0.05", seed=3)
    assert not torch.equal(chained, degrade(images, "gaussian_blur:1.5", seed=3))
    either = degrade(images, "gaussian_blur:2|jpeg:20", seed=4)
    assert torch.equal(either, degrade(images, "gaussian_blur:2 | jpeg:20", seed=4))
    assert canonical_spec("gaussian_blur:1.50 + noise:0.02-0.05|jpeg:30") == "gaussian_blur:1.5+noise:0.02-0.05|jpeg:30"


@pytest.mark.parametrize("spec", ["gaussian_blur:1 2", "noise:0 0.05", "motion_blur:1 0", "gaussian_ blur:1"])
def test_a_space_inside_a_name_or_number_is_refused(spec):
    # Spaces were deleted before parsing: "gaussian_blur:1 2" (meant as a range) trained at sigma 12.
    with pytest.raises(ValueError, match="stray space"):
        canonical_spec(spec)
    assert canonical_spec(" gaussian_blur : 1 - 2 + noise:0.02 | jpeg:30 ") == "gaussian_blur:1-2+noise:0.02|jpeg:30"


def test_the_recorded_spec_keeps_every_digit():
    # The config, the card and `restore` showed "gaussian_blur:1.23457" for a model trained at 1.2345678.
    assert canonical_spec("gaussian_blur:1.2345678") == "gaussian_blur:1.2345678"
    assert canonical_spec("gaussian_blur:1.50-2.0") == "gaussian_blur:1.5-2"


def test_alternatives_give_each_image_exactly_one_of_them_applied_alone(images):
    batch = images.repeat(4, 1, 1, 1)  # 16 images: both alternatives turn up
    alone = {spec: degrade(batch, spec) for spec in ("gaussian_blur:2", "jpeg:20")}  # no randomness in either
    either = degrade(batch, "gaussian_blur:2|jpeg:20", seed=5)
    picked = []
    for index, image in enumerate(either):
        matches = [spec for spec, degraded in alone.items() if torch.equal(image, degraded[index])]
        assert len(matches) == 1, (index, matches)  # one alternative, not both chained and not none
        picked.append(matches[0])
    assert set(picked) == set(alone)  # drawn per image, not once for the batch


def test_blur_removes_high_frequencies(images):
    from cdb_tokenizer.tools.losses import laplacian

    for spec in ("gaussian_blur:1.5", "motion_blur:9", "downscale:4"):
        assert laplacian(degrade(images, spec)).abs().mean() < 0.6 * laplacian(images).abs().mean(), spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blur:1", "unknown degradation 'blur'"),
        ("gaussian_blur", "needs a strength"),
        ("gaussian_blur:abc", "bad strength 'abc' for gaussian_blur"),
        ("noise:5", "between 0 and 1"),
        ("noise:0.2-0.1", "LOW <= HIGH"),
        ("jpeg:0.5", "JPEG quality is 1-100"),
        ("downscale:0.5", "a factor is >= 1"),
        ("jpeg:0-30", "JPEG quality is 1-100"),  # would draw quality 0, the harshest JPEG, not "off"
        ("downscale:0-4", "a factor is >= 1"),
        ("", "non-empty"),
        ("gaussian_blur:1|", "empty alternative in 'gaussian_blur:1\\|'"),
        ("gaussian_blur:1++noise:0.1", "empty part in 'gaussian_blur:1\\+\\+noise:0.1'"),
        ("noise:0.1+", "empty part"),
        (":1", "missing degradation name"),
        # Python's float() read these as 10 and 1: a typo and a script's digit silently became strengths.
        ("gaussian_blur:1_0", "bad strength '1_0' for gaussian_blur"),
        ("gaussian_blur:\u0661", "bad strength '\u0661' for gaussian_blur"),
    ],
)
def test_bad_specs_are_refused_by_name(images, spec, message):
    with pytest.raises(ValueError, match=message):
        degrade(images, spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ([Degradation("noise", -5, -5)], "bad strength '-5' for noise: it must be between 0 and 1"),
        ([Degradation("nosie", 1, 1)], "unknown degradation 'nosie'"),
        ([Degradation("noise", 0.2, 0.1)], "LOW <= HIGH"),
        ([Degradation("jpeg", 0, 30)], "JPEG quality is 1-100"),
        ([Degradation("noise", "1", "1")], "must be numbers"),
        ([], "non-empty list of Degradation"),
        (Degradation("noise", 0.1, 0.1), "non-empty list of Degradation"),
    ],
)
def test_a_list_spec_is_held_to_the_rules_of_a_string_spec(images, spec, message):
    with pytest.raises(ValueError, match=message):
        degrade(images, spec)


def test_a_list_spec_degrades_like_its_string(images):
    chain = [Degradation("gaussian_blur", 0.5, 2), Degradation("noise", 0.05, 0.05)]
    assert torch.equal(degrade(images, chain, seed=3), degrade(images, "gaussian_blur:0.5-2+noise:0.05", seed=3))


@pytest.mark.parametrize("spec", ["gaussian_blur:1.5", "gaussian_blur:1.5|noise:0.05"])
def test_an_empty_batch_comes_back_empty(images, spec):
    degraded = degrade(images[:0], spec)
    assert degraded.shape == (0, *images.shape[1:]) and degraded.dtype == images.dtype


@pytest.mark.parametrize("spec", ["gaussian_blur:0.5-2", "motion_blur:9"])  # motion_blur:9: only the direction drawn
def test_strength_ranges_and_motion_direction_are_drawn_per_image(images, spec):
    twins = images[:1].repeat(4, 1, 1, 1)  # the same image four times
    degraded = degrade(twins, spec, seed=5)
    assert all(not torch.equal(degraded[0], other) for other in degraded[1:]), spec  # not once for the batch
    assert torch.equal(degraded, degrade(twins, spec, seed=5))  # and the seed still gives the same batch


def test_strengths_in_exponent_notation_parse():
    from cdb_tokenizer.tools.degradations import canonical_spec, parse_degradations

    assert [(d.low, d.high) for d in parse_degradations("noise:1e-3")] == [(0.001, 0.001)]
    assert [(d.low, d.high) for d in parse_degradations("noise:1e-3-2e-2")] == [(0.001, 0.02)]
    assert [(d.low, d.high) for d in parse_degradations("motion_blur:3-11")] == [(3.0, 11.0)]
    assert canonical_spec(canonical_spec("noise:1e-5-1e-4")) == canonical_spec("noise:1e-5-1e-4")


@pytest.mark.parametrize("name", DEGRADATIONS)
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_any_channel_count_keeps_its_shape(name, channels):
    images = torch.rand(2, channels, 16, 16) * 2 - 1
    degraded = degrade(images, f"{name}:{STRENGTHS[name]}|{name}:{STRENGTHS[name]}", seed=1)
    assert degraded.shape == images.shape and (degraded - images).abs().mean() > 1e-3


def test_derived_seeds_stay_in_range_and_never_collide():
    from cdb_tokenizer.tools.steps import derived_seed

    generator = torch.Generator()
    for seed in (0, 2**32 - 1, 10**12):  # any seed train.py accepts, and larger
        generator.manual_seed(derived_seed(seed, 10**7, 63, 4095))
    seeds = {derived_seed(0, step, micro_batch, 0) for step in range(3) for micro_batch in range(130)}
    assert len(seeds) == 3 * 130  # (step 0, micro-batch 64) used to be (step 1, micro-batch 0)


def test_the_gaussian_blur_is_the_two_dimensional_convolution_in_two_passes():
    from cdb_tokenizer.tools.degradations import _filter, gaussian_blur

    image = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for sigma in (0.7, 2.5, 7.0):  # at 7.0 the radius (21) passes the height (20): replicate padding
        radius = max(1, math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        line = torch.exp(-(x**2) / (2 * sigma**2))
        line = line / line.sum()
        expected = _filter(image, line[:, None] * line[None, :])
        torch.testing.assert_close(gaussian_blur(image, sigma), expected, rtol=0, atol=1e-6)
    # Not symmetric in its two directions: the separable passes put the row factor on rows, the column one on columns.
    rows, columns = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.1, 0.1, 0.8])
    torch.testing.assert_close(_filter(image, rows, columns=columns), _filter(image, rows[:, None] * columns[None, :]), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_degradations_run_on_the_batch_device_and_draw_as_on_the_cpu():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = "gaussian_blur:0.5-2|motion_blur:3-9+noise:0.02|jpeg:40|downscale:2"
    on_gpu = degrade(images.cuda(), spec, seed=7)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), degrade(images, spec, seed=7), rtol=0, atol=1e-4)
