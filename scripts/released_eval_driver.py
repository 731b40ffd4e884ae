"""The released side of scripts/check_released_eval.py: runs OpenGVLab/VideoMamba's own zero-shot evaluation.

Run by check_released_eval.py with the released code's interpreter, in `<checkout>/videomamba/video_mm` (on
PYTHONPATH), so it imports only the released code and its dependencies, never this project. It builds
`UMT_VIDEOMAMBA` from `exp_zs/msrvtt/config.py` (overridden to the checkpoint's size, k_test and fp32), loads the
released-layout checkpoint the way `tasks/shared_utils.py::setup_model` does for zero-shot evaluation, reads the
annotation with the released `VidTxtRetEvalDataset` (captions cleaned by its `pre_text`), and runs
`tasks/retrieval_utils.py::evaluation` and `itm_eval` on the frames our pipeline decoded (`--frames`).
With `--decode`, it also decodes the videos with the released reader and transform and reports how far
those frames are from ours (PyAV and decord convert colours slightly differently).

Writes `<out>/released_scores.npz` (i2t_x, t2i_x, i2t_emb, t2i_emb) and `<out>/released.json` (texts, metrics,
load report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _patch_bert_builder() -> None:
    """build_bert calls BertModel.from_pretrained(<bert-base-uncased>); every weight comes from the checkpoint
    here, so the tower is built from its config instead of reading bert-base-uncased's weights."""
    import models.backbones.bert.builder as builder
    from models.backbones.bert.xbert import BertModel

    class FromConfig(BertModel):
        @classmethod
        def from_pretrained(cls, _name, config, add_pooling_layer=True, output_loading_info=False, **_kwargs):
            model = BertModel(config, add_pooling_layer=add_pooling_layer)
            return (model, {}) if output_loading_info else model

    builder.BertModel = FromConfig


def _config(args: argparse.Namespace):
    from utils.config import Config, eval_dict_leaf

    cfg = eval_dict_leaf(Config.from_file("exp_zs/msrvtt/config.py"))
    vision, text = cfg.model.vision_encoder, cfg.model.text_encoder
    vision.pretrained = None  # every weight comes from the checkpoint
    text.pretrained = args.tokenizer
    if args.size == "tiny":
        vision.update(img_size=32, depth=2, embed_dim=32, num_frames=4, clip_decoder_embed_dim=32, clip_output_dim=24)
        text.update(config=args.bert_config, d_model=32, fusion_layer=2)
        cfg.model.embed_dim = 16
        cfg.num_frames = cfg.num_frames_test = 4
    cfg.inputs.max_txt_l = {"image": args.max_text_tokens, "video": args.max_text_tokens}
    cfg.evaluation.k_test = args.k_test
    cfg.fp16 = False
    cfg.distributed = False
    return cfg


def _load(model, checkpoint: str) -> dict:
    """tasks/shared_utils.py::setup_model's zero-shot branch: text_encoder.bert.* -> text_encoder.*, strict=False."""
    state = torch.load(checkpoint, map_location="cpu")
    state = state["model"] if "model" in state else state
    for key in list(state):
        if "bert" in key:
            state[key.replace("bert.", "")] = state.pop(key)
    msg = model.load_state_dict(state, strict=False)
    return {"missing": list(msg.missing_keys), "unexpected": list(msg.unexpected_keys)}


class FramesDataset(torch.utils.data.Dataset):
    """Our decoded frames behind the released eval dataset's attributes (text, image, txt2img, img2txt)."""

    media_type = "video"

    def __init__(self, released, frames_VCTHW: torch.Tensor) -> None:
        self.text, self.image = released.text, released.image
        self.txt2img, self.img2txt = released.txt2img, released.img2txt
        self.frames = frames_VCTHW

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index):
        return self.frames[index].permute(1, 0, 2, 3), index  # (T, C, H, W), as the released loader yields


def _released_frames(dataset, image_size: int) -> torch.Tensor:
    """The released test-time decode (decord, "middle") and transform (Resize bicubic, /255, Normalize)."""
    from dataset.video_utils import read_frames_decord
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.Lambda(lambda x: x.float().div(255.0)),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    clips = [transform(read_frames_decord(path, dataset.num_frames, sample="middle")[0]) for path in dataset.image]
    return torch.stack(clips).permute(0, 2, 1, 3, 4)  # (V, C, T, H, W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--checkpoint", "--tokenizer", "--frames", "--annotation", "--root", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--bert-config", help="BERT config json (tiny size)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--k-test", type=int, required=True)
    parser.add_argument("--max-text-tokens", type=int, default=32)
    parser.add_argument("--decode", action="store_true", help="also decode with the released reader and compare")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    _patch_bert_builder()
    from dataset.caption_dataset import VidTxtRetEvalDataset
    from models.backbones.bert.tokenization_bert import BertTokenizer
    from models.umt_videomamba import UMT_VIDEOMAMBA
    from tasks.retrieval_utils import evaluation, itm_eval

    cfg = _config(args)
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    device = torch.device("cuda")
    model = UMT_VIDEOMAMBA(config=cfg, tokenizer=tokenizer, is_pretrain=False)
    report = _load(model, args.checkpoint)
    model = model.to(device).eval()

    released = VidTxtRetEvalDataset(ann_file=[args.annotation, args.root, "video"], transform=None,
                                    num_frames=cfg.num_frames_test, sample_type="middle")
    frames = torch.load(args.frames)
    loader = torch.utils.data.DataLoader(FramesDataset(released, frames), batch_size=4, shuffle=False)
    with torch.no_grad():
        i2t_x, t2i_x, i2t_emb, t2i_emb = evaluation(model, loader, tokenizer, device, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "released_scores.npz", i2t_x=i2t_x, t2i_x=t2i_x, i2t_emb=i2t_emb, t2i_emb=t2i_emb)
    record = {
        "texts": list(released.text), "load": report,
        "metrics": itm_eval(i2t_x, t2i_x, released.txt2img, released.img2txt),
        "metrics_emb": itm_eval(i2t_emb, t2i_emb, released.txt2img, released.img2txt),
        "torch": torch.__version__,
    }
    if args.decode:
        theirs = _released_frames(released, cfg.inputs.image_res if args.size == "full" else 32)
        record["frames_max_abs_diff"] = float((theirs - frames).abs().max())
    (out / "released.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
