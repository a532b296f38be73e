"""The CDB-VQ quantizer: one codebook, three assignment rules, and the codebook upkeep that goes with them.

Assignment rules (``config.assignment``):

- ``nearest``: argmin distance, straight-through estimator, codebook and commitment losses.
- ``sinkhorn``: the balanced optimal-transport plan of the batch picks the codes while training (as in OptVQ);
  nearest neighbour at inference, so a token never depends on the other images of a batch.
- ``cdb``: the Codebook Decision Block, a router that scores every code by its transport cost (squared distance
  minus a learned per-code potential) and re-ranks the cheapest few from the latent, its semantic features and
  (optionally) a role prior. Trained by straight-through from its soft assignment over those candidates, the
  potentials by dual ascent on usage; inference is the same argmax.

Every N x K score matrix is built in row chunks of at most ``config.assignment_chunk_size`` entries, so assigning
65,536 latents against 65,536 codes never holds the whole matrix. Every piece of state (codebook, EMA, usage,
initialisation, restarts) is reduced or broadcast across processes under ``torch.distributed``, so it stays
identical on every rank. This file imports only torch and transformers: it ships as Hub remote code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_cdb_vq import SUPPORTED_QUANTIZER_FORMATS, CDBVQConfig


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed helpers: every collective is a no-op in a single process.
# ----------------------------------------------------------------------------------------------------------------


# Decay of the router temperature's running average of the nearest-code distortion.
TEMPERATURE_DECAY = 0.99
# k-means iterations of the codebook initialisation (train.py's --kmeans_init_iterations defaults to it).
KMEANS_ITERATIONS = 10


def is_distributed() -> bool:
    """Whether a torch.distributed process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) across processes."""
    if is_distributed():
        dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from process `src` to every process (nothing without a process group)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows held by every process (row counts may differ), in rank order."""
    if not is_distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


class _AllReduceSum(torch.autograd.Function):
    """Sum across processes whose gradient is summed back to every process (what torch.distributed.nn's deprecated
    `all_reduce` did; its FutureWarning was printed at every step of every process)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # collectives need a dense tensor
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(gradient)
        return gradient


def all_reduce_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over processes, differentiable: each process's loss on the sum reaches every process."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


def all_reduce_logsumexp_(values: torch.Tensor) -> torch.Tensor:
    """In-place log(sum over processes of exp(values)), stable."""
    if not is_distributed():
        return values
    peak = values.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (values - peak).exp()
    dist.all_reduce(total)
    return values.copy_(total.log() + peak)


# ----------------------------------------------------------------------------------------------------------------
# Distances, chunking and Sinkhorn
# ----------------------------------------------------------------------------------------------------------------


def chunk_rows(codebook_size: int, max_entries: int) -> int:
    """Number of latents scored at once so that a chunk's N x K block has at most `max_entries` entries."""
    return max(1, max_entries // codebook_size)


def squared_distances(latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances between rows of `latents` (n, D) and `codes` (K, D), as an (n, K) matrix."""
    return (
        latents.pow(2).sum(-1, keepdim=True) - 2.0 * latents @ codes.t() + codes.pow(2).sum(-1)[None]
    ).clamp_min(0.0)


def sinkhorn_cost(latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Plain L2 distance, the cost of OptVQ's transport problem (eps keeps the gradient of sqrt finite)."""
    return squared_distances(latents, codes).clamp_min(1e-12).sqrt()


def code_shares(counts: torch.Tensor) -> torch.Tensor:
    """Each code's share of a code histogram (all zeros for an empty one)."""
    return counts / counts.sum().clamp_min(1.0)


def usage_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Utilization (the share of codes used at least once) and perplexity (exp of the entropy) of a code histogram,
    as tensors of `counts`' dtype (double for long evaluations: float32 sums drift past ~16M tokens)."""
    share = code_shares(counts)
    # Unused codes count 0 * log(tiny) = 0 toward the entropy; the clamp only keeps their log finite.
    entropy = -(share * share.clamp_min(torch.finfo(share.dtype).tiny).log()).sum()
    return (counts > 0).to(share.dtype).mean(), entropy.exp()


def require_float_tensor(value, name: str, shape: str = "") -> None:
    """Raise a TypeError naming `name` unless `value` is a floating-point tensor (`shape` describes the one wanted)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor{shape and ' of shape ' + shape}, got {_kind(value)}.")


def _kind(value) -> str:
    """A value's kind for an error message: a tensor's dtype, else its type."""
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


@torch.no_grad()
def nearest_codes(latents: torch.Tensor, codes: torch.Tensor, max_entries: int) -> torch.Tensor:
    """Index of the nearest code for each latent, computed in row chunks."""
    rows = chunk_rows(codes.shape[0], max_entries)
    return torch.cat([squared_distances(chunk, codes).argmin(-1) for chunk in latents.split(rows)])


@dataclass
class SinkhornPotentials:
    """Column dual potentials of the entropic OT plan plus the cost normalisation they were computed with.

    The plan's row i is proportional to `exp(-epsilon * (cost_ik - mean) / std + column[k])`, so the potentials are
    all that is needed to read it out, chunk by chunk.
    """

    column: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    epsilon: float

    def plan_logits(self, cost: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-plan of a chunk of rows, given their (n, K) cost."""
        return -self.epsilon * (cost - self.mean) / self.std + self.column

    def row_potential(self, cost: torch.Tensor, total_rows: int) -> torch.Tensor:
        """Row potentials that give each of the `total_rows` rows a mass of 1 / total_rows."""
        return -math.log(total_rows) - torch.logsumexp(self.plan_logits(cost), dim=-1)


@torch.no_grad()
def sinkhorn_potentials(
    latents: torch.Tensor, codes: torch.Tensor, epsilon: float, iterations: int, max_entries: int
) -> SinkhornPotentials:
    """Log-domain Sinkhorn between the latents of the whole (distributed) batch and the codes.

    Rows (latents) get mass 1/N, columns (codes) 1/K. Costs are normalised as (C - mean) / std over the
    whole batch, as in OptVQ. Rows are processed in chunks and the column marginals are reduced across
    processes, so the plan is the one of the global batch.
    """
    num_codes = codes.shape[0]
    rows = chunk_rows(num_codes, max_entries)
    chunks = latents.float().split(rows)
    codes = codes.float()

    moments = torch.zeros(3, device=codes.device, dtype=torch.float64)
    for chunk in chunks:
        cost = sinkhorn_cost(chunk, codes)
        moments += torch.stack([cost.sum().double(), cost.pow(2).sum().double(), cost.new_tensor(cost.numel()).double()])
    all_reduce_(moments)
    mean = moments[0] / moments[2]
    std = (moments[1] / moments[2] - mean.pow(2)).clamp_min(1e-12).sqrt()
    potentials = SinkhornPotentials(codes.new_zeros(num_codes), mean.float(), std.float(), epsilon)
    total_rows = int(moments[2].item() // num_codes)

    for _ in range(iterations):
        column_lse = codes.new_full((num_codes,), -float("inf"))
        for chunk in chunks:
            cost = sinkhorn_cost(chunk, codes)
            row = potentials.row_potential(cost, total_rows)
            column_lse = torch.logaddexp(column_lse, torch.logsumexp(potentials.plan_logits(cost) + row[:, None], 0))
        all_reduce_logsumexp_(column_lse)
        # Column step: each code receives mass 1/K (its current mass is exp(column_lse)).
        potentials.column = potentials.column - math.log(num_codes) - column_lse
    return potentials


def float32_maths(device: torch.device) -> torch.autocast | contextlib.nullcontext:
    """Switch autocast off: in bf16, ||z||^2 - 2 z.e + ||e||^2 picks other codes than the float32 inference does
    (measured: 6% of `nearest`'s tokens for latents of mean 2, 1,024 codes), and running statistics must not round."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def apply_float32_out(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run a small learned layer in its own dtype (bf16 models) and return float32 for the scoring maths."""
    return module(inputs.to(next(module.parameters()).dtype)).float()


# ----------------------------------------------------------------------------------------------------------------
# Image-signal features for the role prior
# ----------------------------------------------------------------------------------------------------------------


def image_signal_features(pixel_values: torch.Tensor, downsampling_factor: int) -> torch.Tensor:
    """Fixed per-cell image statistics that tell roles apart: low-pass energy, Laplacian energy, chroma.

    `pixel_values` is (B, C, H, W) in [-1, 1]; the result is (B, 3, H / f, W / f), one vector per latent cell.
    """
    with float32_maths(pixel_values.device):
        return _image_signal_features(pixel_values.float(), downsampling_factor)


# The columns of `image_signal_features`, in order.
SIGNAL_NAMES = ("low_pass", "laplacian", "chroma")


def _image_signal_features(pixels: torch.Tensor, downsampling_factor: int) -> torch.Tensor:
    if pixels.shape[1] >= 3:
        red, green, blue = pixels[:, 0:1], pixels[:, 1:2], pixels[:, 2:3]
        luma = 0.299 * red + 0.587 * green + 0.114 * blue
        chroma = ((blue - luma).pow(2) + (red - luma).pow(2)).sqrt()
    else:
        luma = pixels.mean(1, keepdim=True)
        chroma = torch.zeros_like(luma)
    laplacian_kernel = luma.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    laplacian = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), laplacian_kernel)
    pool = lambda x: F.avg_pool2d(x, downsampling_factor)  # noqa: E731
    return torch.cat([pool(luma).pow(2), pool(laplacian.pow(2)), pool(chroma)], dim=1)  # SIGNAL_NAMES' order


def role_targets(signal_features: torch.Tensor, config: CDBVQConfig) -> torch.Tensor:
    """Target role id of each row of `signal_features` (N, 3), in `config.role_names` order.

    `texture` where the Laplacian energy reaches `role_texture_threshold`; otherwise `colour` where the chroma reaches
    `role_colour_threshold`; otherwise `structure` (low-pass energy dominates). A role the config does not name falls
    back to `structure`.
    """
    names = config.role_names
    structure = names.index("structure")
    texture = names.index("texture") if "texture" in names else structure
    colour = names.index("colour") if "colour" in names else structure
    laplacian, chroma = (signal_features[:, SIGNAL_NAMES.index(name)] for name in ("laplacian", "chroma"))
    targets = torch.full_like(laplacian, structure, dtype=torch.long)
    targets = torch.where(chroma >= config.role_colour_threshold, torch.full_like(targets, colour), targets)
    return torch.where(laplacian >= config.role_texture_threshold, torch.full_like(targets, texture), targets)


# ----------------------------------------------------------------------------------------------------------------
# The Codebook Decision Block
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RouterScores:
    """The router's scores of a chunk of n latents over their `candidates` (n, c) code ids.

    `cost_logits` is minus the transport cost (the only term that reaches the latents' gradient), `prior_logits` the
    learned and role terms; `logits` is their sum. `nearest_squared_distance` (n,) is each latent's squared distance
    to its nearest code, the distortion that sets the router's temperature.
    """

    candidates: torch.Tensor
    cost_logits: torch.Tensor
    prior_logits: torch.Tensor
    nearest_squared_distance: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        return self.cost_logits + self.prior_logits

    def choice(self) -> torch.Tensor:
        """Chosen code id of every latent (n,)."""
        return self.candidates.gather(1, self.logits.detach().argmax(-1, keepdim=True))[:, 0]


@torch.no_grad()
def fill_buffers(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` (a `fresh_state()`) into the buffers of `module` they name."""
    for name, value in values.items():
        getattr(module, name).copy_(value)


class CDBVQRouter(nn.Module):
    """Picks a code for each latent: a semi-discrete optimal-transport assignment, re-ranked by a learned term.

    The score of code k for latent z is `-(||z - e_k||^2 - psi_k) / temperature + learned_k(z, s) [+ role prior]`:

    - `psi` are the K dual potentials of the balanced transport of the *data distribution* (not of a batch) to the
      codes: with the right potentials, argmin_k ||z - e_k||^2 - psi_k gives every code a 1/K share (a power
      diagram). They are learned by stochastic dual ascent on the usage reduced over all processes, so the rule is
      batch independent and identical in training and inference.
    - `temperature` is a running average of the squared distance to the nearest code: it makes the scores
      scale-free.
    - the learned term (a query from the latent and its semantic features against one key per code, plus the cosine
      of the semantic features to the code's prototype) is bounded by `router_logit_bound` and only re-ranks the
      `router_candidates` codes of lowest transport cost: it decides among near-equal codes, where the decoder does
      not care, and costs O(candidates x router_dim) per token.
    - the role term is a log-prior over the named code ranges, from fixed image-signal features; it is added before
      the candidates are chosen, so it can move a token into its role's range.
    """

    def __init__(self, config: CDBVQConfig):
        super().__init__()
        self.num_candidates = min(config.router_candidates, config.codebook_size)
        self.logit_bound = config.router_logit_bound
        self.role_prior_scale = config.role_prior_scale
        self.query = nn.Linear(config.codebook_dim + config.semantic_dim, config.router_dim)
        self.code_keys = nn.Parameter(torch.zeros(config.codebook_size, config.router_dim))
        self.semantic_scale = nn.Parameter(torch.ones(()))
        # Format 2 added the raw cosines, whose shared offset pushed tanh toward saturation and squeezed the
        # differences between candidates; from format 3 they are centred over the candidates.
        self.centre_prototype_similarity = config.quantizer_format >= 3
        self.role_head = None
        if config.code_roles:
            self.role_head = nn.Sequential(
                nn.Linear(3, config.role_hidden_dim), nn.SiLU(), nn.Linear(config.role_hidden_dim, len(config.code_roles))
            )
        # Persistent: a saved model routes exactly as it did when it was saved. Filled in `reset_state`.
        self.register_buffer("potentials", torch.zeros(config.codebook_size, dtype=torch.float32))
        self.register_buffer("temperature", torch.ones((), dtype=torch.float32))

    def fresh_state(self) -> dict[str, torch.Tensor]:
        """The values of this module's own buffers in a fresh model."""
        return {"potentials": torch.zeros_like(self.potentials), "temperature": torch.ones_like(self.temperature)}

    @torch.no_grad()
    def reset_state(self) -> None:
        """Potentials to zero and the temperature to one, as in a fresh model."""
        fill_buffers(self, self.fresh_state())

    def forward(
        self,
        latents: torch.Tensor,
        codes: torch.Tensor,
        semantic_features: torch.Tensor,
        prototypes: torch.Tensor,
        code_to_prototype: torch.Tensor,
        signal_features: torch.Tensor | None = None,
        code_to_role: torch.Tensor | None = None,
        detach_learned_inputs: bool = False,
    ) -> RouterScores:
        """Score a chunk of n latents (float32) against the codes; only the cost term sees undetached latents when
        `detach_learned_inputs` is set (training: the learned terms must not pull the encoder to balance usage)."""
        role_log_prior = None
        if self.role_head is not None and signal_features is not None:
            role_log_prior = self.role_prior_scale * self.role_logits(signal_features).log_softmax(-1)
        with torch.no_grad():
            squared_distance = squared_distances(latents, codes)
            nearest_squared_distance = squared_distance.min(-1).values
            selection = -self.transport_cost(squared_distance)
            if role_log_prior is not None:
                selection += role_log_prior.index_select(1, code_to_role)
            candidates = selection.topk(self.num_candidates, dim=-1).indices
        cost_logits = -self.candidate_cost(latents, codes, candidates)
        prior_logits = cost_logits.new_zeros(())
        if role_log_prior is not None:
            prior_logits = prior_logits + role_log_prior.gather(1, code_to_role[candidates])
        if self.num_candidates > 1:
            if detach_learned_inputs:
                latents, semantic_features = latents.detach(), semantic_features.detach()
            prior_logits = prior_logits + self.learned_logits(
                latents, semantic_features, candidates, prototypes, code_to_prototype
            )
        return RouterScores(candidates, cost_logits, prior_logits, nearest_squared_distance)

    def transport_cost(self, squared_distance: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """`(||z - e_k||^2 - psi_k) / temperature` for all codes, or for the given (n, c) candidates."""
        potentials = (self.potentials if candidates is None else self.potentials[candidates]).float()
        # Multiply by a fresh reciprocal: autograd must not hold the buffer that training updates in place. In
        # float32 even in a half-precision model: 1 / T overflows float16 below T = 1.5e-5 (every token one code).
        return (squared_distance.float() - potentials) * self.temperature.float().reciprocal()

    def candidate_cost(self, latents: torch.Tensor, codes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Transport cost (n, c) of each latent to its candidate codes."""
        return self.transport_cost((latents[:, None] - codes[candidates]).pow(2).sum(-1), candidates)

    def learned_logits(
        self,
        latents: torch.Tensor,
        semantic_features: torch.Tensor,
        candidates: torch.Tensor,
        prototypes: torch.Tensor,
        code_to_prototype: torch.Tensor,
    ) -> torch.Tensor:
        """The router's own (n, c) scores of the candidates: query . key plus the prototype term, bounded."""
        query = apply_float32_out(self.query, torch.cat([latents, semantic_features], dim=-1))
        keys = self.code_keys.float()[candidates]
        scores = (keys @ query[:, :, None])[..., 0] / math.sqrt(query.shape[-1])
        # Only the candidates' prototypes: O(candidates x semantic_dim) per token, not O(num_prototypes x semantic_dim).
        candidate_prototypes = F.normalize(prototypes.float(), dim=-1)[code_to_prototype[candidates]]
        similarity = (candidate_prototypes @ F.normalize(semantic_features, dim=-1)[:, :, None])[..., 0]
        if self.centre_prototype_similarity:
            similarity = similarity - similarity.mean(-1, keepdim=True)
        scores = scores + self.semantic_scale * similarity
        if self.logit_bound is not None:
            # A bounded swing lets the router re-rank near-equal codes, never override the transport cost.
            scores = self.logit_bound * torch.tanh(scores / self.logit_bound)
        return scores

    @torch.no_grad()
    def update_potentials(
        self,
        share: torch.Tensor,
        distortion: torch.Tensor,
        step: float,
        bound: float,
        target_share: torch.Tensor | None = None,
    ) -> None:
        """One step of stochastic dual ascent toward the balanced transport plan, and the temperature's update.

        `share` (K,) is the share of this (global) batch's tokens each code took: a code above its target share
        (1/K, or `target_share` (K,)) loses potential, one below gains it; a code whose target is 0 keeps its
        potential. Potentials are kept centred and within `bound` temperatures. The temperature follows the mean
        squared distance of latents to their *nearest* code (not the chosen one, which the potentials move: that
        would feed back into their own bound).
        """
        # A slow average (about 100 steps): the temperature scales the potentials, so it must not jump with one batch.
        self.temperature.mul_(TEMPERATURE_DECAY).add_(distortion.clamp_min(1e-8), alpha=1 - TEMPERATURE_DECAY)
        if step <= 0:
            return
        if target_share is None:
            excess = share * share.numel()
        else:
            excess = torch.where(target_share > 0, share / target_share.clamp_min(1e-12), torch.ones_like(share))
        self.potentials.add_(step * self.temperature * (1.0 - excess))
        self.potentials.sub_(broadcast_(self.potentials.mean()))  # rank 0's: see the EMA codebook's total
        self.potentials.clamp_(-bound * self.temperature, bound * self.temperature)

    def role_supervision_loss(self, signal_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the role head's log-prior (the one routing adds) against target roles (N,)."""
        return F.cross_entropy(self.role_logits(signal_features), targets)

    def role_logits(self, signal_features: torch.Tensor) -> torch.Tensor:
        """The role head's (N, roles) logits. It reads the log of the signal statistics: they span many orders of
        magnitude (a flat cell's Laplacian energy is ~1e-14, an edge's ~10), and on a log scale the role thresholds
        are a few units apart, which a small head learns in tens of steps instead of hundreds."""
        return apply_float32_out(self.role_head, signal_features.float().clamp_min(0.0).add(1e-3).log())


# ----------------------------------------------------------------------------------------------------------------
# The quantizer
# ----------------------------------------------------------------------------------------------------------------


class CodeStatistics(nn.Module):
    """Running (decayed) sums of a per-token feature over the tokens each code wins in training, and their token
    counts: the image signals (low-pass, Laplacian, chroma) that `CDBVQModel.code_report` reads, and the teacher's
    features that tie codes to prototypes. Reduced across processes like the usage, persistent so they survive
    resumption; `save_pretrained` keeps the signal statistics and leaves out the teacher's (training only)."""

    def __init__(self, codebook_size: int, width: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("sums", torch.zeros(codebook_size, width, dtype=torch.float32))
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.float32))

    def fresh_state(self) -> dict[str, torch.Tensor]:
        """The values of this module's buffers in a fresh model."""
        return {"sums": torch.zeros_like(self.sums), "counts": torch.zeros_like(self.counts)}

    @torch.no_grad()
    def reset(self, indices: torch.Tensor | None = None) -> None:
        """Forget every code's statistics, or those of `indices` (restarted codes)."""
        if indices is None:
            fill_buffers(self, self.fresh_state())
        else:
            self.sums[indices] = 0.0
            self.counts[indices] = 0.0

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Add a batch's features (N, width) to the codes `indices` (N,) won; returns the batch's token count of each
        code, summed over processes (K,)."""
        sums = torch.zeros_like(self.sums, dtype=torch.float32).index_add_(0, indices, features.detach().float())
        counts = torch.bincount(indices, minlength=self.counts.shape[0]).float()
        all_reduce_(sums)
        all_reduce_(counts)
        self.sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        return counts

    @torch.no_grad()
    def means(self) -> torch.Tensor:
        """(K, width) mean feature per code; NaN for a code never seen."""
        counts = self.counts.float()[:, None]
        means = self.sums.float() / counts.clamp_min(1e-12)
        return torch.where(counts > 0, means, torch.full_like(means, float("nan")))


@dataclass
class CDBVQQuantizerOutput(ModelOutput):
    """What the quantizer gives back for a flat batch of latents.

    Args:
        quantized: (N, D) straight-through quantized latents (their value is the chosen code).
        indices: (N,) chosen code of each latent.
        codebook_loss / commitment_loss: classic VQ terms (codebook loss is None with EMA updates).
        balance_loss: KL(batch-averaged code distribution || uniform) of the router's soft assignment (`cdb`, training,
            computed only with a positive `balance_weight`).
        role_supervision_loss: cross-entropy of the role head against the tokens' target roles (training, when
            `config.role_supervision_weight > 0`).
        utilization: share of the codebook used in this batch (all processes when training).
        perplexity: exp of the entropy of the batch's code histogram.
    """

    quantized: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    role_supervision_loss: torch.FloatTensor | None = None
    utilization: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None


class CDBVQQuantizer(nn.Module):
    """Codebook, assignment rule, semantic prototypes and codebook upkeep (k-means init, EMA, dead-code restarts)."""

    def __init__(self, config: CDBVQConfig):
        super().__init__()
        if config.assignment == "cdb" and config.quantizer_format not in SUPPORTED_QUANTIZER_FORMATS:
            which = "the first CDB router" if config.quantizer_format < min(SUPPORTED_QUANTIZER_FORMATS) else "a newer cdb_tokenizer"
            raise ValueError(
                f"this `cdb` model was saved in quantizer format {config.quantizer_format} ({which}), but this version "
                f"of cdb_tokenizer routes with formats {SUPPORTED_QUANTIZER_FORMATS}: its tokens would differ. Load it "
                "with the code saved in its folder (AutoModel.from_pretrained with its remote code allowed, in a "
                "process that does not import cdb_tokenizer), or with the cdb-tokenizer release that saved it."
            )
        self.config = config
        self.assignment = config.assignment
        self.codebook_size = config.codebook_size
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        if config.ema_decay is not None:
            self.codebook.weight.requires_grad_(False)
        self.code_projection = nn.Linear(config.codebook_dim, config.semantic_dim)
        self.router = CDBVQRouter(config) if config.assignment == "cdb" else None
        # Persistent so that a saved or resumed model carries them; all set in `reset_state`. Float32 whatever the
        # default dtype (`from_pretrained(..., dtype=torch.bfloat16)` builds the model under it): see `_apply`.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(config.codebook_size, dtype=torch.float32))
        self.register_buffer("ema_cluster_size", torch.zeros(config.codebook_size, dtype=torch.float32))
        self.register_buffer("ema_embed_sum", torch.zeros(config.codebook_size, config.codebook_dim, dtype=torch.float32))
        self.register_buffer("prototypes", torch.zeros(config.num_prototypes, config.semantic_dim, dtype=torch.float32))
        self.register_buffer("code_to_prototype", torch.zeros(config.codebook_size, dtype=torch.long))
        self.register_buffer("code_to_role", torch.zeros(config.codebook_size, dtype=torch.long))
        # Submodules of their own: a model saved before they existed loads with only these statistics fresh.
        self.signal_statistics = CodeStatistics(config.codebook_size, len(SIGNAL_NAMES), config.usage_decay)
        self.teacher_statistics = CodeStatistics(config.codebook_size, config.semantic_dim, config.usage_decay)

    def _apply(self, fn, recurse=True):
        # The running statistics (usage, EMA sums, potentials, temperature, signal and teacher statistics) take 1% steps
        # that half precision rounds away, and their smoothing underflows float16 into an infinite codebook: they stay
        # float32 when the model is cast (`.half()`, `.to(torch.bfloat16)`), as under autocast.
        # Kept exact, not only float32: a cast then `.float()` would leave them rounded to half precision.
        originals = {(module, name): buffer for module in self.modules() for name, buffer in module._buffers.items()
                     if buffer is not None and buffer.dtype == torch.float32}  # fmt: skip
        super()._apply(fn, recurse)
        for module in self.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                    original = originals.get((module, name))
                    module._buffers[name] = buffer.float() if original is None else original.to(buffer.device)
        return self

    # ------------------------------------------------------------------ state
    def fresh_state(self) -> dict[str, torch.Tensor]:
        """The values of this module's own buffers in a fresh model (its submodules have their own `fresh_state`);
        `reset_state` and the model's `_init_weights` both fill from it."""
        size = self.codebook_size
        code_ids = torch.arange(size, device=self.code_to_prototype.device)
        return {
            "initialized": torch.zeros_like(self.initialized),
            "usage": torch.full_like(self.usage, 1.0 / size),
            "ema_cluster_size": torch.ones_like(self.ema_cluster_size),
            "ema_embed_sum": self.codebook.weight.detach().to(self.ema_embed_sum.dtype),
            "prototypes": torch.zeros_like(self.prototypes),
            "code_to_prototype": code_ids % self.prototypes.shape[0],
            "code_to_role": self._code_to_role_of_config(),
        }

    def _code_to_role_of_config(self) -> torch.Tensor:
        """Each code's role index, from the config's `code_roles` ranges (in codebook order; 0 without roles)."""
        code_to_role = torch.zeros_like(self.code_to_role)
        for role, name in enumerate(self.config.role_names):
            start, end = self.config.code_roles[name]
            code_to_role[start:end] = role
        return code_to_role

    def check_code_roles(self) -> None:
        """Refuse weights whose per-code roles (`code_to_role`, saved with them) are not the config's `code_roles`:
        the role names, maps and code report come from the config, the routing from the weights."""
        if self.code_to_role.is_meta:  # device_map="meta": nothing loaded to compare
            return
        if torch.equal(self.code_to_role, self._code_to_role_of_config()):
            return
        counts = torch.bincount(self.code_to_role.cpu(), minlength=max(len(self.config.role_names), 1)).tolist()
        raise ValueError(
            f"the weights' code roles (codes per role, in order: {counts}) are not config.code_roles "
            f"{self.config.code_roles}: config.json was edited after training, or code_roles was passed to "
            f"from_pretrained; load the model with the code_roles it was trained with."
        )

    @torch.no_grad()
    def reset_state(self) -> None:
        """Fill the buffers for a fresh model, the router's and the statistics' included."""
        fill_buffers(self, self.fresh_state())
        self.signal_statistics.reset()
        self.teacher_statistics.reset()
        if self.router is not None:
            self.router.reset_state()

    @property
    def has_prototypes(self) -> bool:
        """Whether prototypes were set (`set_prototypes`); a fresh model's are all zero."""
        return bool(self.prototypes.abs().sum() > 0)

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor, code_to_prototype: torch.Tensor | None = None) -> None:
        """Store semantic prototypes (P, semantic_dim) and, optionally, which prototype each code is tied to; both are
        checked before either is written."""
        require_float_tensor(prototypes, "prototypes")
        if tuple(prototypes.shape) != tuple(self.prototypes.shape):
            raise ValueError(
                f"prototypes must have shape {tuple(self.prototypes.shape)} (num_prototypes, semantic_dim), got {tuple(prototypes.shape)}."
            )
        if not bool(torch.isfinite(prototypes).all()):
            raise ValueError("prototypes contain NaN or infinite values.")
        if code_to_prototype is not None:
            if not isinstance(code_to_prototype, torch.Tensor) or code_to_prototype.dtype not in (torch.int32, torch.int64):
                raise TypeError(
                    f"code_to_prototype must be an integer tensor (torch.int64 or int32) of prototype ids, got {_kind(code_to_prototype)}."
                )
            if code_to_prototype.shape != self.code_to_prototype.shape or not (
                0 <= int(code_to_prototype.min()) and int(code_to_prototype.max()) < prototypes.shape[0]
            ):
                raise ValueError(f"code_to_prototype must be {self.codebook_size} prototype ids in [0, {prototypes.shape[0]}).")
        self.prototypes.copy_(prototypes)
        if code_to_prototype is not None:
            self.code_to_prototype.copy_(code_to_prototype)

    @torch.no_grad()
    def tie_codes_to_prototypes(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Which prototype each code stands for, read from data: the prototype most similar to the mean direction of
        the teacher features (N, semantic_dim) of the latents (N, D) nearest the code, summed over processes (every
        process must call it); a code no latent is nearest keeps its tie. Returns the map; `set_prototypes` stores it.
        """
        indices = nearest_codes(self.prepare_latents(latents), self.codes(), self.config.assignment_chunk_size)
        sums = torch.zeros(self.codebook_size, features.shape[1], device=features.device)
        sums.index_add_(0, indices, F.normalize(features.float(), dim=-1))
        all_reduce_(sums)
        return self._ties(sums, self.code_to_prototype)

    def _ties(self, feature_sums: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The prototype nearest by cosine to each row of summed teacher directions (n, semantic_dim); a row with
        none keeps its `current` (n,) tie."""
        similarity = F.normalize(feature_sums, dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).t()
        return torch.where(feature_sums.abs().sum(-1) > 0, similarity.argmax(-1), current)

    @torch.no_grad()
    def _follow_prototype_ties(self, indices: torch.Tensor, teacher: torch.Tensor) -> None:
        """Training with a teacher: accumulate the teacher directions of the tokens each code wins and re-tie every
        code to the prototype nearest their running mean (`config.retie_prototypes`), so that the ties follow codes
        that EMA moved and restarts replaced instead of keeping the map of initialisation."""
        if not (self.training and self.config.retie_prototypes and self.has_prototypes):
            return
        counts = self.teacher_statistics.update(indices, F.normalize(teacher, dim=-1))
        # Only the codes that won tokens this step can change their tie (the others' sums only decayed, which keeps
        # their direction): O(won codes x semantic_dim x prototypes) per step instead of O(K x ...).
        won = (counts > 0).nonzero().flatten()
        self.code_to_prototype[won] = self._ties(self.teacher_statistics.sums[won].float(), self.code_to_prototype[won])

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the codebook and every buffer (usage, EMA, router state), for `restore` to undo a step."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put back the state `snapshot` copied (e.g. after a training step whose loss was not finite)."""
        self.load_state_dict(snapshot)

    def codes(self) -> torch.Tensor:
        """The codebook in float32, l2-normalised when the config asks for it."""
        codes = self.codebook.weight.float()
        return F.normalize(codes, dim=-1) if self.config.l2_normalize_codes else codes

    def _check_latents(self, latents: torch.Tensor) -> None:
        """Flat latents (N, D), as `forward`, the k-means initialisation and restarts take them (`flatten_grid` turns
        the model's (B, D, h, w) latents into rows)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 2 or latents.shape[1] != self.config.codebook_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"latents must be a tensor of shape (N, codebook_dim={self.config.codebook_dim}), got {shape}; the "
                f"model's (B, D, h, w) latents become rows with cdb_tokenizer.modeling_cdb_vq.flatten_grid."
            )
        # Integer latents were quantized to codes truncated to integers (`quantized` takes the latents' dtype).
        require_float_tensor(latents, "latents")

    @staticmethod
    def _check_upkeep_samples(latents: torch.Tensor) -> None:
        """What `forward` leaves to the model to save a device sync, for the latents of every process gathered
        (identical everywhere, so every process raises alike): latents to put codes on must exist and be finite
        (one NaN latent drawn by k-means or a restart made NaN codes without a word)."""
        if latents.shape[0] == 0:
            raise ValueError("latents is empty: codes need at least one latent to be placed on.")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or infinite values: codes placed on them would be NaN.")

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the codebook compares them: float32, and l2-normalised when the config asks for it."""
        latents = latents.float()
        return F.normalize(latents, dim=-1) if self.config.l2_normalize_codes else latents

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of `indices` (any shape) as (..., D). The ids are not checked here (that would cost a device sync
        per call): `CDBVQModel.decode` checks them."""
        return F.embedding(indices, self.codes())

    # ------------------------------------------------------------------ assignment
    def forward(
        self,
        latents: torch.Tensor,
        semantic_features: torch.Tensor | None = None,
        signal_features: torch.Tensor | None = None,
    ) -> CDBVQQuantizerOutput:
        """Quantize a flat batch of latents (N, D); `semantic_features` (N, semantic_dim) feed the `cdb` router.
        Runs in float32 under autocast too, so that training picks the codes that inference will. Shapes are checked
        here; NaN values are not (that takes a device sync: `CDBVQModel` checks its inputs and outputs instead)."""
        self._check_latents(latents)
        if semantic_features is not None and tuple(semantic_features.shape) != (latents.shape[0], self.config.semantic_dim):
            raise ValueError(
                f"semantic_features must have shape ({latents.shape[0]}, semantic_dim={self.config.semantic_dim}), "
                f"one row per latent, got {tuple(semantic_features.shape)}."
            )
        with float32_maths(latents.device):
            return self._quantize(latents, semantic_features, signal_features)

    def _quantize(
        self, latents: torch.Tensor, semantic_features: torch.Tensor | None, signal_features: torch.Tensor | None
    ) -> CDBVQQuantizerOutput:
        input_dtype = latents.dtype
        if self.training and not bool(self.initialized):
            self.initialize_codebook(latents.detach(), signal_features=signal_features)
        latents = self.prepare_latents(latents)
        codes = self.codes()
        if self.config.ema_decay is not None:
            # The EMA update below rewrites the codebook in place; backward must see the codes this forward used.
            codes = codes.detach().clone()
        output = CDBVQQuantizerOutput()

        if self.assignment == "cdb":
            if semantic_features is None:
                semantic_features = latents.new_zeros(latents.shape[0], self.config.semantic_dim)
            indices, soft_quantized, distortion = self._route(
                latents, codes, semantic_features.float(), signal_features, output
            )
        elif self.assignment == "sinkhorn" and self.training:
            potentials = self._sinkhorn(latents.detach(), codes.detach())
            indices = self._chunked_argmax(lambda chunk: potentials.plan_logits(sinkhorn_cost(chunk, codes)), latents)
            soft_quantized = distortion = None
        else:
            indices = nearest_codes(latents.detach(), codes.detach(), self.config.assignment_chunk_size)
            soft_quantized = distortion = None

        chosen = F.embedding(indices, codes)
        output.commitment_loss = F.mse_loss(latents, chosen.detach())
        if self.config.ema_decay is None:
            output.codebook_loss = F.mse_loss(chosen, latents.detach())
        quantized = latents + (chosen - latents).detach()
        if soft_quantized is not None:
            # Straight-through on the router's soft assignment: every scored code and the router get gradient.
            quantized = quantized + soft_quantized - soft_quantized.detach()
        output.quantized = quantized.to(input_dtype)
        output.indices = indices
        self._update_statistics(latents.detach(), indices, output, distortion)
        if signal_features is not None:
            self._role_supervision(signal_features, output)
            if self.training:
                self.signal_statistics.update(indices, signal_features)
        return output

    def _role_supervision(self, signal_features: torch.Tensor, output: CDBVQQuantizerOutput) -> None:
        """The role-supervision term (training with gradients, a role head, and a positive weight)."""
        if not (self.training and torch.is_grad_enabled()) or self.config.role_supervision_weight <= 0:
            return
        if self.router is None or self.router.role_head is None:
            return
        signal_features = signal_features.detach().float()
        output.role_supervision_loss = self.router.role_supervision_loss(
            signal_features, role_targets(signal_features, self.config)
        )

    def _sinkhorn(self, latents: torch.Tensor, codes: torch.Tensor) -> SinkhornPotentials:
        config = self.config
        return sinkhorn_potentials(
            latents, codes, config.sinkhorn_epsilon, config.sinkhorn_iterations, config.assignment_chunk_size
        )

    def _chunked_argmax(self, score, latents: torch.Tensor) -> torch.Tensor:
        rows = chunk_rows(self.codebook_size, self.config.assignment_chunk_size)
        with torch.no_grad():
            return torch.cat([score(chunk).argmax(-1) for chunk in latents.split(rows)])

    def _route(
        self,
        latents: torch.Tensor,
        codes: torch.Tensor,
        semantic_features: torch.Tensor,
        signal_features: torch.Tensor | None,
        output: CDBVQQuantizerOutput,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Assign by the router's argmax. While training also return the summed squared distance of the latents to
        their nearest codes (it sets the router's temperature) and, with gradients on, build the soft assignment and
        (with a positive `balance_weight`) the balance loss."""
        training = self.training and torch.is_grad_enabled()
        # At its default weight of 0 the balance term would cost a second candidate cost, a softmax and a collective
        # every step for nothing (every process has the same config, so all skip the collective together).
        balancing = training and self.config.balance_weight > 0

        def route_chunk(latent_chunk, semantic_chunk, signal_chunk):
            scores = self.router(
                latent_chunk, codes, semantic_chunk, self.prototypes, self.code_to_prototype, signal_chunk,
                self.code_to_role, detach_learned_inputs=True,
            )  # fmt: skip
            if not training:
                return scores.choice(), None, None, scores.nearest_squared_distance.sum()
            probabilities = scores.logits.softmax(-1)
            # Straight-through on the router's soft assignment over its candidates: the router and every candidate
            # code get gradient from the reconstruction, while the forward value stays the chosen code.
            soft_quantized = (probabilities[:, :, None] * codes[scores.candidates]).sum(1)
            if not balancing:
                return scores.choice(), soft_quantized, None, scores.nearest_squared_distance.sum()
            # The balance term sees detached latents: it trains the router, never pulls the encoder around.
            balance_logits = scores.prior_logits - self.router.candidate_cost(latent_chunk.detach(), codes, scores.candidates)
            balance_probabilities = balance_logits.softmax(-1)
            code_mass = latent_chunk.new_zeros(self.codebook_size).index_add_(
                0, scores.candidates.flatten(), balance_probabilities.flatten()
            )
            return scores.choice(), soft_quantized, code_mass, scores.nearest_squared_distance.sum()

        rows = chunk_rows(self.codebook_size, self.config.assignment_chunk_size)
        signal_chunks = signal_features.float().split(rows) if signal_features is not None else None
        results = []
        for i, (latent_chunk, semantic_chunk) in enumerate(zip(latents.split(rows), semantic_features.split(rows))):
            chunk = (latent_chunk, semantic_chunk, signal_chunks[i] if signal_chunks is not None else None)
            with torch.set_grad_enabled(training):
                results.append(route_chunk(*chunk))
        indices = torch.cat([r[0] for r in results])
        distortion = torch.stack([r[3] for r in results]).sum() if self.training else None
        if not training:
            return indices, None, distortion
        soft_quantized = torch.cat([r[1] for r in results])
        if not balancing:
            return indices, soft_quantized, distortion
        probability_mass = torch.stack([r[2] for r in results]).sum(0)
        num_latents = latents.new_tensor(float(latents.shape[0]))
        if is_distributed():  # the balance of the whole batch, as for usage; the gradient flows back to each process
            probability_mass = all_reduce_with_gradient(probability_mass)
            all_reduce_(num_latents)
        mean_probabilities = probability_mass / num_latents
        output.balance_loss = (mean_probabilities * (mean_probabilities * self.codebook_size).clamp_min(1e-12).log()).sum()
        return indices, soft_quantized, distortion

    # ------------------------------------------------------------------ usage statistics and EMA
    @torch.no_grad()
    def _update_statistics(
        self,
        latents: torch.Tensor,
        indices: torch.Tensor,
        output: CDBVQQuantizerOutput,
        distortion: torch.Tensor | None = None,
    ) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        if self.training:
            # Reduce across processes so usage (and EMA) stay identical on every rank.
            all_reduce_(counts)
        output.utilization, output.perplexity = usage_statistics(counts)
        if not self.training:
            return
        share = code_shares(counts)
        decay = self.config.usage_decay
        self.usage.mul_(decay).add_(share, alpha=1 - decay)
        if self.router is not None and distortion is not None:
            # `counts` is already summed over processes; the distortion is still this process's own.
            mean_distortion = all_reduce_(distortion.detach().clone()) / counts.sum().clamp_min(1.0)
            self.router.update_potentials(
                share, mean_distortion, self.config.potential_step, self.config.potential_bound, self._target_share(share)
            )
        if self.config.ema_decay is not None:
            embed_sum = torch.zeros_like(self.ema_embed_sum, dtype=torch.float32).index_add_(0, indices, latents)
            all_reduce_(embed_sum)
            decay = self.config.ema_decay
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1 - decay)
            # A local sum of K floats rounds differently with another thread count: every process takes rank 0's.
            total = broadcast_(self.ema_cluster_size.sum())
            smoothed = (self.ema_cluster_size + 1e-5) / (total + self.codebook_size * 1e-5) * total
            self.codebook.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    def _target_share(self, share: torch.Tensor) -> torch.Tensor | None:
        """Each code's share under the balanced plan: 1/K (None), or with code roles, its role range's share of the
        tokens spread evenly over the range, so that the potentials balance codes within a role and never pull
        tokens across roles (how much goes to each role is the role prior's decision)."""
        if not self.config.code_roles:
            return None
        num_roles = len(self.config.role_names)
        range_share = share.new_zeros(num_roles).index_add_(0, self.code_to_role, share)
        range_size = torch.bincount(self.code_to_role, minlength=num_roles).clamp_min(1).to(share.dtype)
        return (range_share / range_size)[self.code_to_role]

    # ------------------------------------------------------------------ upkeep
    @torch.no_grad()
    def initialize_codebook(
        self, latents: torch.Tensor, iterations: int = KMEANS_ITERATIONS, seed: int = 0,
        signal_features: torch.Tensor | None = None,
    ) -> None:
        """k-means initialisation of the codebook from latents (N, D), identical on every process.

        Latents of all processes are gathered, rank 0 runs k-means and broadcasts the centres. With code roles and
        the latents' `signal_features` (N, 3), each role's range is initialised from the latents of its kind only
        (`role_targets`), so that a range starts where its content lies.
        """
        self._check_latents(latents)
        samples = self.prepare_latents(all_gather_rows(latents.detach().float()))
        self._check_upkeep_samples(samples)
        pools = self._role_pools(signal_features, samples.shape[0])
        centres = torch.empty(self.codebook_size, samples.shape[1], device=samples.device)
        if not is_distributed() or dist.get_rank() == 0:
            for index, (codes, pool) in enumerate(pools):
                # Ranges that fall back to all latents (none of their kind here) get their own seed: with one seed,
                # ranges of equal size started as copies of each other.
                shared = len(pools) > 1 and pool.numel() == samples.shape[0]
                role_seed = seed + index if shared else seed
                centres[codes] = kmeans(samples[pool], codes.numel(), iterations, role_seed, self.config.assignment_chunk_size)
        broadcast_(centres)
        nearest = nearest_codes(samples, centres, self.config.assignment_chunk_size)
        # Usage starts at the k-means cluster shares (identical everywhere: same samples, same centres), so a code
        # k-means left empty is dead at the first restart instead of after the usage average has decayed.
        shares = torch.bincount(nearest, minlength=self.codebook_size).float() / nearest.numel()
        self._replace_codes(torch.arange(self.codebook_size, device=centres.device), centres, usage=shares)
        if self.router is not None:
            # The router's temperature starts at the k-means distortion.
            self.router.temperature.fill_(float((samples - centres[nearest]).pow(2).sum(-1).mean().clamp_min(1e-8)))
        self.initialized.fill_(True)

    def _role_pools(self, signal_features: torch.Tensor | None, num_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(codes, sample ids) pairs: each role's code ids with the gathered samples of its kind (all samples where
        a role has none of its kind, or without roles or signal features: then one pair of all codes)."""
        device = self.code_to_role.device
        everything = torch.arange(num_samples, device=device)
        # Kinds are known for the supervised role names only (structure / texture / colour); other names share one pool.
        if not self.config.code_roles or signal_features is None or "structure" not in self.config.role_names:
            return [(torch.arange(self.codebook_size, device=device), everything)]
        targets = role_targets(all_gather_rows(signal_features.detach().float()), self.config).to(device)
        pools = []
        for role in range(len(self.config.role_names)):
            codes, pool = (self.code_to_role == role).nonzero().flatten(), (targets == role).nonzero().flatten()
            if codes.numel():
                pools.append((codes, pool if pool.numel() else everything))
        return pools

    @torch.no_grad()
    def dead_codes(self) -> torch.Tensor:
        """Indices of codes whose running usage share is below `dead_code_threshold / codebook_size`."""
        return (self.usage < self.config.dead_code_threshold / self.codebook_size).nonzero().flatten()

    @torch.no_grad()
    def restart_dead_codes(
        self, latents: torch.Tensor, seed: int = 0, signal_features: torch.Tensor | None = None
    ) -> int:
        """Move dead codes onto distinct, randomly drawn recent latents (N, D); returns how many were restarted.

        At most one code per latent: with more dead codes than latents (a large codebook, a small batch), the least
        used are restarted now and the others at the next call, on new latents, instead of many codes landing on
        the same latent (where all but one would die again). A restarted code's usage is set to twice the dead-code
        threshold: it has `log(2) / (1 - usage_decay)` steps (69 at 0.99) to win tokens before it counts as dead.
        With code roles and the latents' `signal_features` (N, 3), a code restarts on a latent of its role's kind.
        Every process must call it: latents are gathered, rank 0 draws, the new codes are broadcast, and the EMA,
        usage and router state of the restarted codes are reset so that the restart takes hold.
        """
        self._check_latents(latents)
        if self.config.dead_code_threshold <= 0:
            return 0
        dead = self.dead_codes()
        if dead.numel() == 0:
            return 0
        samples = self.prepare_latents(all_gather_rows(latents.detach().float()))
        self._check_upkeep_samples(samples)
        dead = dead[self.usage[dead].argsort(stable=True)]
        restarted, picked = [], []
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Every process draws the same (same gathered latents, same seed); rank 0's picks are broadcast all the same.
        # Roles that fall back to the same pool (none of their kind in the batch) take distinct latents in turn.
        taken = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
        for codes, pool in self._role_pools(signal_features, samples.shape[0]):
            free = pool[~taken[pool]]
            role_dead = dead[torch.isin(dead, codes)][: free.numel()]
            picks = free[torch.randperm(free.numel(), generator=generator)[: role_dead.numel()].to(free.device)]
            taken[picks] = True
            restarted.append(role_dead)
            picked.append(picks)
        dead, picks = torch.cat(restarted), broadcast_(torch.cat(picked))
        if dead.numel() == 0:
            return 0
        self._replace_codes(dead, samples[picks], usage=2.0 * self.config.dead_code_threshold / self.codebook_size)
        return int(dead.numel())

    def _replace_codes(self, indices: torch.Tensor, new_codes: torch.Tensor, usage: torch.Tensor | float) -> None:
        if self.router is not None:
            # A new code's potential was learned for the old one's cell (a second k-means initialisation included).
            self.router.potentials[indices] = 0.0
            # A revived code inherits the router key of the live code nearest to it, so the router scores it
            # like its neighbourhood instead of never picking it.
            alive = torch.ones(self.codebook_size, dtype=torch.bool, device=indices.device)
            alive[indices] = False
            alive_ids = alive.nonzero().flatten()
            if alive_ids.numel():
                nearest = alive_ids[nearest_codes(new_codes, self.codes()[alive_ids], self.config.assignment_chunk_size)]
                self.router.code_keys[indices] = self.router.code_keys[nearest]
        self.codebook.weight[indices] = new_codes.to(self.codebook.weight.dtype)
        self.ema_embed_sum[indices] = new_codes.to(self.ema_embed_sum.dtype)
        self.ema_cluster_size[indices] = 1.0
        self.usage[indices] = usage.to(self.usage.dtype) if torch.is_tensor(usage) else usage
        self.signal_statistics.reset(indices)
        self.teacher_statistics.reset(indices)

    # ------------------------------------------------------------------ semantics
    def semantic_losses(
        self,
        indices: torch.Tensor,
        predicted_features: torch.Tensor | None,
        teacher_features: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """Cosine losses against teacher features (N, semantic_dim) of the same tokens (in training, the codes'
        prototype ties first follow the tokens' teacher features: `_follow_prototype_ties`).

        - semantic_distillation: the semantic head's prediction toward the teacher's feature;
        - token_alignment: each token's projected code `W e_k` toward its patch's teacher feature;
        - code_alignment: each projected code toward its prototype (only once prototypes are set).
        """
        with float32_maths(indices.device):  # the ties' statistics and argmax must not round
            teacher = teacher_features.float()
            self._follow_prototype_ties(indices, teacher)
            projected_tokens = apply_float32_out(self.code_projection, self.lookup(indices))
            losses = {
                "semantic_distillation_loss": None,
                "token_alignment_loss": (1 - F.cosine_similarity(projected_tokens, teacher, dim=-1)).mean(),
                "code_alignment_loss": None,
            }
            if predicted_features is not None:
                losses["semantic_distillation_loss"] = (
                    1 - F.cosine_similarity(predicted_features.float(), teacher, dim=-1)
                ).mean()
            if self.has_prototypes:
                projected_codes = apply_float32_out(self.code_projection, self.codes())
                targets = self.prototypes.float().index_select(0, self.code_to_prototype)
                losses["code_alignment_loss"] = (1 - F.cosine_similarity(projected_codes, targets, dim=-1)).mean()
            return losses


@torch.no_grad()
def kmeans(samples: torch.Tensor, num_clusters: int, iterations: int, seed: int, max_entries: int) -> torch.Tensor:
    """Lloyd's k-means with random initial centres; empty clusters keep their previous centre.

    With fewer samples than clusters every sample is a centre (k-means' optimum) and the other centres are copies of
    random samples, all spread a little, so that no two codes are identical (and forever tied), equal samples
    included. No Lloyd step follows: the squared distances between a sample and its copies are below float32's
    cancellation error in ||x||^2 - 2 x.e + ||e||^2, so each step moved another copy exactly onto its sample.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    count = samples.shape[0]
    if count < num_clusters:
        extra = torch.randint(count, (num_clusters - count,), generator=generator)
        picks = torch.cat([torch.randperm(count, generator=generator), extra])
        centres = samples[picks.to(samples.device)].clone()
        # Relative to the samples' own scale too: an absolute 1e-6 is under float32's resolution for latents past ~8.
        scale = torch.maximum(samples.std(0, keepdim=True, correction=0), 1e-3 * samples.abs().amax(0, keepdim=True))
        spread = scale.clamp_min(1e-4) * 0.01  # (one sample: no NaN)
        centres += torch.randn(centres.shape, generator=generator).to(samples.device) * spread
        return centres
    centres = samples[torch.randperm(count, generator=generator)[:num_clusters].to(samples.device)].clone()
    for _ in range(iterations):
        assignment = nearest_codes(samples, centres, max_entries)
        counts = torch.bincount(assignment, minlength=num_clusters).float()
        sums = torch.zeros_like(centres).index_add_(0, assignment, samples)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


__all__ = [
    "CDBVQQuantizer",
    "CDBVQQuantizerOutput",
    "CDBVQRouter",
    "CodeStatistics",
    "SinkhornPotentials",
    "image_signal_features",
    "role_targets",
    "kmeans",
    "nearest_codes",
    "sinkhorn_potentials",
]
