"""The released side of scripts/check_released_eval.py: runs OpenGVLab/VideoMamba's own zero-shot evaluation.

Run by check_released_eval.py in a process of its own, in `<checkout>/videomamba/video_mm` (on PYTHONPATH after
the released code's own package versions, e.g. transformers 4.36.1 and timm 0.4.12 in a private folder), so it
imports the released code and its dependencies, not this project; the one file of this project it runs is
benchmarks/_released.py (by path), which makes `mamba_ssm` / `causal_conv1d` the checkout's kernel fork over
the compiled modules of `--released-ext`.

It builds `UMT_VIDEOMAMBA` from `exp_zs/msrvtt/config.py` (overridden to the checkpoint's size, k_test and
fp32), loads the released-layout checkpoint the way `tasks/shared_utils.py::setup_model` does for zero-shot
evaluation, reads the annotation with the released `VidTxtRetEvalDataset` (captions cleaned by its
`pre_text`), and runs `tasks/retrieval_utils.py::evaluation` and `itm_eval` on the frames our pipeline decoded
(`--frames`). With `--decode`, it also decodes the videos with the released reader and transform and reports
how far those frames are from ours (PyAV and decord convert colours slightly differently).

`--dry-run` needs no GPU and no kernels: the fork is imported without its compiled modules, the model is built
and loaded on the CPU, the annotation read and the queries tokenised, and only the text tower runs (the text
embeddings `text_proj([CLS])`, which need no kernel); no video is encoded. `--reference-kernels` runs the whole
evaluation on the CPU with the fork's own reference functions in place of its CUDA and Triton kernels
(benchmarks/_released.py `install_fork(kernels="reference")`): slow, for tiny models.

Modules that the released files import at import time but whose functions the evaluation never calls (the
video readers of `dataset/video_utils.py`, deepspeed in `utils/distributed.py`) get a placeholder when they
are not installed: a module whose functions raise when called (decord's `bridge.set_bridge`, called at
import, only records the setting). The record lists them.

Writes `<out>/released_scores.npz` (i2t_x, t2i_x, i2t_emb, t2i_emb; a dry run: text_emb) and
`<out>/released.json` (texts, metrics, load report, package versions and where they were imported from).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# Imported by the released files when they are imported; the evaluation on given frames calls none of them.
UNUSED_AT_EVALUATION = ("av", "cv2", "decord", "imageio", "deepspeed")
RECORDED_CALLS = {"decord.bridge.set_bridge"}  # settings the released files make at import time
# The released files this driver runs, beside the kernel fork that benchmarks/_released.py checks.
VIDEO_MM = "videomamba/video_mm"
VIDEO_MM_FILES = ("exp_zs/msrvtt/config.py", "configs/config_bert.json", "models/umt_videomamba.py",
                  "models/backbones/videomamba/videomamba.py", "models/backbones/bert/xbert.py",
                  "models/backbones/bert/tokenization_bert.py", "dataset/caption_dataset.py",
                  "tasks/retrieval_utils.py", "tasks/shared_utils.py", "utils/config.py")


class Placeholder(types.ModuleType):
    """A module the released files import but the evaluation does not use: attributes are further
    placeholders, calls raise (except the import-time settings of RECORDED_CALLS, which are recorded)."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__(name)
        self.__path__, self._calls = [], calls
        # A spec, as an imported module has one (importlib.util.find_spec reads it: transformers does).
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, origin="placeholder (released_eval_driver.py)")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        child = Placeholder(f"{self.__name__}.{attr}", self._calls)
        setattr(self, attr, child)
        return child

    def __call__(self, *args, **kwargs):
        if self.__name__ in RECORDED_CALLS:
            self._calls.append(f"{self.__name__}{args}")
            return None
        raise RuntimeError(f"{self.__name__} was called, but {self.__name__.split('.')[0]} is not installed here "
                           "(released_eval_driver.py put a placeholder in its place because the evaluation on "
                           "given frames was not expected to use it)")


def install_placeholders() -> dict[str, list[str]]:
    """Placeholders for the UNUSED_AT_EVALUATION modules that are not installed; returns {module: calls}."""
    placed: dict[str, list[str]] = {}
    for name in UNUSED_AT_EVALUATION:
        if importlib.util.find_spec(name) is None:
            placed[name] = []
            sys.modules[name] = Placeholder(name, placed[name])
    return placed


def load_kernel_fork(repo: Path, ext_dir: Path | None, kernels: str) -> dict:
    """The checkout's mamba_ssm / causal_conv1d fork, through benchmarks/_released.py, with `kernels` ("built",
    "reference" or "none", see its install_fork); returns its provenance."""
    spec = importlib.util.spec_from_file_location("released_path_loader", REPO / "benchmarks" / "_released.py")
    loader = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loader  # its dataclasses look their module up there
    spec.loader.exec_module(loader)
    missing = [f"{repo / VIDEO_MM / rel} is missing" for rel in VIDEO_MM_FILES if not (repo / VIDEO_MM / rel).is_file()]
    built = kernels == "built"
    found = missing + loader.problems(repo, ext_dir, need_cuda=built, need_kernels=built)
    if found:
        raise SystemExit("the released evaluation cannot run here:\n  - " + "\n  - ".join(found))
    loader.install_fork(repo, ext_dir, kernels=kernels)
    if built:
        return loader._provenance(repo, ext_dir)
    return {"kernels": "the fork's reference functions (selective_scan_ref, causal_conv1d_ref, rms_norm_ref)"
            if kernels == "reference" else "not loaded (--dry-run)"}


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
    else:  # VideoMamba-M, at another resolution only its position embedding's patch grid changes
        vision.img_size = cfg.inputs.image_res = args.img_size
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


def _versions() -> dict:
    """The packages the released side ran with: version and the folder each was imported from."""
    found = {}
    for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "timm", "torchvision", "triton", "numpy",
                 "accelerate"):
        module = sys.modules.get(name)
        found[name] = ({"version": getattr(module, "__version__", "?"), "from": str(Path(module.__file__).parent)}
                       if getattr(module, "__file__", None) else "not imported")
    return found


def _text_embeddings(model, tokenizer, texts: list[str], max_len: int) -> np.ndarray:
    """`text_proj([CLS])` of each query, tokenised as `extract_text_feats` does (no kernel involved)."""
    text_input = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        return model.text_proj(model.encode_text(text_input)[0][:, 0]).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--videomamba-repo", "--checkpoint", "--tokenizer", "--annotation", "--root", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--frames", help="our decoded frames, (V, C, T, H, W) float (required unless --dry-run)")
    parser.add_argument("--released-ext", help="folder of the compiled selective_scan_cuda / causal_conv1d_cuda")
    parser.add_argument("--bert-config", help="BERT config json (tiny size)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--img-size", type=int, default=224, help="pixels of the full size's frames")
    parser.add_argument("--k-test", type=int, required=True)
    parser.add_argument("--max-text-tokens", type=int, default=32)
    parser.add_argument("--decode", action="store_true", help="also decode with the released reader and compare")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--dry-run", action="store_true", help="CPU only: build, load, tokenise, text tower")
    modes.add_argument("--reference-kernels", action="store_true",
                       help="CPU only: the whole evaluation, with the fork's reference functions as kernels")
    args = parser.parse_args()
    if not args.dry_run and args.frames is None:
        parser.error("--frames is required (or --dry-run)")
    kernels = "none" if args.dry_run else "reference" if args.reference_kernels else "built"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    placeholders = install_placeholders()
    repo = Path(args.videomamba_repo).resolve()
    provenance = load_kernel_fork(repo, Path(args.released_ext) if args.released_ext else None, kernels)
    sys.path.insert(0, str(repo / VIDEO_MM))
    _patch_bert_builder()
    from dataset.caption_dataset import VidTxtRetEvalDataset
    from models.backbones.bert.tokenization_bert import BertTokenizer
    from models.umt_videomamba import UMT_VIDEOMAMBA
    from tasks.retrieval_utils import evaluation, itm_eval

    cfg = _config(args)
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    model = UMT_VIDEOMAMBA(config=cfg, tokenizer=tokenizer, is_pretrain=False)
    report = _load(model, args.checkpoint)
    model = model.eval()
    released = VidTxtRetEvalDataset(ann_file=[args.annotation, args.root, "video"], transform=None,
                                    num_frames=cfg.num_frames_test, sample_type="middle")
    record = {"texts": list(released.text), "load": report, "kernels": kernels, "packages": _versions(),
              "placeholders": placeholders, "released": provenance}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        np.savez(out / "released_scores.npz",
                 text_emb=_text_embeddings(model, tokenizer, list(released.text), args.max_text_tokens))
    else:
        device = torch.device("cuda" if kernels == "built" else "cpu")
        model = model.to(device)
        frames = torch.load(args.frames)
        loader = torch.utils.data.DataLoader(FramesDataset(released, frames), batch_size=4, shuffle=False)
        with torch.no_grad():
            i2t_x, t2i_x, i2t_emb, t2i_emb = evaluation(model, loader, tokenizer, device, cfg)
        np.savez(out / "released_scores.npz", i2t_x=i2t_x, t2i_x=t2i_x, i2t_emb=i2t_emb, t2i_emb=t2i_emb)
        record["metrics"] = itm_eval(i2t_x, t2i_x, released.txt2img, released.img2txt)
        record["metrics_emb"] = itm_eval(i2t_emb, t2i_emb, released.txt2img, released.img2txt)
        record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if args.decode:
            theirs = _released_frames(released, args.img_size if args.size == "full" else 32)
            record["frames_max_abs_diff"] = float((theirs - frames).abs().max())
    (out / "released.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
