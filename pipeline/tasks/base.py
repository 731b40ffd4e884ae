"""The `Task` base class: the contract between a stage task and the engine.

A task is an `nn.Module` owning the trainable model(s) and any frozen teacher; `forward(batch)` returns
`{"loss": total, <part>: value, ...}` and `trainable_module()` is what the stage exports for the next stage.
The optional hooks (`evaluate`, `build_loader`) are declared in the task's `TaskSpec` (pipeline/tasks/spec.py);
the others have defaults here (`after_optimizer_step`, `export_state_dict`: the classification task's weight EMA).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Task(nn.Module):
    """Base class of stage tasks (see the module docstring for the contract)."""

    export_weights_key = "state_dict"
    """The key of the weights in the stage export (`{key: weights, "meta": ...}`); the BERT video-text task uses
    "model", the key of the released multimodal files, so that the released code loads its exports too."""

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_module(self) -> nn.Module:
        """The module whose weights the stage exports (the student / the dual encoder)."""
        raise NotImplementedError

    def export_metadata(self) -> dict[str, Any]:
        """Extra facts saved beside the exported weights (e.g. the model name and its build kwargs)."""
        return {}

    def rng_state_dict(self) -> dict[str, Any]:
        """This rank's random state the task owns (e.g. its mask generator), saved with every checkpoint."""
        return {}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `rng_state_dict()` returned, when resuming."""

    def after_optimizer_step(self) -> None:
        """Called by the engine after every optimizer step (e.g. to fold the new weights into a moving average)."""

    def export_state_dict(self, state: dict[str, Tensor],
                          task_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weights a stage export holds, given `trainable_module()`'s (CPU, fp32): these, or others of the same
        layout (e.g. their EMA). `task_state` is the whole task's state by name when an export is made offline from
        a checkpoint (the task then built on the meta device); None: this live task's own tensors."""
        return state

    def flops_per_sample(self) -> float | None:
        """Training FLOPs per sample (forward + backward; pipeline/flops.py), for TFLOP/s and MFU; None: unknown."""
        return None

    def build_loader(self, cfg: Any, split: str, rank: int, world_size: int) -> Any:
        """The batches of `split` ("train": endless, "eval": one pass) for this rank. A task that makes its own
        data overrides this and sets `own_loader=True` in its spec; loaders with `state_dict()` /
        `load_state_dict()` resume their position."""
        from pipeline.data import build_loader

        return build_loader(cfg.data, split, rank, world_size, seed=cfg.seed)

    def evaluate(self, batches: Any) -> dict[str, float]:
        """Metrics over this rank's eval batches (averaged over ranks, logged as `eval/<name>`). A task that has
        them overrides this and sets `evaluates=True` in its spec."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate (its TaskSpec has evaluates=False)")
