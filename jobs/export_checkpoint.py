"""Export a run's checkpoint as a stage export (`{"state_dict", "meta"}`) that `models.load_pretrained` reads.

    python jobs/export_checkpoint.py outputs/toy/checkpoints/toy model.pt          # run folder: latest complete
    python jobs/export_checkpoint.py s3://bucket/ckpt/run/checkpoint_00000200 s3://bucket/exports/run.pt
    python jobs/export_checkpoint.py OLD_CHECKPOINT out.pt --config configs/stages/x.yaml key=value   # no config.yaml

ZeRO 1-3 checkpoints give their fp32 master weights (DeepSpeed's zero_to_fp32); frozen student weights (stage 1's
last block under residual_before_last_block) come from the checkpoint's frozen_student.pt. S3 credentials come from the
usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.consolidate import config_from_args, export_checkpoint
from pipeline.redaction import redact_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_or_path", help="run folder <checkpoint.path>/<run name>, or one checkpoint_<step>")
    parser.add_argument("out", help="output file (local path or s3://...)")
    parser.add_argument("--config", help="the run's config, for checkpoints without their own config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of --config")
    args = parser.parse_args(argv)
    source, meta = export_checkpoint(args.run_or_path, args.out, config_from_args(args.config, args.overrides))
    print(f"exported {redact_text(source)} (step {meta['step']}, {meta.get('model_name')}) -> {redact_text(args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
