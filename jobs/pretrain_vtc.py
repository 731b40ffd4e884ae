"""Stage 3: video-text pretraining (docs/stages.md, "Stage 3"): the released model with the BERT tower (task
`video_text_bert`: VTC + VTM + MLM + UTA) or the open_clip-text variant (task `video_text`), as the config says.

    python jobs/pretrain_vtc.py --config configs/stages/pretrain_vtc_bert_test.yaml
    python jobs/pretrain_vtc.py --config configs/stages/pretrain_vtc_bert_m_5m.yaml --dry-run
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain_vtc.py \
        --config configs/stages/pretrain_vtc_bert_m_5m.yaml \
        model.pretrained=/ckpt/videomamba_m16_k400_mask_pt_f8_res224.pth

The export (`<output_dir>/export/model.pt`) is what jobs/eval_retrieval.py evaluates.
"""

from __future__ import annotations

import sys

from pipeline.cli import exit_status
from pipeline.jobs_common import run_training_job

if __name__ == "__main__":
    sys.exit(exit_status(lambda: run_training_job(__doc__, sys.argv[1:])))
