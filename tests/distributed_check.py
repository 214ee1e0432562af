"""Helper for tests: the global-batch loss on 2 gloo processes vs 1 process (importable by spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g)
    y = torch.randn(8, 5, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    w_img = torch.randn(5, 4, generator=g)
    w_txt = torch.randn(5, 4, generator=g)
    return x, y, ids, w_img, w_txt


def loss_and_grads(x, y, ids, w_img, w_txt, loss_cfg):
    from harma.model.losses import harma_loss

    w_img = w_img.clone().requires_grad_(True)
    w_txt = w_txt.clone().requires_grad_(True)
    temp = torch.full((1,), 0.1, requires_grad=True)
    out = harma_loss(F.normalize(x @ w_img, dim=-1), F.normalize(y @ w_txt, dim=-1), ids, temp, loss_cfg)
    out["loss"].backward()
    return out["loss"].detach(), [w_img.grad, w_txt.grad, temp.grad]


def worker(rank: int, world: int, port: int, result_path: str, loss_cfg) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y, ids, w_img, w_txt = make_problem()
    # Unequal shares (5 + 3 rows): ranks may hold different batch sizes after bad rows are dropped.
    cut = 5
    part = slice(0, cut) if rank == 0 else slice(cut, x.shape[0])
    loss, grads = loss_and_grads(x[part], y[part], ids[part], w_img, w_txt, loss_cfg)
    for grad in grads:  # what data-parallel training does: average over ranks
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, result_path)
    dist.barrier()  # both ranks are done with the group
    # Skip interpreter teardown: gloo's C++ destructors occasionally abort (std::terminate) at
    # process exit, which would fail a correct run. The result is already on disk.
    os._exit(0)
