"""Adapter training: data, targets from the frozen model (on the fly or dumped), loss, trainer, export.

CLI: ``kangaroo-rt train-adapter`` (single process, or under ``torchrun`` for DDP).
"""
from .loss import distill_loss
from .states import Dumped, OnTheFly, dump_states, target_states
from .trainer import TrainConfig, Trainer, export_adapter, finish_distributed, init_distributed, lr_factor

__all__ = ["Dumped", "OnTheFly", "TrainConfig", "Trainer", "distill_loss", "dump_states", "export_adapter",
           "finish_distributed", "init_distributed", "lr_factor", "target_states"]
