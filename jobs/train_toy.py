"""Train the toy regression task (engine, launch and tracking smoke test; CPU, seconds).

    python jobs/train_toy.py --config configs/stages/toy.yaml
    python jobs/train_toy.py --config configs/stages/toy.yaml scaling.num_workers=2 --dry-run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_toy.py --config configs/stages/toy.yaml output_dir=/abs/out checkpoint.path=/abs/ckpt
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.jobs_common import run_training_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_training_job(__doc__, sys.argv[1:])))
