"""The quantizer on its own: chunking, Sinkhorn balance, router, roles, codebook upkeep."""

import math
import re

import pytest
import torch

import cdb_tokenizer.quantization_cdb_vq as quantization
from cdb_tokenizer.quantization_cdb_vq import (
    CDBVQQuantizer,
    image_signal_features,
    kmeans,
    nearest_codes,
    sinkhorn_potentials,
    sinkhorn_cost,
)
from conftest import tiny_model


def quantizer(**overrides) -> CDBVQQuantizer:
    """A quantizer with its buffers filled, as the model's `_init_weights` does."""
    return tiny_model(**overrides).quantizer


def clustered_latents(num: int = 512, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Latents bunched around two points: nearest-neighbour assignment piles onto a handful of codes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, dim, generator=generator) * 3
    return centres[torch.arange(num) % 2] + 0.3 * torch.randn(num, dim, generator=generator)


def test_chunked_and_unchunked_nearest_agree():
    latents, codes = torch.randn(1000, 16), torch.randn(300, 16)
    full = torch.cdist(latents, codes).argmin(-1)
    assert torch.equal(nearest_codes(latents, codes, max_entries=300 * 7), full)
    assert torch.equal(nearest_codes(latents, codes, max_entries=10**9), full)


def test_chunked_and_unchunked_sinkhorn_agree():
    latents, codes = torch.randn(500, 8), torch.randn(64, 8)
    small = sinkhorn_potentials(latents, codes, 10.0, 5, max_entries=64 * 33)
    large = sinkhorn_potentials(latents, codes, 10.0, 5, max_entries=10**9)
    torch.testing.assert_close(small.column, large.column, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("assignment", ["nearest", "sinkhorn", "cdb"])
def test_chunked_and_unchunked_assignment_agree(assignment):
    latents = torch.randn(700, 8)
    semantic = torch.randn(700, 32)
    results = []
    for chunk_size in (64 * 50, 10**8):
        module = quantizer(assignment=assignment, assignment_chunk_size=chunk_size)
        module.initialize_codebook(latents[:256])
        module.train()
        results.append(module(latents, semantic_features=semantic).indices)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("assignment", ["nearest", "sinkhorn", "cdb"])
def test_no_score_block_exceeds_the_chunk_budget(assignment, monkeypatch):
    """The N x K matrices are built in row chunks of at most `assignment_chunk_size` entries."""
    shapes = []
    original = quantization.squared_distances

    def recording(latents, codes):
        shapes.append((latents.shape[0], codes.shape[0]))
        return original(latents, codes)

    monkeypatch.setattr(quantization, "squared_distances", recording)
    module = quantizer(assignment=assignment, assignment_chunk_size=64 * 40)
    module.initialize_codebook(torch.randn(256, 8))
    module.train()
    output = module(torch.randn(1000, 8), semantic_features=torch.randn(1000, 32))
    if assignment == "cdb":
        output.quantized.sum().backward()
    assert shapes and max(rows * codes for rows, codes in shapes) <= 64 * 40
    assert any(rows == 40 for rows, _ in shapes)


def test_sinkhorn_plan_is_balanced():
    latents, codes = clustered_latents(600), torch.randn(50, 8)
    potentials = sinkhorn_potentials(latents, codes, epsilon=10.0, iterations=200, max_entries=10**9)
    cost = sinkhorn_cost(latents, codes)
    row = potentials.row_potential(cost, latents.shape[0])
    plan = (potentials.plan_logits(cost) + row[:, None]).exp()
    torch.testing.assert_close(plan.sum(0), torch.full((50,), 1 / 50), atol=2e-4, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((600,), 1 / 600), atol=1e-6, rtol=0)


def test_sinkhorn_spreads_usage_where_nearest_collapses():
    latents = clustered_latents(1024)
    usage = {}
    for assignment in ("nearest", "sinkhorn"):
        module = quantizer(assignment=assignment)
        torch.nn.init.normal_(module.codebook.weight)
        module.initialized.fill_(True)
        module.train()
        usage[assignment] = module(latents).indices.unique().numel()
    assert usage["nearest"] <= 16
    assert usage["sinkhorn"] >= 48


def test_sinkhorn_is_nearest_at_inference():
    module = quantizer(assignment="sinkhorn")
    module.initialize_codebook(torch.randn(256, 8))
    module.eval()
    latents = clustered_latents(300)
    assert torch.equal(module(latents).indices, nearest_codes(latents, module.codes(), 10**9))


def test_router_starts_as_nearest():
    """With zero potentials and tiny keys at init, the router's argmax is the nearest code."""
    module = quantizer(assignment="cdb")
    module.initialize_codebook(torch.randn(512, 8) * 3)
    module.eval()
    latents = clustered_latents(512)
    assert torch.equal(module(latents).indices, nearest_codes(latents, module.codes(), 10**9))


def two_dimensional_mixture(num: int, generator: torch.Generator) -> torch.Tensor:
    """A lopsided Gaussian mixture in 2-D: 60% / 30% / 10% of the mass."""
    centres = torch.tensor([[-3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    component = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), num, replacement=True, generator=generator)
    return centres[component] + 0.7 * torch.randn(num, 2, generator=generator)


def balanced_transport_potentials(points: torch.Tensor, codes: torch.Tensor, iterations: int = 1000) -> torch.Tensor:
    """Column potentials of a near-exact (small-entropy) balanced transport of `points` to `codes` (squared L2)."""
    cost = quantization.squared_distances(points, codes)
    epsilon = 0.003 * float(cost.mean())
    potentials = torch.zeros(codes.shape[0])
    for _ in range(iterations):
        mass = ((potentials - cost) / epsilon).softmax(-1).mean(0)
        potentials = potentials - epsilon * (mass * codes.shape[0]).log()
    return potentials


def test_router_learns_the_balanced_transport_of_the_data_distribution():
    """2-D toy, K = 16 fixed codes: after training, the router's batch-independent argmax is the exact balanced
    assignment (semi-discrete OT, from a large-sample Sinkhorn with small entropy) on >= 95% of fresh points, and
    every code takes 1/K +- 20% of the mass, where nearest neighbour is far from balanced."""
    generator = torch.Generator().manual_seed(0)
    module = quantizer(
        assignment="cdb", codebook_size=16, codebook_dim=2, potential_step=0.3, potential_bound=50.0,
        dead_code_threshold=0.0, ema_decay=None,
    )  # fmt: skip
    module.initialize_codebook(two_dimensional_mixture(200, generator))
    codes = module.codes().detach().clone()
    module.train()
    with torch.no_grad():
        for _ in range(400):
            module(two_dimensional_mixture(2048, generator))
    assert torch.equal(codes, module.codes())  # only the rule was trained, the codes stayed put

    module.eval()
    points = two_dimensional_mixture(20000, generator)
    chosen = module(points).indices
    exact = balanced_transport_potentials(two_dimensional_mixture(8000, generator), codes)
    balanced = (quantization.squared_distances(points, codes) - exact).argmin(-1)
    nearest = nearest_codes(points, codes, 10**9)
    assert float((chosen == balanced).float().mean()) >= 0.95
    mass = torch.bincount(chosen, minlength=16).float() / points.shape[0] * 16
    assert float(mass.min()) >= 0.8 and float(mass.max()) <= 1.2, mass
    nearest_mass = torch.bincount(nearest, minlength=16).float() / points.shape[0] * 16
    assert float(nearest_mass.max()) > 1.5 or float(nearest_mass.min()) < 0.5


def test_router_re_ranks_only_its_candidates_within_the_logit_bound():
    module = quantizer(assignment="cdb", router_logit_bound=1.5, router_candidates=4)
    module.initialize_codebook(torch.randn(256, 8))
    module.router.code_keys.data = torch.randn(64, 8) * 100
    module.eval()
    latents, semantic = torch.randn(300, 8), torch.randn(300, 32)
    scores = module.router(latents, module.codes(), semantic, module.prototypes, module.code_to_prototype)
    assert scores.candidates.shape == (300, 4)
    swing = float(scores.prior_logits.detach().abs().max())
    assert 1.0 < swing <= 1.5
    chosen = module(latents, semantic_features=semantic).indices
    cost = module.router.transport_cost(quantization.squared_distances(latents, module.codes()))
    ranks = (cost < cost.gather(1, chosen[:, None])).sum(-1)
    assert int(ranks.max()) < 4  # always one of the 4 codes of lowest transport cost
    assert float((ranks > 0).float().mean()) > 0.1  # and the learned term does re-rank them
    # The chosen code's cost is never more than 2 * bound above the lowest cost (in temperatures).
    assert bool((cost.gather(1, chosen[:, None])[:, 0] - cost.min(-1).values <= 3.0 + 1e-4).all())


def test_one_candidate_is_the_pure_transport_assignment():
    module = quantizer(assignment="cdb", router_candidates=1)
    module.initialize_codebook(torch.randn(256, 8))
    module.router.potentials.copy_(torch.randn(64) * float(module.router.temperature))
    module.router.code_keys.data = torch.randn(64, 8) * 100
    module.eval()
    latents = torch.randn(300, 8)
    cost = quantization.squared_distances(latents, module.codes()) - module.router.potentials
    assert torch.equal(module(latents, semantic_features=torch.randn(300, 32)).indices, cost.argmin(-1))


def test_potentials_rise_for_idle_codes_and_fall_for_busy_ones():
    module = quantizer(assignment="cdb", potential_step=0.05, potential_bound=5.0)
    module.initialize_codebook(torch.randn(256, 8))
    module.train()
    busy = module.codes()[:1].repeat(200, 1) + 1e-3 * torch.randn(200, 8)
    with torch.no_grad():
        module(busy)
    potentials = module.router.potentials
    assert float(potentials[0]) < 0 and bool((potentials[1:] > 0).all())
    assert abs(float(potentials.mean())) < 1e-5
    with torch.no_grad():
        for _ in range(200):
            module(busy)
    assert float(potentials.abs().max()) <= 5.0 * float(module.router.temperature) + 1e-5


def test_balance_loss_is_kl_of_the_batch_average_to_uniform():
    module = quantizer(assignment="cdb", balance_weight=0.1)
    module.initialize_codebook(torch.randn(256, 8))
    module.train()
    latents = torch.randn(300, 8)
    with torch.no_grad():  # before the forward, which moves the potentials and the temperature
        scores = module.router(
            module.prepare_latents(latents), module.codes(), torch.zeros(300, 32), module.prototypes,
            module.code_to_prototype,
        )  # fmt: skip
        mean = torch.zeros(64).index_add_(0, scores.candidates.flatten(), scores.logits.softmax(-1).flatten()) / 300
    expected = (mean * (mean * 64).clamp_min(1e-12).log()).sum()
    output = module(latents)
    torch.testing.assert_close(output.balance_loss, expected, atol=1e-5, rtol=1e-4)


def test_role_prior_steers_codes_into_a_role_range():
    module = quantizer(assignment="cdb", code_roles={"structure": [0, 32], "colour": [32, 64]})
    module.initialize_codebook(torch.randn(256, 8))
    module.eval()
    latents, signal = torch.randn(200, 8), torch.rand(200, 3)
    module.router.role_head[-1].bias.data = torch.tensor([0.0, 200.0])
    assert bool((module(latents, signal_features=signal).indices >= 32).all())
    module.router.role_head[-1].bias.data = torch.tensor([200.0, 0.0])
    assert bool((module(latents, signal_features=signal).indices < 32).all())


def test_image_signal_features_tell_flat_from_textured_and_grey_from_colour():
    flat_grey = torch.zeros(1, 3, 16, 16)
    noise = torch.rand(1, 1, 16, 16).repeat(1, 3, 1, 1) * 2 - 1
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    features = image_signal_features(torch.cat([flat_grey, noise, red]), 8)
    assert features.shape == (3, 3, 2, 2)
    low_pass, laplacian, chroma = features.mean((2, 3)).unbind(1)
    assert laplacian[1] > 10 * (laplacian[0] + 1e-6) and laplacian[1] > laplacian[2]
    assert chroma[2] > 0.1 and chroma[0] == 0 and chroma[1] < 1e-5


def test_kmeans_initialisation_places_codes_on_the_data():
    module = quantizer(assignment="nearest")
    latents = clustered_latents(1000)
    module.initialize_codebook(latents)
    assert bool(module.initialized)
    distance_to_data = torch.cdist(module.codes(), latents).min(1).values
    assert float(distance_to_data.max()) < 1.0
    torch.testing.assert_close(module.ema_embed_sum, module.codebook.weight)


def test_a_second_kmeans_initialisation_starts_the_potentials_afresh():
    module = quantizer(assignment="cdb")
    module.initialize_codebook(clustered_latents(1000))
    module.router.potentials.uniform_(-0.5, 0.5)  # learned for the first codebook's cells
    module.initialize_codebook(clustered_latents(1000, seed=1))
    assert torch.equal(module.router.potentials, torch.zeros_like(module.router.potentials))


def test_kmeans_with_fewer_samples_than_clusters_gives_distinct_centres():
    centres = kmeans(torch.randn(10, 4), num_clusters=32, iterations=3, seed=0, max_entries=10**6)
    assert torch.unique(centres, dim=0).shape[0] == 32


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_kmeans_of_a_single_sample_gives_finite_distinct_centres(scale):
    # A role range whose kind has one latent in the first batch: std over one row used to be NaN, and so the codes.
    # Far from the origin an absolute spread of 1e-6 fell under float32's resolution: 4 of 12 distinct at 100. And
    # each Lloyd step moved one more spread copy exactly onto the sample (their distances are under float32's
    # cancellation error): 13% of single samples at scale 30 ended with 3-4 distinct centres of 12.
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        samples = torch.randn(1, 4, generator=generator) * scale
        for batch in (samples, samples.repeat(3, 1)):  # equal samples too (flat crops give equal latents)
            centres = kmeans(batch, num_clusters=12, iterations=10, seed=0, max_entries=10**6)
            assert bool(torch.isfinite(centres).all())
            assert torch.unique(centres, dim=0).shape[0] == 12


@pytest.mark.parametrize("assignment", ["nearest", "cdb"])
def test_autocast_does_not_change_which_code_a_latent_gets(assignment):
    # Latents far from the origin: bf16's ||z||^2 - 2 z.e + ||e||^2 loses the small differences between codes.
    module = quantizer(assignment=assignment)
    module.train()
    module(clustered_latents(512) + 8)
    module.eval()
    latents = clustered_latents(2048, seed=1) + 8
    plain = module(latents).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module(latents)
    assert torch.equal(mixed.indices, plain)
    assert mixed.quantized.dtype == latents.dtype


def test_image_signal_features_ignore_autocast():
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = image_signal_features(pixels, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = image_signal_features(pixels, 4)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


def test_a_weight_average_takes_only_the_rows_of_codes_restarted_now():
    from types import SimpleNamespace

    from cdb_tokenizer.tools.runs import EMAWeights
    from cdb_tokenizer.tools.steps import restart_dead_codes

    model = tiny_model(assignment="nearest", ema_decay=None)  # a gradient codebook: the weight average keeps it
    model.quantizer.initialize_codebook(torch.randn(256, 8))
    average = EMAWeights(model, decay=0.9)
    average.shadow["quantizer.codebook.weight"].zero_()
    model.quantizer.usage.fill_(1 / 64)
    model.quantizer.usage[:10] = 0.0
    output = SimpleNamespace(latents=torch.randn(1, 8, 2, 2), signal_features=None)  # 4 latents for 10 dead codes
    assert restart_dead_codes(model, output, seed=0, ema=average) == 4
    shadow = average.shadow["quantizer.codebook.weight"]
    restarted = (shadow[:10].abs().sum(-1) > 0).nonzero().flatten()
    assert restarted.numel() == 4 and model.quantizer.dead_codes().numel() == 6
    torch.testing.assert_close(shadow[restarted], model.quantizer.codebook.weight[restarted])
    assert not bool(torch.isin(restarted, model.quantizer.dead_codes()).any())


def test_a_weight_average_takes_the_router_keys_restarted_codes_inherit():
    # A restart gives a revived code its live neighbour's router key; the average kept the dead code's key, so the
    # validated and saved model (which use the average) scored revived codes with the keys of the codes they replaced.
    from types import SimpleNamespace

    from cdb_tokenizer.tools.runs import EMAWeights
    from cdb_tokenizer.tools.steps import restart_dead_codes

    model = tiny_model()  # the router, with the default EMA codebook (not in the weight average)
    model.quantizer.initialize_codebook(torch.randn(256, 8))
    with torch.no_grad():
        model.quantizer.router.code_keys.copy_(torch.randn(64, 8))
    average = EMAWeights(model, decay=0.9)
    model.quantizer.usage.fill_(1 / 64)
    model.quantizer.usage[:3] = 0.0
    output = SimpleNamespace(latents=torch.randn(1, 8, 2, 2), signal_features=None)
    assert restart_dead_codes(model, output, seed=0, ema=average) == 3
    keys = model.quantizer.router.code_keys
    torch.testing.assert_close(average.shadow["quantizer.router.code_keys"][:3], keys[:3].detach())
    torch.testing.assert_close(average.shadow["quantizer.router.code_keys"][3:], keys[3:].detach())


def test_a_weight_average_warms_up_from_the_first_steps():
    # At a plain 0.999 the average of a 1,400-step run still held 0.999 ** 1400 = a quarter of the random weights.
    from cdb_tokenizer.tools.runs import EMAWeights

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = EMAWeights(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)  # trained weights, far from the initial ones
    for _ in range(1400):
        average.update(model)
    assert float(average.shadow["weight"]) > 0.99
    assert average.updates == 1400 and average.current_decay() == pytest.approx(1401 / 1410)
    restored = EMAWeights(model, decay=0.999)
    restored.load_tensors(average.to_tensors(), {"ema_weights_updates": 1400})
    assert restored.updates == 1400
    restored.load_tensors(average.to_tensors(), {})  # a checkpoint from before the warm-up: its average is past it
    assert restored.current_decay() == 0.999


def test_training_forward_initialises_the_codebook_once():
    module = quantizer(assignment="nearest")
    module.train()
    module(clustered_latents(256))
    codes = module.codebook.weight.clone()
    assert bool(module.initialized)
    module.eval()
    module(torch.randn(256, 8) * 100)
    assert torch.equal(codes, module.codebook.weight)


def test_dead_codes_are_restarted_on_recent_latents():
    module = quantizer(assignment="nearest", ema_decay=0.9)
    module.initialize_codebook(torch.randn(256, 8))
    module.usage.fill_(1 / 64)
    module.usage[:10] = 0.0
    assert module.dead_codes().tolist() == list(range(10))
    latents = torch.randn(100, 8) + 50
    restarted = module.restart_dead_codes(latents)
    assert restarted == 10
    gap_to_nearest_latent = (module.codebook.weight[:10, None] - latents[None]).abs().amax(-1).min(1).values
    assert float(gap_to_nearest_latent.max()) < 1e-5
    torch.testing.assert_close(module.ema_embed_sum[:10], module.codebook.weight[:10])
    assert bool((module.ema_cluster_size[:10] == 1).all()) and module.dead_codes().numel() == 0


def test_codes_kmeans_leaves_empty_are_dead_at_once():
    module = quantizer(assignment="nearest")
    points = torch.randn(8, 8) * 5
    module.initialize_codebook(points.repeat(32, 1))  # 256 samples, 8 distinct: k-means can fill 8 of 64 codes
    assert math.isclose(float(module.usage.sum()), 1.0, rel_tol=1e-5)
    assert module.dead_codes().numel() == 64 - 8


def test_restarts_put_at_most_one_code_on_each_latent():
    module = quantizer(assignment="nearest")
    module.initialize_codebook(torch.randn(256, 8))
    module.usage.fill_(1 / 64)
    module.usage[:40] = torch.linspace(0, 1e-4, 40)
    latents = torch.randn(16, 8) + 50
    assert module.restart_dead_codes(latents, seed=3) == 16
    moved = (module.codebook.weight[:, None] - latents[None]).abs().amax(-1) < 1e-5  # (codes, latents)
    assert moved.sum(0).tolist() == [1] * 16  # every latent took exactly one code
    assert moved[:16].any(1).all()  # the least used went first
    assert module.dead_codes().tolist() == list(range(16, 40))
    assert module.restart_dead_codes(torch.randn(16, 8) - 50, seed=4) == 16
    assert module.dead_codes().tolist() == list(range(32, 40))


def test_a_restarted_code_has_about_69_steps_to_win_tokens():
    module = quantizer(assignment="nearest", ema_decay=None, usage_decay=0.99)
    module.initialize_codebook(torch.randn(256, 8))
    module.usage.fill_(1 / 64)
    module.usage[0] = 0.0
    module.restart_dead_codes(torch.full((1, 8), 100.0))  # far from every latent below: it never wins a token
    module.train()
    lost = []
    for step in range(80):
        module(module.codes()[1:].detach().clone())
        lost.append(0 in module.dead_codes().tolist())
    assert lost.index(True) == 68  # log(2) / -log(0.99) = 69 steps of grace


def test_restarted_router_codes_inherit_a_live_neighbours_key():
    module = quantizer(assignment="cdb")
    module.initialize_codebook(torch.randn(256, 8))
    module.router.code_keys.data = torch.randn(64, 8)
    module.usage[:5] = 0.0
    module.restart_dead_codes(torch.randn(50, 8))
    live_keys = module.router.code_keys[5:]
    for key in module.router.code_keys[:5]:
        assert bool((live_keys == key).all(1).any())


def test_restarted_router_codes_start_from_a_neutral_potential():
    module = quantizer(assignment="cdb")
    module.initialize_codebook(torch.randn(256, 8))
    module.router.potentials.copy_(torch.linspace(-0.5, 0.5, 64))
    module.usage[:5] = 0.0
    module.restart_dead_codes(torch.randn(50, 8))
    assert bool((module.router.potentials[:5] == 0).all())
    assert torch.equal(module.router.potentials[5:], torch.linspace(-0.5, 0.5, 64)[5:])


def test_usage_statistics():
    module = quantizer(assignment="nearest")
    module.initialize_codebook(torch.randn(256, 8))
    module.eval()
    codes = module.codes()
    usage_before = module.usage.clone()
    latents = codes[torch.tensor([0, 0, 1, 1])]
    output = module(latents)
    assert float(output.utilization) == pytest.approx(2 / 64)
    assert float(output.perplexity) == pytest.approx(2.0)
    assert torch.equal(module.usage, usage_before)  # eval leaves running stats alone


def cosine_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`1 - cos(predicted, target)` averaged over rows, written out by hand."""
    cosine = (predicted * target).sum(-1) / (predicted.norm(dim=-1) * target.norm(dim=-1))
    return (1 - cosine).mean()


def test_semantic_losses_are_one_minus_the_cosine_to_their_targets():
    module = quantizer(assignment="nearest")
    module.initialize_codebook(torch.randn(256, 8))
    module.eval()  # out of training the prototype ties stay put, so the targets below are the ones used
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 64, (20,), generator=generator)
    predicted = torch.randn(20, 32, generator=generator)
    teacher = torch.randn(20, 32, generator=generator)
    prototypes = torch.randn(8, 32, generator=generator)
    ties = torch.randint(0, 8, (64,), generator=generator)
    module.set_prototypes(prototypes, ties)
    losses = module.semantic_losses(indices, predicted, teacher)
    with torch.no_grad():
        projection = module.code_projection
        projected_codes = module.codebook.weight @ projection.weight.t() + projection.bias
    expected = {
        "semantic_distillation_loss": cosine_loss(predicted, teacher),
        "token_alignment_loss": cosine_loss(projected_codes[indices], teacher),
        "code_alignment_loss": cosine_loss(projected_codes, prototypes[ties]),
    }
    for name, value in expected.items():
        # Random directions sit near cosine 0, so a wrong sign (1 + cos) or a missing term lands far off.
        torch.testing.assert_close(losses[name].detach(), value, atol=1e-5, rtol=1e-5, msg=name)
    # Aligned features cost nothing and opposite ones cost 2: the loss pulls toward the target, not away.
    aligned = module.semantic_losses(indices, 3 * teacher, teacher)["semantic_distillation_loss"]
    opposite = module.semantic_losses(indices, -teacher, teacher)["semantic_distillation_loss"]
    assert float(aligned) == pytest.approx(0.0, abs=1e-5) and float(opposite) == pytest.approx(2.0, abs=1e-5)


def test_commitment_loss_moves_the_latents_toward_their_code_and_leaves_the_codebook_alone():
    module = quantizer(assignment="nearest", ema_decay=None)  # a trainable codebook, so a leak would show
    module.initialize_codebook(torch.randn(256, 8))
    module.eval()
    latents = torch.randn(40, 8, requires_grad=True)
    output = module(latents)
    chosen = module.codes().detach()[output.indices]
    torch.testing.assert_close(output.commitment_loss.detach(), ((latents.detach() - chosen) ** 2).mean())
    output.commitment_loss.backward()
    # d/dz mean((z - e)^2) = 2 (z - e) / numel: the encoder side is pulled to its code ...
    torch.testing.assert_close(latents.grad, 2 * (latents.detach() - chosen) / chosen.numel())
    # ... and the codes only move through the codebook loss, never through the commitment term.
    codebook_grad = module.codebook.weight.grad
    assert codebook_grad is None or not bool(codebook_grad.any())


def test_codes_tie_to_the_prototype_of_their_latents_features():
    module = quantizer(assignment="cdb")
    module.initialize_codebook(torch.randn(256, 8))
    prototypes = torch.randn(8, 32)
    module.set_prototypes(prototypes, torch.full((64,), 7))
    latents = module.codes()[:16].repeat(3, 1)  # codes 0-15 are each nearest three latents; 16-63 none
    wanted = torch.arange(16) % 8
    features = prototypes[wanted].repeat(3, 1) + 0.01 * torch.randn(48, 32)
    tie = module.tie_codes_to_prototypes(latents, features)
    assert tie[:16].tolist() == wanted.tolist()
    assert bool((tie[16:] == 7).all())  # no latent picked them: they keep their tie


@pytest.mark.parametrize("retie", [True, False])
def test_prototype_ties_follow_the_teacher_features_of_the_tokens_each_code_wins(retie):
    module = quantizer(assignment="cdb", retie_prototypes=retie)
    module.initialize_codebook(torch.randn(256, 8))
    prototypes = torch.randn(8, 32)
    module.set_prototypes(prototypes, torch.full((64,), 7))
    module.train()
    latents = module.codes()[:16].repeat(4, 1)  # each of codes 0-15 wins four tokens per step; 16-63 none
    wanted = torch.arange(16) % 4  # the teacher sees prototype (code % 4) in the tokens of code 0-15
    for _ in range(3):
        indices = module(latents).indices
        module.semantic_losses(indices, None, prototypes[wanted[indices]] + 0.01 * torch.randn(64, 32))
    ties = module.code_to_prototype
    if retie:
        assert ties[:16].tolist() == wanted.tolist()
        assert bool((ties[16:] == 7).all())  # codes that won nothing keep their tie
    else:
        assert bool((ties == 7).all())
    # A restarted code forgets the teacher features of its previous cell and re-ties on what it wins next.
    module.usage[0] = 0.0
    module.restart_dead_codes(module.codes()[5:6] + 0.5)
    assert float(module.teacher_statistics.counts[0]) == 0.0
    module.eval()
    module.semantic_losses(torch.zeros(4, dtype=torch.long), None, prototypes[[6] * 4])
    assert int(ties[0]) == (0 if retie else 7)  # out of training the ties stay where they are


def test_snapshot_and_restore_undo_every_change_of_the_quantizer_state():
    module = quantizer(assignment="cdb", ema_decay=0.9)
    module.initialize_codebook(torch.randn(256, 8))
    before = {name: value.clone() for name, value in module.state_dict().items()}
    snapshot = module.snapshot()
    module.train()
    module(torch.randn(64, 8), semantic_features=torch.randn(64, 32))
    module.usage[:5] = 0.0
    module.restart_dead_codes(torch.randn(50, 8))
    assert any(not torch.equal(before[name], value) for name, value in module.state_dict().items())
    module.restore(snapshot)
    for name, value in module.state_dict().items():
        assert torch.equal(before[name], value), name


def test_roles_without_the_supervised_names_train_and_restart():
    # role_targets knows structure / texture / colour only: other names crashed the first training forward.
    model = tiny_model(assignment="nearest", code_roles={"sky": [0, 32], "ground": [32, 64]}).train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        model.quantizer.usage.zero_()
    restarted = model.quantizer.restart_dead_codes(torch.randn(64, 8), seed=0, signal_features=torch.rand(64, 3))
    assert restarted == 64


def test_restarts_with_roles_put_at_most_one_code_on_a_latent():
    # Roles with none of their kind in the batch fall back to every latent; each drew from that pool on its own, and
    # up to three codes landed on one latent (identical codes: all but one die again).
    from cdb_tokenizer.tools.roles import three_role_ranges

    model = tiny_model(assignment="cdb", code_roles=three_role_ranges(64))
    model.quantizer.initialize_codebook(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.quantizer.usage.zero_()  # every code dead
    latents = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)) + 50
    restarted = model.quantizer.restart_dead_codes(latents, seed=0, signal_features=torch.zeros(40, 3))  # all structure
    codes = model.quantizer.codebook.weight
    on_latent = ((codes[:, None] - latents[None]).abs().amax(-1) < 1e-5).sum(0)
    assert restarted == 40 and int(on_latent.max()) == 1


def test_a_half_precision_router_with_a_tiny_temperature_routes_as_float32():
    # 1 / T overflowed float16 below T = 1.5e-5: every token went to one code.
    import copy

    model = tiny_model(assignment="cdb").eval()
    model.quantizer.initialize_codebook(torch.randn(512, 8, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.quantizer.router.temperature.fill_(1.4e-5)
    half = copy.deepcopy(model).half()
    reference = copy.deepcopy(model)
    for name, value in half.quantizer.state_dict().items():  # the same rounded codes and router state, in float32
        if value.is_floating_point():
            reference.quantizer.state_dict()[name].copy_(value.float())
    latents, features = torch.randn(2000, 8), torch.randn(2000, 32)
    with torch.no_grad():
        expected = reference.quantizer(latents, semantic_features=features).indices
        tokens = half.quantizer(latents, semantic_features=features).indices
    assert (tokens == expected).float().mean() > 0.99 and tokens.unique().numel() > 20


def test_role_ranges_without_latents_of_their_kind_do_not_start_as_copies():
    model = tiny_model(assignment="cdb", code_roles={"structure": [0, 22], "texture": [22, 43], "colour": [43, 64]})
    quantizer_module = model.quantizer
    # Every latent of kind structure: texture and colour (21 codes each) both start from all latents.
    quantizer_module.initialize_codebook(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)),
                                         signal_features=torch.zeros(256, 3))  # fmt: skip
    codes = quantizer_module.codebook.weight
    texture, colour = (model.config.code_roles[name] for name in ("texture", "colour"))
    assert not torch.equal(codes[texture[0] : texture[1]], codes[colour[0] : colour[1]])


def test_the_quantizer_names_a_wrong_shape_instead_of_failing_in_a_matrix_product():
    vq = quantizer().eval()  # D = 8, semantic_dim = 32
    for latents in (torch.randn(10, 7), torch.randn(2, 5, 8)):  # was "mat1 and mat2 shapes cannot be multiplied"
        with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(N, codebook_dim=8\), got " + re.escape(str(tuple(latents.shape)))):
            vq(latents)
    with pytest.raises(ValueError, match=r"semantic_features must have shape \(10, semantic_dim=32\), one row per latent"):
        vq(torch.randn(10, 8), semantic_features=torch.randn(9, 32))
    assert vq(torch.randn(10, 8), semantic_features=torch.randn(10, 32)).indices.shape == (10,)
    # Integer latents were quantized to integer codes (the chosen codes truncated) without a word.
    with pytest.raises(TypeError, match="latents must be a floating-point torch.Tensor, got a torch.int64 tensor"):
        vq(torch.randint(0, 3, (10, 8)))
    # NaN latents made NaN codes without a word; none at all was torch's "random_ expects 'from' to be less than 'to'".
    vq.usage[:4] = 0.0  # dead codes for a restart to place
    for upkeep in (vq.initialize_codebook, vq.restart_dead_codes):
        with pytest.raises(ValueError, match="latents hold NaN or infinite values"):
            upkeep(torch.full((70, 8), float("nan")))
        with pytest.raises(ValueError, match="latents is empty"):
            upkeep(torch.zeros(0, 8))
    assert bool(torch.isfinite(vq.codebook.weight).all())
    # The model's (B, D, h, w) latents given to the upkeep were "shape mismatch: value tensor of shape ...".
    grid = torch.randn(2, 8, 4, 4)
    for upkeep in (vq.initialize_codebook, vq.restart_dead_codes):
        with pytest.raises(ValueError, match=r"got \(2, 8, 4, 4\); the model's \(B, D, h, w\) latents become rows with .*flatten_grid"):
            upkeep(grid)
