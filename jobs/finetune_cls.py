"""Fine-tuning: a VideoMamba classifier on labelled shards with the released recipe (docs/finetune.md).

    python jobs/finetune_cls.py --config configs/stages/finetune_test.yaml                    # CPU, tiny, a minute
    python jobs/finetune_cls.py --config configs/stages/finetune_k400_s_f8.yaml --dry-run     # validate + plan
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/finetune_cls.py --config configs/stages/finetune_k400_s_f8.yaml \
        model.pretrained=outputs/pretrain_mask_s/export/model.pt scaling.num_workers=16

`model.pretrained` is a stage export, a released VideoMamba checkpoint or an IN-1K image checkpoint (inflated).
Rerunning the same command resumes from the latest checkpoint; overrides are dotted `key=value` pairs.
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.jobs_common import run_training_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_training_job(__doc__, sys.argv[1:])))
