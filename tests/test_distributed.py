"""Sinkhorn-Knopp across ranks: two gloo processes on CPU must reproduce single-process balancing on
the concatenated batch (the image axis is the one split across ranks)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capi_lab.sinkhorn import teacher_targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, logits: torch.Tensor, positionwise: bool, fused: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = logits.chunk(world, dim=0)[rank]  # this rank's images
        if fused:  # the Triton kernels (through Triton's interpreter on the CPU; see conftest.py)
            from capi_lab.kernels.fused_clustering import teacher_outputs

            out[rank] = teacher_outputs(local, None, 0.06, positionwise=positionwise)[0]
        else:
            out[rank] = teacher_targets(local, temperature=0.06, n_iter=3, positionwise=positionwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("positionwise", [True, False])
def test_two_rank_targets_equal_single_process_on_concatenated_batch(positionwise, fused):
    torch.manual_seed(0)
    logits = torch.randn(8, 10, 32) * 3  # 8 images, 10 positions, 32 prototypes
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), logits, positionwise, fused, out), nprocs=2, join=True)
        got = torch.cat([out[0], out[1]], dim=0)
    want = teacher_targets(logits, temperature=0.06, n_iter=3, positionwise=positionwise)
    assert torch.allclose(got, want, atol=2e-6)
    # and each rank alone would have balanced differently
    alone = teacher_targets(logits[:4], temperature=0.06, n_iter=3, positionwise=positionwise)
    assert not torch.allclose(alone, want[:4], atol=1e-3)
