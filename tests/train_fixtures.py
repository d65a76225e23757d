"""A small, seeded adapter-training problem shared by tests/test_train.py and tests/ddp_worker.py."""
from dataclasses import dataclass
from typing import List

import torch

import kangaroo_rt as K
from kangaroo_rt.testing import random_target, tiny_config
from kangaroo_rt.train.states import OnTheFly


@dataclass
class Ex:
    input_ids: List[int]
    loss_mask: List[int]


def make_problem(n_train: int = 64, n_held: int = 8, prompt: int = 4, new: int = 20):
    """(target, scrambled adapter, training source, held-out examples) for exit layer 2.

    The data are the target's own sampled continuations; the adapter starts with a random output
    norm so that its top-1 agreement with the target starts near chance (1/64).
    """
    cfg = tiny_config(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      vocab_size=64)
    target = random_target(cfg, seed=0, head_scale=4.0)
    model = K.KangarooModel(target, None, exit_layer=2)
    prompts = torch.randint(0, cfg.vocab_size, (n_train + n_held, prompt), generator=torch.Generator().manual_seed(0))
    seqs = model.generate(prompts, max_new_tokens=new, do_sample=True, seed=1, kangaroo=None, ignore_eos=True)
    examples = [Ex(s.tolist(), [0] * prompt + [1] * new) for s in seqs]
    adapter = K.Adapter.random(cfg, seed=3, std=cfg.hidden_size ** -0.5)
    with torch.no_grad():
        adapter.norm.weight.copy_(torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(5)))
    return target, adapter, OnTheFly(target, 2, examples[:n_train]), examples[n_train:]
