"""Adapter trainer: AdamW, warmup + decay, clipping, accumulation, exact resume, single process or torchrun.

One code path for one process and for ``torchrun`` (gloo on CPU, nccl on GPU): the data order is a
deterministic function of the seed and the step; each rank takes its slice of every global batch;
every rank computes the loss *sum* and the global number of trained positions (known from the
masks without running the model), and gradients are summed across ranks. So N processes give
the same update as one process with the same global batch, up to floating-point summation order.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..adapter import Adapter
from ..model import Transformer
from .loss import LABELS, distill_loss


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 4  # examples per process per forward
    grad_accum: int = 1
    lr: float = 5e-5
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    clip: str = "value"  # value (the paper: 0.5) | norm | none
    clip_value: float = 0.5
    labels: str = "soft"  # soft (the paper: the target's distribution) | top1 (its argmax; see distill_loss)
    amp: Optional[str] = None  # bf16 | fp16 autocast on CUDA
    seed: int = 0
    out_dir: Optional[str] = None
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 10
    eval_every: int = 0  # steps between acceptance evaluations (0: off)
    eval_max_new_tokens: int = 32
    dev_every: int = 0  # steps between dev top-1 agreements on the trainer's dev_source (0: off)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.clip not in ("value", "norm", "none"):
            raise ValueError(f"clip must be value, norm or none, got {self.clip!r}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warmup, then decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def local_device(device: Union[str, torch.device]) -> torch.device:
    """This process's device by torchrun's conventions: under torchrun (``LOCAL_RANK`` set) a CUDA device
    without an index is ``cuda:LOCAL_RANK``, so every rank of a node gets its own GPU. Call it before
    loading the model; :func:`init_distributed` makes the device current."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device) -> Tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun (nccl on CUDA, with
    ``device``, from :func:`local_device`, made current first as NCCL requires; gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish_distributed() -> None:
    """End a torchrun job's process group, once every collective is done: collect the garbage first, so that no
    tensor a collective touched is freed while the interpreter shuts down. With gloo on torch 2.13 a process that
    skipped this, or that destroyed the group with such tensors still in reference cycles, aborted at exit in
    3-4 of 10 runs here ("terminate called without an active exception", after all its work was done)."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


class Trainer:
    """Trains ``adapter`` against the frozen ``target`` on a batch ``source`` (OnTheFly or Dumped)."""

    def __init__(self, target: Transformer, adapter: Adapter, exit_layer: int, source: Any, cfg: TrainConfig,
                 eval_prompts: Optional[List[List[int]]] = None, dev_source: Any = None,
                 draft_ids: Optional[torch.Tensor] = None) -> None:
        """source: OnTheFly, Dumped (exit and final states) or a :class:`~kangaroo_rt.train.topk.TopKDump`
        (exit states and the target's top-k); dev_source: the same kind, for the dev top-1 curve;
        draft_ids: train and measure against the K-row head of this draft vocabulary (top-k sources only)."""
        self.target, self.adapter, self.exit_layer, self.source, self.cfg = target, adapter, exit_layer, source, cfg
        self.eval_prompts = eval_prompts or []
        self.dev_source, self.draft_ids = dev_source, draft_ids
        for p in target.parameters():
            p.requires_grad_(False)
        adapter.train()
        self.device = adapter.device
        self.rank, self.world = init_distributed(self.device)
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.token_updates = 0  # trained positions summed over every step so far (checkpointed)
        self.weights = [source.weight(i) for i in range(len(source))]
        if sum(self.weights) == 0:
            raise ValueError("the training data has no trained positions (every loss mask is empty)")
        self.global_batch = cfg.micro_batch * cfg.grad_accum * self.world

    # -- data order ---------------------------------------------------------------------------------
    def _global_indices(self, step: int) -> List[int]:
        """Example indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
        n = len(self.source)
        start = step * self.global_batch
        out: List[int] = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).tolist()
            out.extend(perm[offset: offset + self.global_batch - len(out)])
        return out

    def _micro_batches(self, step: int) -> Tuple[List[List[int]], int]:
        """This rank's micro-batches of ``step`` and the trained-position count of the whole global batch."""
        idx = self._global_indices(step)
        mb = self.cfg.micro_batch
        chunks = [idx[(a * self.world + self.rank) * mb:(a * self.world + self.rank + 1) * mb]
                  for a in range(self.cfg.grad_accum)]
        return chunks, sum(self.weights[i] for i in idx)

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        chunks, n_global = self._micro_batches(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, n_local, agree = 0.0, 0, 0
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
                    if cfg.amp and self.device.type == "cuda" else contextlib.nullcontext())
        for chunk in chunks:
            with autocast:
                total, n, a = self.batch_loss(self.source, chunk)
            (total / max(1, n_global)).backward()
            loss_sum += float(total.detach())
            n_local += int(n)
            agree += int(a)
        params = [p for p in self.adapter.parameters() if p.grad is not None]
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            stats = self._stats_tensor([loss_sum, n_local, agree])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            loss_sum, n_local, agree = float(stats[0]), int(stats[1]), int(stats[2])
        if cfg.clip == "value":
            torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
        elif cfg.clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_value)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.token_updates += n_local
        return {"step": self.step, "token_updates": self.token_updates, "loss": loss_sum / max(1, n_local), "top1": agree / max(1, n_local),
                "tokens": n_local, "lr": lr}

    def batch_loss(self, source: Any, indices: List[int]):
        """(loss sum, trained positions, top-1 agreements) of the adapter on ``source``'s examples ``indices``."""
        batch = source.batch(indices)
        if "topk_ids" not in batch:
            return distill_loss(self.target, self.adapter, batch["exit"], batch["final"], batch["mask"],
                                labels=self.cfg.labels)
        from .topk import topk_loss

        exit_hidden = batch["exit"].to(self.device, self.adapter.dtype)
        b, t, _ = exit_hidden.shape
        cos, sin = self.target.rope(torch.arange(t, device=self.device).expand(b, t))
        y = self.adapter.forward_train(exit_hidden, cos.to(self.adapter.dtype), sin.to(self.adapter.dtype))
        return topk_loss(self.target.lm_head.weight, y, batch["mask"].to(self.device),
                         batch["topk_ids"].to(self.device), batch["topk_logp"].to(self.device),
                         draft_ids=self.draft_ids, labels=self.cfg.labels)

    @torch.no_grad()
    def dev_top1(self, batch_size: int = 8) -> float:
        """Top-1 agreement of the adapter's draft with the target's argmax over every trained dev position."""
        was_training = self.adapter.training
        self.adapter.eval()
        n = agree = 0
        for lo in range(0, len(self.dev_source), batch_size):
            _, k, a = self.batch_loss(self.dev_source, list(range(lo, min(len(self.dev_source), lo + batch_size))))
            n, agree = n + int(k), agree + int(a)
        self.adapter.train(was_training)
        return agree / max(1, n)

    def _stats_tensor(self, values: List[float]) -> torch.Tensor:
        """(3,) float64 on the trainer's device: NCCL reduces CUDA tensors only (gloo takes either)."""
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """Acceptance of the current adapter with the real Kangaroo decoder on the held-out prompts."""
        from ..config import KangarooConfig
        from ..generate import KangarooModel

        self.adapter.eval()
        adapter = self.adapter
        if adapter.dtype != self.target.dtype:  # fp32 master weights against a half target: decode with a copy
            adapter = copy.deepcopy(adapter).to(dtype=self.target.dtype)
        model = KangarooModel(self.target, adapter, exit_layer=self.exit_layer,
                              kangaroo=KangarooConfig(gamma=6, eta=0.0))
        rounds = tokens = 0
        attempts: List[int] = [0] * 6
        accepts: List[int] = [0] * 6
        for prompt in self.eval_prompts:
            out = model.generate(torch.tensor([prompt], device=self.device),
                                 max_new_tokens=self.cfg.eval_max_new_tokens, ignore_eos=True,
                                 return_dict_in_generate=True)
            s = out.stats
            rounds += s.rounds[0]
            tokens += sum(s.accepted_lengths[0])
            attempts = [a + b for a, b in zip(attempts, s.position_attempts[0])]
            accepts = [a + b for a, b in zip(accepts, s.position_accepts[0])]
        self.adapter.train()
        return {"step": self.step, "eval_mat": tokens / rounds if rounds else 0.0,
                "eval_acceptance_by_position": [a / t if t else None for a, t in zip(accepts, attempts)]}

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        if self.rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": self.step, "config": asdict(self.cfg),
                    "token_updates": self.token_updates,
                    "exit_layer": self.exit_layer}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["exit_layer"] != self.exit_layer:
            raise ValueError(f"checkpoint {path} trained exit layer {state['exit_layer']}, not {self.exit_layer}")
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.token_updates = int(state.get("token_updates", 0))

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, resume: bool = True, stop_at: Optional[int] = None) -> List[Dict[str, Any]]:
        """Run until ``cfg.steps`` (or ``stop_at``, e.g. to time-box a run and resume it later); resumes
        from ``out_dir/checkpoint.pt`` when present. Returns the log records of this run."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        ckpt = os.path.join(cfg.out_dir, "checkpoint.pt") if cfg.out_dir else None
        if resume and ckpt and os.path.isfile(ckpt):
            self.load_checkpoint(ckpt)
        metrics_file = None
        if cfg.out_dir and self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a")
        log: List[Dict[str, Any]] = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training adapter", unit="step",
                   disable=not cfg.progress or self.rank != 0)
        t0 = time.perf_counter()
        updates = 0
        try:
            last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
            while self.step < last:
                m = self.train_step()
                m["time_s"] = time.perf_counter() - t0
                updates += m["tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.3f}",
                                tok_upd_s=f"{updates / max(1e-9, m['time_s']):.0f}")
                records = [m] if (self.step % cfg.log_every == 0 or self.step == cfg.steps) else []
                if cfg.dev_every and self.dev_source is not None and self.rank == 0 \
                        and (self.step % cfg.dev_every == 0 or self.step == last):
                    records.append({"step": self.step, "token_updates": self.token_updates,
                                    "dev_top1": self.dev_top1()})
                if cfg.eval_every and self.eval_prompts and (self.step % cfg.eval_every == 0 or self.step == cfg.steps) \
                        and self.rank == 0:
                    records.append(self.evaluate())
                for r in records:
                    log.append(r)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(r) + "\n")
                        metrics_file.flush()
                if ckpt and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint(ckpt)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        if ckpt:
            self.save_checkpoint(ckpt)
        return log


def export_adapter(adapter: Adapter, folder: str, exit_layer: int, extra: Optional[Dict[str, Any]] = None) -> str:
    """Write the official format (config.json + pytorch_model.bin), model.safetensors beside it, and
    kangaroo.json with the exit layer (and any tuned settings in ``extra``)."""
    adapter.save_pretrained(folder)
    adapter.save_pretrained(folder, safetensors=True)
    with open(os.path.join(folder, "kangaroo.json"), "w") as f:
        json.dump({"exit_layer": exit_layer, **(extra or {})}, f, indent=2)
    return folder


__all__ = ["TrainConfig", "Trainer", "lr_factor", "local_device", "init_distributed", "export_adapter"]
