"""Multi-view classification test of a fine-tuned VideoMamba: top-1/top-5, per-class accuracy, confusion summary.

    python jobs/eval_cls.py --config configs/eval/k400_cls.yaml \
        model.checkpoint=outputs/finetune_k400_s_f8/export/model.pt data.annotation=/data/k400/val.csv
    python jobs/eval_cls.py --config configs/eval/k400_cls.yaml model.name=videomamba_small \
        model.checkpoint=videomamba_s16_k400_f8_res224.pth data.shards=s3://bucket/k400/val      # a released file
    python jobs/eval_cls.py --config configs/eval/ssv2_cls.yaml ... --dry-run                  # check, plan, stop
    torchrun --nproc_per_node 8 jobs/eval_cls.py --config ...                                 # 8 ranks, no Ray

Views: views.num_clips temporal clips x views.num_crops spatial crops (K400 4x3, SSv2 2x3), softmax-averaged.
Writes <output_dir>/classification_<name>.{json,md} and logs an MLflow run (docs/finetune.md).
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.evaluation.cls_config import load_cls_eval_config
from pipeline.evaluation.cls_run import describe_plan, evaluate_classification
from pipeline.jobs_common import run_evaluation_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_evaluation_job(__doc__, sys.argv[1:], load_cls_eval_config, describe_plan,
                                                    evaluate_classification)))
