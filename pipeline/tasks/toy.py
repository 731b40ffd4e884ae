"""A tiny regression task ("toy") for engine, launch and tracking tests.

A two-layer MLP learns a fixed random linear map from synthetic Gaussian inputs. Batches come from the task's own
`build_loader`, a deterministic stream whose position is its only state, so a resumed run continues with exactly
the batches it would have seen. Fault injection for tests: a NaN loss at chosen batch positions, and a hard
process exit (`os._exit`) on one rank the first time a batch position is reached (a marker file remembers it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import TaskConfig
from pipeline.distributed import get_rank
from pipeline.tasks.base import Task
from pipeline.tasks.spec import TaskSpec, register_task

# Eval stream offset: keeps eval inputs disjoint from every rank's training stream.
_EVAL_STREAM = 1_000_003


@dataclass
class ToyTaskConfig(TaskConfig):
    in_dim: int = 16
    """Input features per sample."""
    hidden_dim: int = 32
    """Width of the MLP's hidden layer."""
    out_dim: int = 4
    """Regression targets per sample."""
    noise_std: float = 0.01
    """Gaussian noise added to the targets (the loss floor is noise_std**2)."""
    eval_batches: int = 4
    """Batches in the (fixed) eval split."""
    nan_at_batches: list[int] = field(default_factory=list)
    """Training batch positions (0-based, per rank) whose loss is NaN: exercises the non-finite policy."""
    nan_grad_at_batches: list[int] = field(default_factory=list)
    """Training batch positions whose loss is finite but whose gradient is NaN (the gradient-norm check)."""
    exit_at_batch: int | None = None
    """Kill the process (os._exit) when rank `exit_rank` reaches this batch position, once per `exit_marker`."""
    exit_rank: int = 1
    """Rank that `exit_at_batch` kills."""
    exit_marker: str | None = None
    """File created just before the injected exit; while it exists the exit is not repeated."""


class SyntheticRegressionBatches:
    """Endless (train) or fixed-length (eval) stream of `{"x", "y", "position"}` batches.

    Batch `p` of rank `r` is a pure function of (seed, r, p), so `state_dict()` is just the position.
    """

    def __init__(self, cfg: ToyTaskConfig, batch_size: int, seed: int, stream: int, length: int | None) -> None:
        self.cfg, self.batch_size, self.seed, self.stream, self.length = cfg, batch_size, seed, stream, length
        self.position = 0
        weight_gen = torch.Generator().manual_seed(seed)  # the target map is shared by all ranks and splits
        self.true_weight = torch.randn(cfg.in_dim, cfg.out_dim, generator=weight_gen) / cfg.in_dim**0.5

    def batch_at(self, position: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_000_007 + self.stream * 1_000_003 + position) % 2**62)
        x = torch.randn(self.batch_size, self.cfg.in_dim, generator=gen)
        noise = self.cfg.noise_std * torch.randn(self.batch_size, self.cfg.out_dim, generator=gen)
        # The position stays a Python int: the engine moves tensors to the device, and reading one back each step
        # would be a host sync that no real task has.
        return {"x": x, "y": x @ self.true_weight + noise, "position": position}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.length is None or self.position < self.length:
            batch = self.batch_at(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class ToyTask(Task):
    def __init__(self, cfg: ToyTaskConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = nn.Sequential(
            nn.Linear(cfg.in_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.out_dim)
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        position = int(batch["position"])
        self._maybe_exit(position)
        pred = self.model(batch["x"])
        mse = (pred.float() - batch["y"].float()).pow(2).mean()
        if self.training and position in self.cfg.nan_at_batches:
            mse = mse * float("nan")
        if self.training and position in self.cfg.nan_grad_at_batches:
            # forward adds exactly 0; backward sends 0 * d/dx sqrt(negative) = NaN into the first layer's bias
            negative = self.model[0].bias[:1] - 1e3
            mse = mse + torch.where(torch.zeros(1, dtype=torch.bool), negative.sqrt(), 0.0).sum()
        mae = (pred.detach().float() - batch["y"].float()).abs().mean()
        return {"loss": mse, "mse": mse.detach(), "mae": mae}

    def _maybe_exit(self, position: int) -> None:
        cfg = self.cfg
        if cfg.exit_at_batch != position or get_rank() != cfg.exit_rank or not self.training:
            return
        if cfg.exit_marker is None or Path(cfg.exit_marker).exists():
            return
        Path(cfg.exit_marker).touch()
        os._exit(17)  # simulate a node loss: no exception handling, no cleanup

    def trainable_module(self) -> nn.Module:
        return self.model

    def export_metadata(self) -> dict[str, Any]:
        kwargs = {"in_dim": self.cfg.in_dim, "hidden_dim": self.cfg.hidden_dim, "out_dim": self.cfg.out_dim}
        return {"model_name": "toy_mlp", "model_kwargs": kwargs}

    def build_loader(self, run_cfg, split: str, rank: int, world_size: int) -> SyntheticRegressionBatches:
        """Own synthetic stream per rank; eval is a fixed set of `eval_batches` batches."""
        if split == "train":
            return SyntheticRegressionBatches(self.cfg, run_cfg.data.batch_size, run_cfg.seed, rank, None)
        return SyntheticRegressionBatches(
            self.cfg, run_cfg.data.batch_size, run_cfg.seed, _EVAL_STREAM + rank, self.cfg.eval_batches
        )

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Mean squared error over the eval batches (this rank's share)."""
        total, count = 0.0, 0
        for batch in batches:
            pred = self.model(batch["x"])
            total += float((pred.float() - batch["y"].float()).pow(2).sum())
            count += batch["y"].numel()
        return {"mse": total / max(count, 1)}

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample: 2 per multiply-add forward, twice that backward."""
        cfg = self.cfg
        macs = cfg.in_dim * cfg.hidden_dim + cfg.hidden_dim * cfg.out_dim
        return 6.0 * macs


def build_toy(cfg) -> ToyTask:
    return ToyTask(cfg.task)


register_task(TaskSpec(name="toy", config=ToyTaskConfig, build=build_toy, init_key="model.pretrained", evaluates=True,
                       own_loader=True))
