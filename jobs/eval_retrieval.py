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

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import exit_status
from pipeline.evaluation.config import load_eval_config
from pipeline.evaluation.run import describe_plan, evaluate_retrieval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="eval YAML (configs/eval/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, checkpoint, annotation and video files; print the plan; stop")
    args = parser.parse_args(argv)
    return exit_status(lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> None:
    cfg = load_eval_config(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(describe_plan(cfg)))
        return
    result = evaluate_retrieval(cfg)
    if result:  # only rank 0 of a torchrun group gets the numbers
        print(json.dumps(result, indent=2))
        print(Path(result["report"]).with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())
