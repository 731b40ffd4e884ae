"""Zero-shot text-video retrieval of a video-text export on MSR-VTT, DiDeMo, ActivityNet or the synthetic set.

    python jobs/eval_retrieval.py --config configs/eval/msrvtt.yaml model.checkpoint=out/vtc/export/model.pt \
        data.root=/data/msrvtt/videos data.annotation=/data/msrvtt/msrvtt_ret_test1k.json
    python jobs/eval_retrieval.py --config configs/eval/didemo.yaml model.checkpoint=... --dry-run
    torchrun --nproc_per_node 8 jobs/eval_retrieval.py --config ...           # 8 ranks, no Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/eval_retrieval.py --config ... \
        scaling.use_ray=true scaling.num_workers=8

Prints t2v / v2t R@1/5/10, MdR, MnR; writes <output_dir>/retrieval_<name>.{json,md}; logs an MLflow run.
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.evaluation.config import load_eval_config
from pipeline.evaluation.run import describe_plan, evaluate_retrieval
from pipeline.jobs_common import run_evaluation_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_evaluation_job(__doc__, sys.argv[1:], load_eval_config, describe_plan,
                                                    evaluate_retrieval)))
