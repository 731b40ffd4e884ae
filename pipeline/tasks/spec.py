"""The task spec: the one record of what a stage task is, which config, recipe and engine read.

Every stage module ends with one declaration:

    register_task(TaskSpec(name="masked_alignment", config=MaskedAlignmentConfig, build=build,
                           init_key="model.pretrained", cuda_graph=True))

and `pipeline/tasks/catalog.py` imports the module (the one list of task modules). Nothing else names tasks:
`pipeline.config` types the `task:` section with `spec.config` and checks `model.cuda_graph` against
`spec.cuda_graph`; the recipe writes a step's `from:` into `spec.init_key`; the engine builds the task with
`build_task(cfg)` and uses the optional hooks the spec declares.

This module imports no torch and no stage module at import time (config parsing imports it); the catalog is
imported on the first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Config, TaskConfig
    from pipeline.tasks.base import Task

_SPECS: dict[str, TaskSpec] = {}
_CATALOG = "pipeline.tasks.catalog"


@dataclass(frozen=True)
class TaskSpec:
    """What a stage task is: its name, config section, builder, recipe weights key and capabilities."""

    name: str
    """`task.name` in configs."""
    config: type[TaskConfig]
    """The `task:` section's dataclass: a `pipeline.config.TaskConfig` subclass with a docstring per field."""
    build: Callable[[Config], Task]
    """Builds the task from the whole run config (on the meta device for a dry run: read no weight files then,
    see `pipeline.tasks.backbone.shapes_only`)."""
    init_key: str | None
    """The config key a recipe step's `from: <earlier stage>` writes that stage's export path into (the
    student's `model.pretrained`, or a teacher's checkpoint); None: the step must name `init_key:` itself."""
    cuda_graph: bool = False
    """The task replays its trainable VideoMamba from CUDA graphs (pipeline/cuda_graph.py): `model.cuda_graph:
    true` is allowed, and `auto` turns them on for it on a GPU when `cuda_graph_auto` is set too."""
    cuda_graph_auto: bool = True
    """With `cuda_graph`: `auto` uses the graphs. False while the task's graphed step has not yet been compared with
    its eager step on a GPU (tests/gpu/test_cuda_graph.py): it then trains eagerly unless `model.cuda_graph: true`."""
    evaluates: bool = False
    """The task implements `Task.evaluate` (periodic `eval/<name>` metrics)."""
    own_loader: bool = False
    """The task implements `Task.build_loader`: it makes its own batches (no `data.*_shards` needed)."""

    def check_hooks(self, task: Task) -> None:
        """Raise unless `task` implements exactly the optional hooks this spec declares."""
        from pipeline.tasks.base import Task

        for hook, declared in (("evaluate", self.evaluates), ("build_loader", self.own_loader)):
            implemented = getattr(type(task), hook) is not getattr(Task, hook)
            if implemented != declared:
                flag = {"evaluate": "evaluates", "build_loader": "own_loader"}[hook]
                raise TypeError(f"task {self.name!r}: {type(task).__name__} {'implements' if implemented else 'lacks'} "
                                f"{hook}() but its TaskSpec has {flag}={declared}; make the two agree")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a stage task (called once, at the end of the task's module); returns the spec."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task takes a TaskSpec(name=..., config=..., build=..., init_key=...), got {spec!r}")
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"task {spec.name!r} is registered twice ({known.build.__module__} and "
                         f"{spec.build.__module__}); task names must be unique")
    _SPECS[spec.name] = spec
    return spec


def _registry() -> dict[str, TaskSpec]:
    importlib.import_module(_CATALOG)  # the stage modules register themselves on import
    return _SPECS


def task_names() -> list[str]:
    """Every registered task name, sorted."""
    return sorted(_registry())


def task_spec(name: str) -> TaskSpec:
    """The spec of task `name`; ValueError naming the registered ones when there is none."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(registry)}")
    return registry[name]


def build_task(cfg: Any) -> Task:
    """Build the task `cfg.task.name` names, checked against its spec's declared hooks."""
    try:
        spec = task_spec(cfg.task.name)
    except ValueError as err:
        raise ValueError(f"task.name: {err}") from None
    task = spec.build(cfg)
    spec.check_hooks(task)
    return task
