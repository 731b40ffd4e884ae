"""Stage 2: self-distillation: a trained smaller VideoMamba teaches a larger one (docs/stages.md, "Stage 2").

    python jobs/self_distill.py --config configs/stages/self_distill_test.yaml \
        task.teacher_checkpoint=outputs/pretrain_mask_test/export/model.pt
    python jobs/self_distill.py --config configs/stages/self_distill_s_to_m.yaml --dry-run
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/self_distill.py --config configs/stages/self_distill_s_to_m.yaml
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.jobs_common import run_training_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_training_job(__doc__, sys.argv[1:])))
