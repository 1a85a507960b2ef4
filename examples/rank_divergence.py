"""GG401 rank-divergence: a no_sync() window off by one, so each rank steps on its own gradients.

Runs two processes on this machine (gloo, loopback). The bug is FunASR's: the
condition for no_sync() skips sync on the micro-batch that steps instead of on
the ones before it.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard

ACCUM = 2


def train(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    optimizer = gradguard.guard(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, check_ranks_every=1
    )
    torch.manual_seed(rank)
    for i in range(8):
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        if i % ACCUM != 0:  # bug: should be (i + 1) % ACCUM != 0
            with model.no_sync():
                nn.functional.mse_loss(model(x), y).backward()
        else:
            nn.functional.mse_loss(model(x), y).backward()
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            optimizer.zero_grad()
    gradguard.unguard(optimizer)
    dist.barrier()  # gloo: no rank tears down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(train, args=(free_port,), nprocs=2)
