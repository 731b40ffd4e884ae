"""Stage tasks. Each stage module registers its config (`register_task_config`) and builder (`register_task`).

A task is an `nn.Module` owning the trainable model(s) and any frozen teacher; `forward(batch)` returns
`{"loss": total, <part>: value, ...}` and `trainable_module()` is what the stage exports for the next stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

_TASK_BUILDERS: dict[str, Callable[[Any], Task]] = {}


class Task(nn.Module):
    """Base class of stage tasks (see the module docstring for the contract)."""

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


def register_task(name: str):
    """Decorator for `build(cfg: Config) -> Task` functions."""

    def wrap(builder: Callable[[Any], Task]) -> Callable[[Any], Task]:
        _TASK_BUILDERS[name] = builder
        return builder

    return wrap


def build_task(cfg) -> Task:
    """Build the task that `cfg.task.name` names."""
    if cfg.task.name not in _TASK_BUILDERS:
        raise ValueError(f"task.name: unknown task {cfg.task.name!r}; allowed: {sorted(_TASK_BUILDERS)}")
    return _TASK_BUILDERS[cfg.task.name](cfg)


# Every stage module registers its config and builder on import. These imports come last because the stage
# modules import `Task` and `register_task` from this (by then initialised) package.
from pipeline.tasks import classification, masked_alignment, self_distill, toy, video_text  # noqa: E402, F401
