"""Stage 1: masked video pretraining of VideoMamba against a frozen CLIP teacher (docs/stages.md, "Stage 1").

    python jobs/pretrain_mask.py --config configs/stages/pretrain_mask_test.yaml            # CPU, tiny, seconds
    python jobs/pretrain_mask.py --config configs/stages/pretrain_mask_m.yaml --dry-run     # validate + plan
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/pretrain_mask.py --config configs/stages/pretrain_mask_m.yaml scaling.num_workers=32

Overrides are dotted `key=value` pairs (e.g. `data.mask.type=tube task.student_feature=residual_before_last_block`).
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.jobs_common import run_training_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_training_job(__doc__, sys.argv[1:])))
