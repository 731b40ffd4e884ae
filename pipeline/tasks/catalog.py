"""The stage task modules. Importing one registers its task (`register_task(TaskSpec(...))` at its end); a new
task's module is added here, and nowhere else (`pipeline.tasks.spec` imports this on its first lookup)."""

from pipeline.tasks import (  # noqa: F401
    classification,
    masked_alignment,
    self_distill,
    toy,
    video_text,
    video_text_bert,
)
