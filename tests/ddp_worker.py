"""Worker for tests/test_train.py: trains a small adapter under torchrun (or alone) and saves it.

usage: python tests/ddp_worker.py OUT_FILE MICRO_BATCH GRAD_ACCUM STEPS
"""
import os
import sys

import torch

from kangaroo_rt.train.trainer import TrainConfig, Trainer, finish_distributed

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_fixtures import make_problem  # noqa: E402


def main() -> None:
    out, micro, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    target, adapter, source, _ = make_problem()
    cfg = TrainConfig(steps=steps, micro_batch=micro, grad_accum=accum, lr=1e-2, warmup_steps=2,
                      clip="value", clip_value=0.5, progress=False)
    trainer = Trainer(target, adapter, 2, source, cfg)
    trainer.train()
    if trainer.rank == 0:
        torch.save(adapter.state_dict(), out)
    del trainer
    finish_distributed()
    # Even after that, torch 2.13's gloo teardown at interpreter exit aborted now and then (1 in ~30 runs here,
    # after all the work): this worker's job is the numbers it saved, so it leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
