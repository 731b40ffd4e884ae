"""Stage tasks: one module per stage, each declaring its `TaskSpec` (pipeline/tasks/spec.py).

A task is a `pipeline.tasks.base.Task` (an `nn.Module` owning the trainable model(s) and any frozen teacher):
`forward(batch)` returns `{"loss": total, <part>: value, ...}` and `trainable_module()` is what the stage exports.
To add one: a `TaskConfig` subclass, a `Task` subclass, a `build(cfg)` and one `register_task(TaskSpec(...))` in
the task's module, plus its import in `pipeline/tasks/catalog.py` (docs/architecture.md, "Tasks").
Shared pieces: backbone.py (the student), clip_teacher.py, clip_alignment.py, token_masks.py, attention_mask.py.
"""

from pipeline.tasks.spec import TaskSpec, build_task, register_task, task_names, task_spec

__all__ = ["TaskSpec", "build_task", "register_task", "task_names", "task_spec"]
