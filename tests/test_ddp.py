"""Two-process DistributedDataParallel training on the CPU (gloo): the ranks stay in lock-step.

Each rank trains a tiny STCN for 3 iterations with both correspondence losses and gradient
accumulation (effective batch 4 = 2 ranks x 2 micro-batches of 1), then writes its parameters;
they must be bit-identical across ranks and different from the initial weights.
"""
import os
import socket

import torch
import torch.multiprocessing as mp

from test_trainer import SEQUENCES, TINY_STCN  # noqa: E402  (tests/ is on sys.path under pytest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from corrvos.training.trainer import Trainer, TrainOptions, _cleanup_distributed

    try:
        opts = TrainOptions(model=TINY_STCN, data=[root], sequences=SEQUENCES, out=out, crop=64, batch=4, accum=2,
                            iters=3, workers=0, progress=False, log_every=1, save_every=0, device="cpu", seed=5)
        trainer = Trainer(opts)
        initial = {k: v.clone() for k, v in trainer.net.state_dict().items()}
        trainer.train()
        torch.save({"final": trainer.net.state_dict(), "initial": initial, "micro_batch": trainer.micro_batch},
                   os.path.join(out, f"params_rank{rank}.pt"))
    finally:
        _cleanup_distributed()


def test_two_process_gloo_ranks_stay_identical(davis2016_root, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(davis2016_root), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    assert r0["micro_batch"] == 1
    # Both ranks start from the same weights (same seed; DDP also broadcasts rank 0's).
    assert all(torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    moved = [k for k in r0["final"] if r0["final"][k].is_floating_point()
             and not torch.equal(r0["final"][k], r0["initial"][k])]
    assert len(moved) > 10
    assert (tmp_path / "final.safetensors").exists() and (tmp_path / "log.csv").exists()
    # Every rank saved its own RNG states next to rank 0's checkpoint (needed for an exact resume).
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt_00000003.pt", "ckpt_00000003.rng0", "ckpt_00000003.rng1"]
