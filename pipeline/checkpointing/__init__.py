"""The checkpoint format and where checkpoints live: one owner (docs/operations.md, "Storage and checkpoints").

- layout.py: the file names of a checkpoint folder and the one definition of a complete checkpoint;
- storage.py: a run's storage folder (local or s3://), its newest complete checkpoint, the run's result record;
- stores.py: where a worker's checkpoint directory lives: Ray Train's storage or a local folder;
- state.py: what a worker saves into a checkpoint and restores from it;
- safe_load.py: every checkpoint file read weights-only, with an allow-list of what the files hold;
- run_lock.py: one launch per run, a lock object in the run's storage folder;
- export.py: the stage export, from a live run or offline from a checkpoint.
"""

from pipeline.checkpointing.storage import (
    latest_checkpoint,
    pop_run_record,
    run_storage,
    storage_filesystem,
    write_run_record,
)
from pipeline.checkpointing.stores import (
    CheckpointStore,
    LocalCheckpointStore,
    RayCheckpointStore,
    private_checkpoint_dir,
)

__all__ = [
    "CheckpointStore",
    "LocalCheckpointStore",
    "RayCheckpointStore",
    "latest_checkpoint",
    "pop_run_record",
    "private_checkpoint_dir",
    "run_storage",
    "storage_filesystem",
    "write_run_record",
]
