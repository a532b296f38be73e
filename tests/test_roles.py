"""Code roles: role supervision, role maps, and the per-code readout (`code_report`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from cdb_tokenizer import CDBVQConfig, CDBVQModel
from cdb_tokenizer.quantization_cdb_vq import CDBVQQuantizer, image_signal_features, role_targets
from cdb_tokenizer.tools.roles import role_colours, role_legend, role_map_figure, save_role_map, three_role_ranges

SIZE = 16


def synthetic(kind: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """0: smooth grey gradients; 1: high-frequency grey stripes; 2: flat saturated colour patches. (n, 3, 16, 16)."""
    ys = torch.linspace(0, 1, SIZE)[:, None].expand(SIZE, SIZE)
    images = []
    for _ in range(count):
        r = torch.rand(4, generator=generator)
        if kind == 0:
            value = (r[0] * ys.t() + r[1] * ys) * 0.6 - 0.6
            image = value.expand(3, SIZE, SIZE)
        elif kind == 1:
            period = 2 + int(r[0] * 2)
            line = ((torch.arange(SIZE) // max(1, period // 2)) % 2).float() * 1.6 - 0.8
            image = (line[None, :] if r[1] < 0.5 else line[:, None]).expand(SIZE, SIZE).expand(3, SIZE, SIZE)
        else:
            colour = torch.full((3,), -0.9)
            colour[int(r[0] * 3) % 3] = 0.9
            image = colour[:, None, None].expand(3, SIZE, SIZE)
        images.append(image.clone())
    return torch.stack(images)


def role_config(weight: float, codebook_size: int = 24) -> CDBVQConfig:
    return CDBVQConfig(
        resolution=SIZE, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, use_mid_attention=False,
        norm_num_groups=4, latent_dim=8, codebook_size=codebook_size, codebook_dim=4, semantic_dim=8,
        num_prototypes=4, router_dim=4, code_roles=three_role_ranges(codebook_size), role_supervision_weight=weight,
        # A full-strength role prior: this tests that supervision sorts content. The default (0.35) trades some
        # separation for PSNR on photos (benchmarks/roles.py); on these 60 steps it gives 0.71-0.84.
        role_prior_scale=1.0,
    )  # fmt: skip


def train_on_synthetic(weight: float, steps: int = 60) -> CDBVQModel:
    torch.manual_seed(0)
    model = CDBVQModel(role_config(weight)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.cat([synthetic(kind, 4, generator) for kind in range(3)])
        output = model(images)
        loss = F.mse_loss(output.reconstruction, images) + output.vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def role_shares(model: CDBVQModel) -> list[float]:
    generator = torch.Generator().manual_seed(1)  # held out: other draws than training
    names = model.config.role_names
    expected = ["structure", "texture", "colour"]
    return [float((model.role_map(synthetic(kind, 8, generator)) == names.index(expected[kind])).float().mean()) for kind in range(3)]


@pytest.fixture(scope="module")
def supervised_model() -> CDBVQModel:
    return train_on_synthetic(1.0)


def test_role_supervision_sends_each_kind_of_content_to_its_range(supervised_model):
    shares = role_shares(supervised_model)
    assert all(share >= 0.7 for share in shares), shares


def test_without_supervision_the_ranges_do_not_sort_content():
    # The same run with role_supervision_weight 0: the shares stay far from the 70% the supervised run reaches.
    shares = role_shares(train_on_synthetic(0.0))
    assert min(shares) < 0.7, shares


def signals_of_kind(kinds: torch.Tensor) -> torch.Tensor:
    """Signal features (N, 3) whose target role is `kinds` (0 structure, 1 texture, 2 colour) at the default thresholds."""
    return torch.stack([torch.full_like(kinds, 0.1, dtype=torch.float), (kinds == 1).float(), (kinds == 2).float()], 1)


def roles_quantizer() -> CDBVQQuantizer:
    model = CDBVQModel(role_config(1.0))
    return model.quantizer


def test_each_role_range_is_initialised_and_restarted_on_latents_of_its_kind():
    quantizer = roles_quantizer()
    kinds = torch.arange(300) % 3
    centres = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    latents = centres[kinds] + 0.1 * torch.randn(300, 4)
    quantizer.initialize_codebook(latents, signal_features=signals_of_kind(kinds))
    nearest_centre = torch.cdist(quantizer.codes(), centres).argmin(-1)
    assert torch.equal(nearest_centre, quantizer.code_to_role)
    quantizer.usage.fill_(1 / 24)
    quantizer.usage[[0, 9, 17]] = 0.0  # one dead code in each range
    new_kinds = torch.tensor([2, 2, 1, 0, 1, 2] * 5)
    new_latents = centres[new_kinds] * -1  # far from the old codes: a restarted code is where it was put
    assert quantizer.restart_dead_codes(new_latents, signal_features=signals_of_kind(new_kinds)) == 3
    moved = torch.cdist(quantizer.codes()[[0, 9, 17]], -centres).argmin(-1)
    assert moved.tolist() == [0, 1, 2]


def test_potentials_balance_codes_within_a_role_range_not_across_ranges():
    quantizer = roles_quantizer()
    router = quantizer.router
    share = torch.zeros(24)
    share[:8] = 1 / 8  # every token in the structure range, spread evenly over it
    router.update_potentials(share, torch.tensor(1.0), step=0.1, bound=1.0, target_share=quantizer._target_share(share))
    assert bool((router.potentials == 0).all())  # balanced within the range: nothing to correct
    share = torch.zeros(24)
    share[:2] = 1 / 2  # two structure codes take it all
    router.update_potentials(share, torch.tensor(1.0), step=0.1, bound=1.0, target_share=quantizer._target_share(share))
    assert bool((router.potentials[:2] < 0).all()) and bool((router.potentials[2:8] > 0).all())
    assert bool((router.potentials[8:] == router.potentials[8]).all())  # the other ranges are not pulled in


def test_role_targets_follow_the_thresholds():
    config = role_config(1.0)
    names = config.role_names
    signals = torch.tensor([[0.5, 0.0, 0.0], [0.1, 1.0, 0.9], [0.1, 0.0, 0.9], [0.1, 0.019, 0.39]])
    expected = ["structure", "texture", "colour", "structure"]
    assert role_targets(signals, config).tolist() == [names.index(name) for name in expected]
    # image signals of the synthetic kinds give the intended targets
    generator = torch.Generator().manual_seed(0)
    for kind, name in enumerate(["structure", "texture", "colour"]):
        features = image_signal_features(synthetic(kind, 2, generator), 2).permute(0, 2, 3, 1).reshape(-1, 3)
        assert (role_targets(features, config) == names.index(name)).float().mean() > 0.9


def test_role_supervision_term_is_returned_and_weighted():
    images = synthetic(1, 2, torch.Generator().manual_seed(0))
    losses = {}
    for weight in (0.5, 2.0):
        torch.manual_seed(0)
        model = CDBVQModel(role_config(weight)).train()
        output = model(images)
        assert output.role_supervision_loss is not None and output.role_supervision_loss > 0
        losses[weight] = (output.vq_loss, output.role_supervision_loss)
    (vq_a, term_a), (vq_b, term_b) = losses[0.5], losses[2.0]
    assert torch.allclose(term_a, term_b)
    assert torch.allclose(vq_b - vq_a, 1.5 * term_a, atol=1e-5)
    # off by default, and never at inference
    model = CDBVQModel(role_config(0.0)).train()
    assert model(images).role_supervision_loss is None
    model = CDBVQModel(role_config(1.0)).eval()
    assert model(images).role_supervision_loss is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"role_supervision_weight": -1.0}, "role_supervision_weight must be >= 0"),
        ({"role_supervision_weight": 1.0}, "role_supervision_weight > 0 needs"),  # no roles
        ({"role_supervision_weight": 1.0, "code_roles": {"a": [0, 32], "b": [32, 64]}}, "including 'structure'"),
        ({"role_supervision_weight": 1.0, "assignment": "nearest", "code_roles": three_role_ranges(64)}, "assignment='cdb'"),
        ({"role_texture_threshold": -0.1}, "role_texture_threshold must be >= 0"),
    ],
)
def test_bad_role_fields_are_refused(fields, message):
    from conftest import tiny_config

    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_three_role_ranges_tile_the_codebook():
    assert three_role_ranges(10) == {"structure": [0, 4], "texture": [4, 7], "colour": [7, 10]}
    ranges = three_role_ranges(1024, shares=(2, 1, 1))
    assert ranges == {"structure": [0, 512], "texture": [512, 768], "colour": [768, 1024]}
    with pytest.raises(ValueError, match="at least 3 codes"):
        three_role_ranges(2)
    # the equal-share preset as trained models record it
    assert three_role_ranges(64) == {"structure": [0, 22], "texture": [22, 43], "colour": [43, 64]}
    assert three_role_ranges(16384) == {"structure": [0, 5462], "texture": [5462, 10923], "colour": [10923, 16384]}


@pytest.mark.parametrize("codebook_size", [3, 4, 7, 64, 1000])
@pytest.mark.parametrize("shares", [(1, 1, 1), (1, 100, 1), (100, 1, 1), (1, 1, 1e6), (0.5, 0.25, 0.25)])
def test_three_role_ranges_give_every_role_a_code_whatever_the_shares(codebook_size, shares):
    ranges = list(three_role_ranges(codebook_size, shares).values())
    assert ranges[0][0] == 0 and ranges[-1][1] == codebook_size
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))  # consecutive: they tile [0, K)
    assert all(end - start >= 1 for start, end in ranges), ranges


def test_role_map_is_deterministic_batch_independent_and_drawable(supervised_model, tmp_path):
    images = torch.cat([synthetic(kind, 2, torch.Generator().manual_seed(3)) for kind in range(3)])
    role_map = supervised_model.role_map(images)
    assert role_map.shape == (6, 8, 8) and role_map.dtype == torch.long
    assert torch.equal(role_map, supervised_model.role_map(images))
    tokens = supervised_model.get_image_tokens(images)
    for i in (0, 2, 5):  # one image of each kind, alone: the same tokens and roles as within the batch
        assert torch.equal(tokens[i : i + 1], supervised_model.get_image_tokens(images[i : i + 1]))
        assert torch.equal(role_map[i : i + 1], supervised_model.role_map(images[i : i + 1]))
    figure = role_map_figure(images, role_map, supervised_model.config.role_names)
    assert figure.shape[0] == 3 and 0 <= float(figure.min()) and float(figure.max()) <= 1
    picture = save_role_map(images, role_map, supervised_model.config.role_names, tmp_path / "new" / "role_map.png")
    assert picture.is_file()  # its folder is created, as the other save_* functions do
    # a model without roles maps every token to role 0
    assert int(tiny_model().eval().role_map(torch.zeros(1, 3, 32, 32)).max()) == 0


@pytest.mark.parametrize(
    "role_names",
    [
        ["texture", "other"],
        list("abcdef"),
        ["a", "structure", "b", "colour"],
        [f"role{i}" for i in range(40)] + ["texture"],  # past the named colours
    ],
)
def test_every_role_of_a_model_gets_its_own_named_colour(role_names):
    # Other names cycled a five-colour palette that starts with the preset's: "texture: red, other: red", and a
    # sixth role took the first one's colour again; two colours were named only "colour 3" and "colour 4".
    colours = role_colours(role_names)
    names, rgbs = [name for name, _ in colours], [rgb for _, rgb in colours]
    assert len(set(names)) == len(set(rgbs)) == len(role_names)
    fixed = {
        "structure": ("blue", (0.15, 0.45, 1.0)),
        "texture": ("red", (1.0, 0.25, 0.1)),
        "colour": ("green", (0.1, 0.85, 0.25)),
    }
    for role, colour in zip(role_names, colours):
        if role in fixed:
            assert colour == fixed[role]
        elif colour[0].startswith("#"):  # past the named colours: named by the hex code of the colour drawn
            assert colour[0] == "#" + "".join(f"{round(channel * 255):02x}" for channel in colour[1])
    assert role_legend(role_names) == ", ".join(f"{role}: {name}" for role, name in zip(role_names, names))
    assert role_legend(["texture", "other"]) == "texture: red, other: orange"
    assert role_legend(["structure", "texture", "colour"]) == "structure: blue, texture: red, colour: green"


def test_a_role_map_draws_each_role_in_its_own_colour():
    # The training picture of roles {"texture", "other"} drew both legend bars and every overlay cell in one red.
    images = torch.zeros(1, 3, 16, 16)
    role_map = torch.tensor([[[0, 1], [1, 0]]])
    figure = role_map_figure(images, role_map, ["texture", "other"])
    legend, overlay = figure[:, 2:10], figure[:, 12 + 2 : 12 + 18, 2 + 16 : 2 + 32]
    expected = torch.tensor([rgb for _, rgb in role_colours(["texture", "other"])])
    assert torch.allclose(legend[:, 4, 4], expected[0]) and torch.allclose(legend[:, 4, -6], expected[1])
    assert (legend[:, 4, 4] - legend[:, 4, -6]).abs().max() > 0.3  # two bars, two colours
    cells = overlay[:, ::8, ::8].permute(1, 2, 0).reshape(4, 3)  # one pixel of each token's cell
    assert torch.allclose(cells, 0.55 * 0.5 + 0.45 * expected[role_map.flatten()])


def test_code_report_has_one_record_per_code_and_round_trips(supervised_model, tmp_path):
    report = supervised_model.code_report()
    assert [record["code"] for record in report] == list(range(24))
    assert math.isclose(sum(record["usage"] for record in report), 1.0, rel_tol=1e-5)
    assert {record["role"] for record in report} == {"structure", "texture", "colour"}
    seen = [record for record in report if record["laplacian"] is not None]
    assert seen, "training must have recorded signal statistics"
    # texture codes won the stripes: their mean Laplacian energy is far above that of the structure codes
    mean = lambda role: sum(r["laplacian"] * r["signal_weight"] for r in seen if r["role"] == role) / sum(  # noqa: E731
        r["signal_weight"] for r in seen if r["role"] == role
    )
    assert mean("texture") > 5 * mean("structure")  # ~7x with the defaults (a few stripes reach structure codes early)
    supervised_model.save_pretrained(tmp_path)
    loaded = CDBVQModel.from_pretrained(tmp_path)
    assert loaded.code_report() == report


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_cast_leaves_the_code_statistics_exact(dtype):
    # The buffers were cast to half precision and back to float32: still float32, but rounded (`inspect --dtype
    # bfloat16` reported other usages), and in float16 a long-unused code's statistics flushed to zero.
    model = tiny_model(code_roles={"structure": [0, 22], "texture": [22, 43], "colour": [43, 64]})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.quantizer.usage.copy_(torch.rand(64, generator=generator) / 32)
        model.quantizer.signal_statistics.sums.copy_(torch.rand(64, 3, generator=generator) * 1e-8)
        model.quantizer.signal_statistics.counts.copy_(torch.rand(64, generator=generator) * 1e-8)
    before = model.code_report()
    assert model.to(dtype).code_report() == before


def test_a_model_saved_before_the_code_statistics_loads_with_its_codebook_state(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(code_roles=three_role_ranges(64)).train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    # Neither the signal nor the teacher statistics (both added after the first release of the quantizer format).
    save_file({k: v for k, v in weights.items() if "_statistics." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    loaded = CDBVQModel.from_pretrained(tmp_path)
    assert bool(loaded.quantizer.initialized)
    assert torch.equal(loaded.quantizer.usage, model.quantizer.usage)
    assert torch.equal(loaded.quantizer.router.potentials, model.quantizer.router.potentials)
    assert all(record["laplacian"] is None for record in loaded.code_report())
    assert float(loaded.quantizer.teacher_statistics.counts.abs().sum()) == 0.0


def test_training_restarts_read_the_signal_features_of_the_model_output():
    from cdb_tokenizer.modeling_cdb_vq import flatten_grid
    from cdb_tokenizer.tools.steps import restart_dead_codes

    torch.manual_seed(0)
    model = CDBVQModel(role_config(1.0)).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([synthetic(kind, 2, generator) for kind in range(3)])
    output = model(images)
    model.quantizer.usage.fill_(1 / 24)
    model.quantizer.usage[[1, 20]] = 0.0  # a dead structure code and a dead colour code
    assert restart_dead_codes(model, output, seed=0) == 2
    latents = model.quantizer.prepare_latents(flatten_grid(output.latents.detach()))
    kinds = role_targets(flatten_grid(output.signal_features), model.config)
    for code, kind in ((1, 0), (20, 2)):
        source = (latents - model.quantizer.codes()[code]).abs().amax(-1).argmin()
        assert int(kinds[source]) == kind


def test_role_prior_scale_scales_the_role_term_of_the_router():
    kinds = torch.arange(30) % 3
    signals, latents = signals_of_kind(kinds), torch.randn(30, 4)
    priors = []
    for weight in (1.0, 0.3):
        config = role_config(1.0)
        config.role_prior_scale, config.router_candidates = weight, 1  # one candidate: no learned term
        torch.manual_seed(0)
        quantizer = CDBVQModel(config).quantizer
        quantizer.router.role_head[-1].weight.data.normal_()  # a head with an opinion (it starts uniform)
        scores = quantizer.router(latents, quantizer.codes(), torch.zeros(30, 8), quantizer.prototypes,
                                  quantizer.code_to_prototype, signals, quantizer.code_to_role)  # fmt: skip
        priors.append((scores.candidates, scores.prior_logits.detach()))
    (candidates, full), (scaled_candidates, scaled) = priors
    same = (candidates == scaled_candidates).all(-1)  # the prior is added before the candidate is picked
    assert float(full.abs().max()) > 0.1 and int(same.sum()) >= 20
    torch.testing.assert_close(scaled[same], 0.3 * full[same])


@pytest.mark.parametrize("roles", [3, 12, 17, 30])
def test_every_role_has_a_legend_bar_in_a_one_image_role_map(roles):
    # Bars were cut 2 pixels in from each side of their block: from 17 roles at 32 pixels the strip was blank.
    names = [f"r{i}" for i in range(roles)]
    figure = role_map_figure(torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, 8, dtype=torch.long), names)
    bars = {tuple(pixel) for pixel in (figure[:, 2:10].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert len(bars - {(255, 255, 255)}) == roles


def test_codebook_usage_shades_each_role_range_in_its_role_map_colour(tmp_path):
    # The ranges were shaded in matplotlib's default cycle (texture orange) while role maps draw texture red.
    import numpy as np
    from PIL import Image

    from cdb_tokenizer.tools.evaluation import save_usage_plot

    roles = {"structure": [0, 8], "texture": [8, 16], "other": [16, 24]}
    path = save_usage_plot(torch.arange(1.0, 25.0), tmp_path / "usage.png", code_roles=roles)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(float) / 255
    for _, rgb in role_colours(list(roles)):
        shade = 0.15 * np.array(rgb) + 0.85  # the 15% alpha span over the white axes
        assert np.abs(pixels - shade).max(-1).min() < 0.02, rgb
