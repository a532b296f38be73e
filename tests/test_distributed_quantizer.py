"""Quantizer state stays identical on every process: two CPU processes over gloo, each with its own data."""

import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdb_tokenizer.quantization_cdb_vq import kmeans, sinkhorn_potentials
from cdb_tokenizer.tools.roles import three_role_ranges
from conftest import SEVERAL_PROCESSES, tiny_model

pytestmark = SEVERAL_PROCESSES

WORLD_SIZE = 2


def rank_latents(rank: int, step: int, num: int = 96) -> torch.Tensor:
    """Different data on every rank (and step)."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(num, 8, generator=generator) + rank


def rank_signals(rank: int, step: int, num: int = 96) -> torch.Tensor:
    """Image-signal features (low-pass, Laplacian, chroma) of every kind of role, different on every rank."""
    generator = torch.Generator().manual_seed(500 + 1000 * rank + step)
    return torch.rand(num, 3, generator=generator) * torch.tensor([0.3, 0.05, 0.8])


def rank_semantic(rank: int, step: int, num: int = 96) -> torch.Tensor:
    generator = torch.Generator().manual_seed(300 + 1000 * rank + step)
    return torch.randn(num, 32, generator=generator)


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        results = {}
        cases = [("nearest", 0.8, False), ("sinkhorn", None, False), ("cdb", None, False), ("cdb", 0.8, False), ("cdb", 0.8, True)]
        for assignment, ema_decay, roles in cases:
            # With roles: ranges initialised and restarted on latents of their kind (signals differ between ranks).
            extra = {"code_roles": three_role_ranges(64)} if roles else {}
            quantizer = tiny_model(seed=0, assignment=assignment, ema_decay=ema_decay, **extra).quantizer
            name = f"{assignment}{'+ema' if ema_decay else ''}{'+roles' if roles else ''}"
            signals = (lambda step: rank_signals(rank, step)) if roles else (lambda step: None)
            quantizer.train()
            quantizer.initialize_codebook(rank_latents(rank, 0), signal_features=signals(0))
            results[f"{name}/init"] = quantizer.codebook.weight.detach().clone()
            quantizer.set_prototypes(torch.randn(8, 32, generator=torch.Generator().manual_seed(7)))
            results[f"{name}/ties_0"] = quantizer.code_to_prototype.clone()
            for step in range(1, 4):
                output = quantizer(rank_latents(rank, step), semantic_features=torch.randn(96, 32), signal_features=signals(step))
                results[f"{name}/indices_{step}"] = output.indices
                # Teacher features differ between ranks too: the prototype ties follow their all-reduced statistics.
                teacher = torch.randn(96, 32, generator=torch.Generator().manual_seed(77 + 1000 * rank + step))
                quantizer.semantic_losses(output.indices, None, teacher)
            quantizer.usage[:7] = 0.0  # the same codes are dead everywhere: usage is reduced across ranks
            restarted = quantizer.restart_dead_codes(rank_latents(rank, 9), signal_features=signals(9))
            results[f"{name}/restarted"] = torch.tensor(restarted)
            results[f"{name}/state"] = {k: v.detach().clone() for k, v in quantizer.state_dict().items()}
        # One batch split over the two ranks: the router's running statistics must be those of the whole batch.
        split = tiny_model(seed=0, assignment="cdb", ema_decay=0.8, balance_weight=0.1).quantizer.train()
        split.initialize_codebook(rank_latents(rank, 0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 4):
                output = split(rank_latents(rank, step), semantic_features=rank_semantic(rank, step))
            output.balance_loss.backward()
        results["split_warnings"] = [str(w.message) for w in caught]
        results["split_key_gradient"] = split.router.code_keys.grad.clone()
        results["split_state"] = {k: v.detach().clone() for k, v in split.state_dict().items()}
        results["split_balance_loss"] = output.balance_loss.detach()
        potentials = sinkhorn_potentials(rank_latents(rank, 5), torch.randn(64, 8, generator=torch.Generator().manual_seed(3)), 10.0, 5, 64 * 30)
        results["sinkhorn_column"] = potentials.column
        # Ranks with other thread counts (per-node OMP settings) sum a large codebook's statistics in another order.
        torch.set_num_threads(1 + rank)
        large = tiny_model(seed=0, assignment="cdb", ema_decay=0.8, codebook_size=65536, dead_code_threshold=0.0).quantizer.train()
        large.initialize_codebook(torch.randn(4096, 8, generator=torch.Generator().manual_seed(rank)), iterations=1)
        for step in range(2):
            large(torch.randn(4096, 8, generator=torch.Generator().manual_seed(10 + rank + step)))
        results["threads_state"] = {k: v.detach().clone() for k, v in large.state_dict().items()}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_keep_identical_quantizer_state(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE))
    for assignment in ("nearest+ema", "sinkhorn", "cdb", "cdb+ema", "cdb+ema+roles"):
        torch.testing.assert_close(first[f"{assignment}/init"], second[f"{assignment}/init"], rtol=0, atol=0)
        assert int(first[f"{assignment}/restarted"]) == int(second[f"{assignment}/restarted"]) == 7
        for name, value in first[f"{assignment}/state"].items():
            torch.testing.assert_close(value, second[f"{assignment}/state"][name], rtol=0, atol=0, msg=f"{assignment} {name}")
        # The router's potentials and temperature moved (they are part of the state compared above).
        if assignment.startswith("cdb"):
            assert float(first[f"{assignment}/state"]["router.potentials"].abs().max()) > 0
        assert not torch.equal(first[f"{assignment}/ties_0"], first[f"{assignment}/state"]["code_to_prototype"])
        # Data really differed between ranks, so identical state is the result of the reductions.
        assert not torch.equal(first[f"{assignment}/indices_1"], second[f"{assignment}/indices_1"])

    # Other thread counts on the two ranks: the local sums of 65,536 running statistics differ in their last bits,
    # so rank 0's are the ones used (the EMA codebook once drifted by up to 5e-7 between ranks).
    for name, value in first["threads_state"].items():
        torch.testing.assert_close(value, second["threads_state"][name], rtol=0, atol=0, msg=f"threads {name}")

    # k-means ran on the latents of both ranks together (rank order), as a single process would.
    both = torch.cat([rank_latents(0, 0), rank_latents(1, 0)])
    torch.testing.assert_close(first["nearest+ema/init"], kmeans(both, 64, 10, 0, 2**24))

    # A batch split over the ranks updates usage, temperature and potentials as one process with all of it does
    # (the temperature once divided the distortion by the number of processes).
    single = tiny_model(seed=0, assignment="cdb", ema_decay=0.8, balance_weight=0.1).quantizer.train()
    single.initialize_codebook(torch.cat([rank_latents(0, 0), rank_latents(1, 0)]))
    for step in range(1, 4):
        output = single(
            torch.cat([rank_latents(0, step), rank_latents(1, step)]),
            semantic_features=torch.cat([rank_semantic(0, step), rank_semantic(1, step)]),
        )
    # The balance loss too is the whole batch's (it was each process's own half).
    for rank_results in (first, second):
        torch.testing.assert_close(rank_results["split_balance_loss"], output.balance_loss.detach(), rtol=1e-4, atol=1e-6)
    # Its gradient reaches the router of every process: averaged over the ranks (as DDP averages gradients) it is the
    # single process's, and the reduction warns nothing (torch's deprecated one warned at every step of every rank).
    output.balance_loss.backward()
    mean_gradient = (first["split_key_gradient"] + second["split_key_gradient"]) / 2
    assert float(single.router.code_keys.grad.abs().max()) > 0
    torch.testing.assert_close(mean_gradient, single.router.code_keys.grad, rtol=1e-3, atol=1e-7)
    assert first["split_warnings"] == second["split_warnings"] == []
    for name in ("router.temperature", "router.potentials", "usage", "codebook.weight", "ema_cluster_size"):
        torch.testing.assert_close(first["split_state"][name], single.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)

    # Sinkhorn's marginals are reduced: each rank holds the potentials of the global batch.
    codes = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    single = sinkhorn_potentials(torch.cat([rank_latents(0, 5), rank_latents(1, 5)]), codes, 10.0, 5, 2**24)
    torch.testing.assert_close(first["sinkhorn_column"], single.column, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second["sinkhorn_column"], single.column, atol=1e-4, rtol=1e-4)
