"""Cheap token-updates: one teacher-forced pass dumps several exit layers and the target's top-k, once.

A training step of the adapter needs, per position, the target's state at the exit layer (the adapter's
input) and the target's next-token distribution (its label). :mod:`kangaroo_rt.train.states` keeps the final
hidden state and applies the 49152-row head at every step; here the head runs once, at dump time, and only
its top-k log-probabilities are kept (k x 6 bytes a token instead of a vocabulary-sized row). One pass of
the target writes the states of every requested exit layer, so an exit-layer study costs one dump.

A dump is a folder of safetensors shards plus ``index.json``. Each shard packs its examples token-major:

``tokens``      (T,) int32      the input ids, examples back to back
``offsets``     (n+1,) int64    example i is tokens[offsets[i]:offsets[i+1]]
``mask``        (T,) bool       position t is trained (token t+1 exists and carries loss; see pad_batch)
``exit_<l>``    (T, D) bf16     the hidden state entering layer l (``hidden_states[l]`` in HF numbering)
``topk_ids``    (T, k) int32    the target's k most likely next tokens, most likely first
``topk_logp``   (T, k) float16  their log-probabilities under the full vocabulary

A shard is written to a temporary name and renamed when complete, and the index lists complete shards
only, so a dump cut off at any moment resumes at the first missing shard. Training reads one exit layer's
states of every shard into memory (2 bytes x D per token) and samples batches from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..model import Transformer
from .states import pad_batch

FORMAT = "kangaroo_rt.topk_dump/1"


def examples_fingerprint(examples: Sequence) -> str:
    """A short hash of every example's ids and loss mask: a resumed dump must be of the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.input_ids, dtype=torch.int32).numpy().tobytes())
        h.update(bytes(int(m) for m in e.loss_mask))
    return h.hexdigest()[:16]


def _shard_ranges(examples: Sequence, shard_tokens: int) -> List[range]:
    """Consecutive example ranges of about ``shard_tokens`` tokens each (at least one example)."""
    ranges, lo, tokens = [], 0, 0
    for i, e in enumerate(examples):
        tokens += len(e.input_ids)
        if tokens >= shard_tokens:
            ranges.append(range(lo, i + 1))
            lo, tokens = i + 1, 0
    if lo < len(examples):
        ranges.append(range(lo, len(examples)))
    return ranges


def _batches(indices: Sequence[int], examples: Sequence, batch_tokens: int) -> List[List[int]]:
    """Length-sorted groups whose padded size (rows x longest) stays under ``batch_tokens``."""
    order = sorted(indices, key=lambda i: len(examples[i].input_ids))
    out: List[List[int]] = []
    for i in order:
        n = len(examples[i].input_ids)
        if out and (len(out[-1]) + 1) * n <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def target_topk(target: Transformer, hidden: torch.Tensor, k: int, chunk: int = 512):
    """Final norm + head over ``hidden`` (n, D) in chunks -> (top-k log-probs (n, k) float32, ids (n, k) int64)."""
    logps, ids = [], []
    for lo in range(0, hidden.shape[0], chunk):
        logits = target.head(hidden[lo:lo + chunk]).float()
        values, index = logits.topk(k, dim=-1)
        logps.append(values - torch.logsumexp(logits, dim=-1, keepdim=True))
        ids.append(index)
    return torch.cat(logps), torch.cat(ids)


@torch.no_grad()
def _shard_tensors(target: Transformer, examples: Sequence, indices: range, exits: Sequence[int], k: int,
                   batch_tokens: int) -> Dict[str, torch.Tensor]:
    n_tok = [len(examples[i].input_ids) for i in indices]
    offsets = torch.zeros(len(n_tok) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(n_tok).cumsum(0)
    total, dim = int(offsets[-1]), target.config.hidden_size
    out = {"tokens": torch.empty(total, dtype=torch.int32), "offsets": offsets,
           "mask": torch.zeros(total, dtype=torch.bool),
           "topk_ids": torch.empty(total, k, dtype=torch.int32), "topk_logp": torch.empty(total, k, dtype=torch.float16)}
    for e in exits:
        out[f"exit_{e}"] = torch.empty(total, dim, dtype=torch.bfloat16)
    where = {i: int(offsets[j]) for j, i in enumerate(indices)}
    stops = sorted(set(exits)) + [target.num_layers]
    for group in _batches(list(indices), examples, batch_tokens):
        ids, mask = pad_batch([examples[i] for i in group], target.device)
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        cache = target.new_cache(b, t)
        rope = target.rope(positions)
        states, h, layer = {}, target.embed(ids), 0
        with ops.device_context(target.device):
            for stop in stops:
                h = target.forward_layers(h, positions, layer, stop, cache, kv_len=t, rope=rope)
                states[stop], layer = h, stop
            lengths = [len(examples[i].input_ids) for i in group]
            valid = torch.cat([states[target.num_layers][r, :n] for r, n in enumerate(lengths)])
            logp, top = target_topk(target, valid, k)
        at = 0
        for r, (i, n) in enumerate(zip(group, lengths)):
            lo = where[i]
            out["tokens"][lo:lo + n] = ids[r, :n].to(torch.int32).cpu()
            out["mask"][lo:lo + n] = mask[r, :n].cpu()
            out["topk_ids"][lo:lo + n] = top[at:at + n].to(torch.int32).cpu()
            out["topk_logp"][lo:lo + n] = logp[at:at + n].to(torch.float16).cpu()
            for e in exits:
                out[f"exit_{e}"][lo:lo + n] = states[e][r, :n].to("cpu", torch.bfloat16)
            at += n
    return out


def dump_topk(target: Transformer, examples: Sequence, folder: str, exits: Sequence[int], k: int = 16,
              shard_tokens: int = 65536, batch_tokens: int = 4096, progress: bool = True,
              stop_after_s: Optional[float] = None, meta: Optional[dict] = None) -> dict:
    """Dump ``examples`` (``input_ids``/``loss_mask``) into ``folder``, resuming a partial dump; -> the index.

    exits: exit layers to keep (each in 1..N-1); k: top-k kept of the target's distribution; shard_tokens:
    tokens per shard (the unit of resumption); batch_tokens: padded tokens per forward; stop_after_s: stop
    (cleanly, after the shard that crosses it) once this many seconds have passed, to time-box a run; meta: stored in the index as is.

    A set that has grown (a dump's examples, finished or not, followed by new ones, as a resumable generation
    stage appends them) extends the dump: its shards stay and the new examples get shards of their own after them.
    Any other change of the examples or settings is an error.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    exits = sorted(set(int(e) for e in exits))
    if not exits or not all(1 <= e < target.num_layers for e in exits):
        raise ValueError(f"exit layers must be in 1..{target.num_layers - 1}, got {exits}")
    if not 1 <= k <= target.config.vocab_size:
        raise ValueError(f"k must be in 1..{target.config.vocab_size}, got {k}")
    if not examples:
        raise ValueError("no examples to dump")
    os.makedirs(folder, exist_ok=True)
    index_path = os.path.join(folder, "index.json")
    settings = {"format": FORMAT, "exits": exits, "k": k, "shard_tokens": shard_tokens,
                "num_examples": len(examples), "fingerprint": examples_fingerprint(examples),
                "hidden_size": target.config.hidden_size, "num_layers": target.num_layers,
                "target_dtype": str(target.dtype).replace("torch.", "")}
    segments = [0]  # where each appended part of the set begins: shards never straddle two parts
    index = {**settings, "shards": {}, "meta": meta or {}}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            old = json.load(f)
        differ = [key for key, value in settings.items() if old.get(key) != value]
        if differ and _grown(old, examples, differ):
            old_n = int(old["num_examples"])
            old.update(settings)
            old["segments"] = old.get("segments", [0]) + [old_n]
            print(f"dump {folder}: {len(examples) - old_n} new examples after the {old_n} already dumped")
        elif differ:
            raise ValueError(f"{folder} holds a dump made with other settings ({', '.join(differ)} differ); "
                             "use another folder or delete it")
        index = old
        segments = index.get("segments", [0])
    ranges = _segment_ranges(examples, segments, shard_tokens)
    index["num_shards"] = len(ranges)
    total_tokens = sum(len(e.input_ids) for e in examples)
    bar = tqdm(total=total_tokens, desc=f"dumping exits {exits} + top-{k}", unit="tok", disable=not progress,
               smoothing=0.05)
    start = time.perf_counter()
    made = 0
    for s, rng in enumerate(ranges):
        name = f"shard-{s:05d}.safetensors"
        n_tokens = sum(len(examples[i].input_ids) for i in rng)
        if name in index["shards"]:
            bar.update(n_tokens)
            continue
        tensors = _shard_tensors(target, examples, rng, exits, k, batch_tokens)
        tmp = os.path.join(folder, name + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(folder, name))
        index["shards"][name] = {"first": rng.start, "count": len(rng), "tokens": n_tokens,
                                 "trained": int(tensors["mask"].sum())}
        tmp_index = index_path + ".tmp"
        with open(tmp_index, "w") as f:
            json.dump(index, f)
        os.replace(tmp_index, index_path)
        made += n_tokens
        bar.update(n_tokens)
        bar.set_postfix(shards=f"{len(index['shards'])}/{len(ranges)}",
                        tok_s=f"{made / (time.perf_counter() - start):.0f}")
        if stop_after_s is not None and time.perf_counter() - start >= stop_after_s:
            break
    bar.close()
    return index


def _grown(old: dict, examples: Sequence, differ: List[str]) -> bool:
    """Whether ``examples`` are a dump's examples with more after them (only the examples differ). The old dump
    need not be finished: a segment's shards do not depend on what follows it."""
    if not set(differ) <= {"num_examples", "fingerprint"}:
        return False
    n = int(old["num_examples"])
    return n < len(examples) and examples_fingerprint(examples[:n]) == old["fingerprint"]


def _segment_ranges(examples: Sequence, segments: Sequence[int], shard_tokens: int) -> List[range]:
    """The shards of each appended part of the set, in order (one part when the set never grew)."""
    ranges: List[range] = []
    for lo, hi in zip(segments, list(segments[1:]) + [len(examples)]):
        ranges += [range(lo + r.start, lo + r.stop) for r in _shard_ranges(examples[lo:hi], shard_tokens)]
    return ranges


def read_index(folder: str) -> dict:
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index.json in {folder}: not a top-k dump (kangaroo_rt.train.topk.dump_topk)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a {FORMAT} dump (format {index.get('format')!r})")
    return index


class TopKDump:
    """One exit layer of a top-k dump, in memory, for training and evaluation.

    ``complete=False`` accepts a dump that is still being written (its finished shards); otherwise an
    incomplete dump is an error that says how to resume it.
    """

    def __init__(self, folder: str, exit_layer: int, complete: bool = True) -> None:
        from safetensors import safe_open

        self.index = index = read_index(folder)
        if exit_layer not in index["exits"]:
            raise ValueError(f"{folder} has exit layers {index['exits']}, not {exit_layer}")
        if complete and len(index["shards"]) != index["num_shards"]:
            raise ValueError(f"dump {folder} is incomplete ({len(index['shards'])}/{index['num_shards']} shards): "
                             "run the dump again to resume it")
        if not index["shards"]:
            raise ValueError(f"dump {folder} has no complete shard yet")
        self.exit_layer, self.k = exit_layer, index["k"]
        parts: Dict[str, List[torch.Tensor]] = {n: [] for n in ("tokens", "mask", "topk_ids", "topk_logp", "exit")}
        offsets: List[torch.Tensor] = []
        base = 0
        for name in sorted(index["shards"]):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in ("tokens", "mask", "topk_ids", "topk_logp"):
                    parts[key].append(f.get_tensor(key))
                parts["exit"].append(f.get_tensor(f"exit_{exit_layer}"))
                off = f.get_tensor("offsets")
            offsets.append(off[:-1] + base)
            base += int(off[-1])
        self.tokens, self.mask = torch.cat(parts["tokens"]), torch.cat(parts["mask"])  # (T,) int32, (T,) bool
        self.topk_ids, self.topk_logp = torch.cat(parts["topk_ids"]), torch.cat(parts["topk_logp"])  # (T, k)
        self.exit = torch.cat(parts["exit"])  # (T, D) bf16
        self.starts = torch.cat(offsets + [torch.tensor([base])])  # (n+1,) int64
        self.lengths = (self.starts[1:] - self.starts[:-1]).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def num_trained(self) -> int:
        return int(self.mask.sum())

    def weight(self, i: int) -> int:
        lo, hi = int(self.starts[i]), int(self.starts[i + 1])
        return int(self.mask[lo:hi].sum())

    def batch(self, indices: Sequence[int], max_len: Optional[int] = None,
              device: torch.device = torch.device("cpu")) -> Dict[str, torch.Tensor]:
        """Right-padded (B, T) batch of ``indices``, each cut to ``max_len`` positions (from its start):
        exit (B, T, D) float32, mask (B, T) bool, topk_ids (B, T, k) int64, topk_logp (B, T, k) float32."""
        spans = []
        for i in indices:
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            spans.append((lo, lo + min(hi - lo, max_len or hi - lo)))
        width = max(hi - lo for lo, hi in spans)
        b, d = len(spans), self.exit.shape[1]
        exit_hidden = torch.zeros(b, width, d)
        mask = torch.zeros(b, width, dtype=torch.bool)
        ids = torch.zeros(b, width, self.k, dtype=torch.int64)
        logp = torch.full((b, width, self.k), -float("inf"))
        for r, (lo, hi) in enumerate(spans):
            n = hi - lo
            exit_hidden[r, :n] = self.exit[lo:hi].float()
            mask[r, :n] = self.mask[lo:hi]
            ids[r, :n] = self.topk_ids[lo:hi].long()
            logp[r, :n] = self.topk_logp[lo:hi].float()
        return {"exit": exit_hidden.to(device), "mask": mask.to(device), "topk_ids": ids.to(device),
                "topk_logp": logp.to(device)}


def topk_loss(head_weight: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, topk_ids: torch.Tensor,
              topk_logp: torch.Tensor, draft_ids: Optional[torch.Tensor] = None, labels: str = "top1",
              chunk: int = 2048):
    """The adapter's loss against dumped top-k labels, through the frozen head (the full head or, with
    ``draft_ids``, its K-row restriction: the only head drafting uses).

    head_weight: (V, D) the target's lm_head; y: (B, T, D) the adapter's output; mask: (B, T) bool;
    topk_ids / topk_logp: (B, T, k) the target's top-k; draft_ids: sorted (K,) int64 or None.
    labels="top1": cross-entropy on the target's argmax (what greedy verification checks); positions whose
    argmax is outside the draft vocabulary cannot be drafted and carry no loss (they count as misses).
    labels="soft": cross-entropy against the target's top-k, renormalized over those inside the vocabulary.
    Returns (loss summed over trained positions, trained positions, positions where the draft's argmax is
    the target's argmax).
    """
    y, ids, logp = y[mask], topk_ids[mask], topk_logp[mask]  # (n, D), (n, k), (n, k)
    weight = head_weight if draft_ids is None else head_weight.index_select(0, draft_ids)
    if draft_ids is None:
        local = ids
    else:
        lookup = torch.full((head_weight.shape[0],), -1, dtype=torch.int64, device=ids.device)
        lookup[draft_ids] = torch.arange(draft_ids.numel(), device=ids.device)
        local = lookup[ids]  # (n, k), -1 outside the draft vocabulary
    total = y.new_zeros(())
    agree = torch.zeros((), dtype=torch.long, device=y.device)
    for lo in range(0, y.shape[0], chunk):
        logits = F.linear(y[lo:lo + chunk].to(weight.dtype), weight).float()  # (c, K)
        lab = local[lo:lo + chunk]
        top1 = lab[:, 0]
        inside = top1 >= 0
        agree += (logits.argmax(-1) == top1).sum()
        if labels == "top1":
            if inside.any():
                total = total + F.cross_entropy(logits[inside], top1[inside], reduction="sum")
        elif labels == "soft":
            valid = lab >= 0
            p = torch.where(valid, logp[lo:lo + chunk], -float("inf")).softmax(-1).nan_to_num(0.0)  # (c, k)
            logq = F.log_softmax(logits, dim=-1).gather(1, lab.clamp(min=0))
            total = total - (p * torch.where(valid, logq, 0.0)).sum()
        else:
            raise ValueError(f"labels must be 'top1' or 'soft', got {labels!r}")
    return total, torch.tensor(y.shape[0], device=y.device), agree


__all__ = ["dump_topk", "read_index", "TopKDump", "topk_loss", "target_topk", "examples_fingerprint", "FORMAT"]
