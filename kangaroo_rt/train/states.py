"""Training targets from the frozen model: exit-layer and final hidden states, on the fly or dumped.

Logits are never stored (vocab-sized per token); the final hidden state is, and ``norm`` + ``lm_head``
are applied at training time. A dump is a folder of safetensors shards plus ``index.json``; it is
written shard by shard, so an interrupted dump resumes where it stopped.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch

from .. import ops
from ..model import Transformer

if TYPE_CHECKING:  # anything with input_ids and loss_mask lists works
    from .data import Example


@torch.no_grad()
def target_states(target: Transformer, exit_layer: int, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) right-padded -> (exit hidden, final hidden before the norm), each (B, T, D).

    Padding sits after every valid token, so causal attention keeps it out of the valid positions.
    """
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    cache = target.new_cache(b, t)
    rope = target.rope(positions)
    with ops.device_context(target.device):  # Triton kernels launch on the current device
        exit_hidden = target.forward_layers(target.embed(input_ids), positions, 0, exit_layer, cache, kv_len=t,
                                            rope=rope)
        final = target.forward_layers(exit_hidden, positions, exit_layer, target.num_layers, cache, kv_len=t,
                                      rope=rope)
    return exit_hidden, final


def pad_batch(examples: Sequence["Example"], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded with 0, position mask (B, T): 1 where position t is trained,
    i.e. where token t+1 exists and carries loss (the adapter at t predicts token t+1)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        if n > 1:
            mask[i, : n - 1] = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
    return ids.to(device), mask.to(device)


def trained_positions(example: "Example") -> int:
    """How many positions of ``example`` carry loss (the normaliser of a distributed step)."""
    return int(sum(example.loss_mask[1:]))


class OnTheFly:
    """Batches computed from the frozen target at each step."""

    def __init__(self, target: Transformer, exit_layer: int, examples: Sequence["Example"]) -> None:
        self.target, self.exit_layer, self.examples = target, exit_layer, list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def weight(self, index: int) -> int:
        return trained_positions(self.examples[index])

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        ids, mask = pad_batch([self.examples[i] for i in indices], self.target.device)
        exit_hidden, final = target_states(self.target, self.exit_layer, ids)
        return {"exit": exit_hidden, "final": final, "mask": mask}


def dump_states(target: Transformer, exit_layer: int, examples: Sequence["Example"], folder: str,
                shard_size: int = 256, batch_size: int = 8, dtype: torch.dtype = torch.float16,
                progress: bool = True) -> str:
    """Write exit/final hidden states of ``examples`` to safetensors shards in ``folder`` (resumable)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    os.makedirs(folder, exist_ok=True)
    index_path = os.path.join(folder, "index.json")
    index = {"exit_layer": exit_layer, "num_examples": len(examples), "shard_size": shard_size, "shards": []}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            old = json.load(f)
        if (old.get("exit_layer"), old.get("num_examples"), old.get("shard_size")) != (exit_layer, len(examples), shard_size):
            raise ValueError(f"{folder} holds a dump made with other settings ({index_path}); use another folder")
        index = old
    done = set(index["shards"])
    n_shards = (len(examples) + shard_size - 1) // shard_size
    bar = tqdm(total=len(examples), desc="dumping hidden states", disable=not progress, unit="ex")
    for s in range(n_shards):
        name = f"shard-{s:05d}.safetensors"
        lo, hi = s * shard_size, min(len(examples), (s + 1) * shard_size)
        if name in done:
            bar.update(hi - lo)
            continue
        tensors: Dict[str, torch.Tensor] = {}
        for start in range(lo, hi, batch_size):
            chunk = list(range(start, min(hi, start + batch_size)))
            ids, mask = pad_batch([examples[i] for i in chunk], target.device)
            exit_hidden, final = target_states(target, exit_layer, ids)
            for row, i in enumerate(chunk):
                n = len(examples[i].input_ids)
                tensors[f"{i}.exit"] = exit_hidden[row, :n].to("cpu", dtype).contiguous()
                tensors[f"{i}.final"] = final[row, :n].to("cpu", dtype).contiguous()
                tensors[f"{i}.mask"] = mask[row, :n].to("cpu").contiguous()
            bar.update(len(chunk))
        tmp = os.path.join(folder, name + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(folder, name))  # a shard exists only once complete
        index["shards"].append(name)
        with open(index_path, "w") as f:
            json.dump(index, f)
    bar.close()
    return folder


class Dumped:
    """Batches read from a :func:`dump_states` folder."""

    def __init__(self, folder: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from safetensors import safe_open

        index_path = os.path.join(folder, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no index.json in {folder}: not a hidden-state dump")
        with open(index_path) as f:
            self.index = json.load(f)
        n = self.index["num_examples"]
        expected = (n + self.index["shard_size"] - 1) // self.index["shard_size"]
        if len(self.index["shards"]) != expected:
            raise ValueError(f"dump {folder} is incomplete ({len(self.index['shards'])}/{expected} shards); "
                             "run the dump again to resume it")
        self.folder, self.device, self.dtype = folder, device, dtype
        self._files = [safe_open(os.path.join(folder, s), framework="pt") for s in sorted(self.index["shards"])]
        self._weights: List[int] = [int(self._get(i, "mask").sum()) for i in range(n)]

    @property
    def exit_layer(self) -> int:
        return self.index["exit_layer"]

    def __len__(self) -> int:
        return self.index["num_examples"]

    def _get(self, i: int, what: str) -> torch.Tensor:
        return self._files[i // self.index["shard_size"]].get_tensor(f"{i}.{what}")

    def weight(self, index: int) -> int:
        return self._weights[index]

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        rows = [(self._get(i, "exit"), self._get(i, "final"), self._get(i, "mask")) for i in indices]
        width = max(r[0].shape[0] for r in rows)
        dim = rows[0][0].shape[1]
        exit_hidden = torch.zeros(len(rows), width, dim, dtype=self.dtype)
        final = torch.zeros_like(exit_hidden)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, (e, f, m) in enumerate(rows):
            exit_hidden[j, : len(e)], final[j, : len(f)], mask[j, : len(m)] = e, f, m
        return {"exit": exit_hidden.to(self.device), "final": final.to(self.device), "mask": mask.to(self.device)}


def source_weights(source) -> List[int]:
    return [source.weight(i) for i in range(len(source))]


def first_tokens(examples: Sequence["Example"], n: int, max_prompt: int) -> List[List[int]]:
    """Prompts for acceptance evaluation: each example up to its first trained token (capped)."""
    out = []
    for e in examples[:n]:
        cut = next((i for i, m in enumerate(e.loss_mask) if m and i > 0), len(e.input_ids))
        out.append(e.input_ids[: max(1, min(cut, max_prompt))])
    return out


__all__ = ["target_states", "pad_batch", "OnTheFly", "Dumped", "dump_states", "source_weights", "first_tokens",
           "trained_positions"]
