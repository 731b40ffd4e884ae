"""Export a run's checkpoint as a stage export (`{"state_dict", "meta"}`) that `models.load_pretrained` reads.

    python jobs/export_checkpoint.py outputs/toy/checkpoints/toy model.pt          # run folder: latest complete
    python jobs/export_checkpoint.py s3://bucket/ckpt/run/checkpoint_00000200 s3://bucket/exports/run.pt

ZeRO 1-3 checkpoints give their fp32 master weights (DeepSpeed's zero_to_fp32); the task is rebuilt from the
checkpoint's config.yaml, frozen student weights (stage 1's last block under residual_before_last_block) come from
its frozen_student.pt. S3 credentials come from the
usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.checkpointing.export import export_checkpoint
from pipeline.redaction import redact_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_or_path", help="run folder <checkpoint.path>/<run name>, or one checkpoint_<step>")
    parser.add_argument("out", help="output file (local path or s3://...)")
    args = parser.parse_args(argv)
    source, meta = export_checkpoint(args.run_or_path, args.out)
    print(f"exported {redact_text(source)} (step {meta['step']}, {meta.get('model_name')}) -> {redact_text(args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
