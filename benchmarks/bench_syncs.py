"""Host syncs per training step of every stage task through the real Trainer, for two versions of the code side by
side (before and after the step's syncs were removed), one GPU.

Each stage's tiny test config (configs/stages/*_test.yaml: videomamba_test, 4 frames of 32 px) trains through
`pipeline.engine.Trainer` on this GPU as a stage job would: DeepSpeed bf16 ZeRO-1, the pipeline's loader on the
committed tiny shards (tests/data/stage_losses_shards; labelled ones written here for fine-tuning), the Triton scan,
`model.cuda_graph: auto`, nonfinite=stop. After two warm-up steps (graph captures, compilation), --steps steps
(none of them a log step) are counted with pipeline/host_syncs.py (torch's sync debug mode), each sync charged to
its site: this code's pipeline/ or models/ ("ours"), DeepSpeed, or another package. The number of syncs a step
does not depend on the model's size, so the tiny models stand for the real ones.

    PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 python benchmarks/bench_syncs.py --before DIR [--steps 3]

--before DIR: a copy of the earlier code's pipeline/, models/ and configs/ (scripts/gpu_graphs.sh prepare makes
one with `git archive`). Each version runs in its own subprocess with its own checkout first on the import path;
the counter is loaded by file path from this checkout, so the earlier code needs none of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO / "tests" / "data" / "stage_losses_shards"
TINY_CLIP = "task.teacher.vision_overrides={layers: 2, width: 64, head_width: 32}"
# (config, overrides); {teacher}, {labelled} and {classes} are filled in by the parent process.
STAGES: dict[str, tuple[str, list[str]]] = {
    "masked_alignment": ("pretrain_mask_test.yaml", ["data.mask.type=attention", "task.teacher.pretrained=null",
                                                     TINY_CLIP, f"data.train_shards={SHARDS}"]),
    "self_distill": ("self_distill_test.yaml", ["task.teacher_checkpoint={teacher}", "data.mask.type=tube",
                                                "data.mask.ratio=0.5", f"data.train_shards={SHARDS}"]),
    "video_text": ("pretrain_vtc_test.yaml", ["data.mask.type=attention", "data.mask.ratio=0.5",
                                              "task.uta_weight=1.0", "task.teacher.pretrained=null", TINY_CLIP,
                                              f"data.train_shards={SHARDS}"]),
    "classification": ("finetune_test.yaml", ["data.train_shards={labelled}", "data.eval_shards=null",
                                              "task.class_index={classes}"]),
}
COMMON = ["scaling.use_ray=false", "tracking.enabled=false", "tracking.log_interval=1000",
          "checkpoint.interval_steps=1000", "data.batch_size=4", "data.num_workers=1", "model.cuda_graph=auto",
          "deepspeed.zero_stage=1", "deepspeed.precision=bf16", "nonfinite=stop"]


def load_counter():
    """This checkout's pipeline/host_syncs.py as a standalone module (the measured code may be an older one)."""
    spec = importlib.util.spec_from_file_location("host_syncs_counter", REPO / "pipeline" / "host_syncs.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def _filled(override: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        override = override.replace("{" + key + "}", value)
    return override


def measure(root: Path, fill: dict[str, str], steps: int, backend: str, out: Path) -> None:
    """In a subprocess whose import path starts at `root`: every stage's syncs per step, written to `out`."""
    counter = load_counter()
    from pipeline.checkpointing import LocalCheckpointStore, run_storage
    from pipeline.config import load_config
    from pipeline.engine import Trainer

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as tmp:
        for stage, (config, overrides) in STAGES.items():
            run = Path(tmp) / stage
            cfg = load_config(root / "configs" / "stages" / config, [
                *COMMON, f"model.scan_backend={backend}", f"output_dir={run}/out", f"checkpoint.path={run}/ckpt",
                *(_filled(o, fill) for o in overrides)])  # fmt: skip
            trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
            for _ in range(2):
                trainer.train_step()
            logs = []
            for _ in range(steps):
                with counter.count_host_syncs(trainer.device, roots=(root, REPO)) as log:
                    trainer.train_step()
                logs.append(log)
                counter.print_summary(f"{stage} ({root})", log)
            sites = Counter(str(site) for log in logs for site in log.sites)
            ours = Counter(str(site) for log in logs for site in log.ours)
            origins = Counter(site.origin for log in logs for site in log.sites)
            results[stage] = {"syncs/step": sum(len(log.sites) for log in logs) / steps,
                              "ours/step": sum(len(log.ours) for log in logs) / steps,
                              "by origin/step": {k: v / steps for k, v in origins.most_common()},
                              "sites/step": {k: v / steps for k, v in sites.most_common()},
                              "our sites/step": {k: v / steps for k, v in ours.most_common()},
                              "graphs": bool(cfg.cuda_graph_wanted())}
            out.write_text(json.dumps(results, indent=1))  # after every stage: a timeout keeps the stages done


def run_version(root: Path, fill: dict[str, str], args: argparse.Namespace, tmp: Path, label: str) -> dict:
    """The stages measured on the code at `root`, in a subprocess; those done before a failure or the time limit."""
    out = tmp / f"{label}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    try:
        subprocess.run([sys.executable, __file__, "--measure", str(root), "--fill", json.dumps(fill),
                        "--steps", str(args.steps), "--backend", args.backend, "--out", str(out)],
                       env=env, check=True, timeout=args.timeout_s)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"{label} ({root}): {err}; keeping the stages it finished", flush=True)
    return json.loads(out.read_text()) if out.is_file() else {}


def inputs(tmp: Path) -> dict[str, str]:
    """The self-distillation teacher (a random videomamba_test stage export) and labelled shards for fine-tuning."""
    import torch

    from models import create_model
    from pipeline.data.synthetic import make_synthetic

    kwargs = {"num_frames": 4, "img_size": 32, "num_classes": 0}
    torch.manual_seed(0)
    torch.save({"state_dict": create_model("videomamba_test", **kwargs).state_dict(),
                "meta": {"task": "masked_alignment", "model_name": "videomamba_test", "model_kwargs": kwargs}},
               tmp / "teacher.pt")
    data = make_synthetic(str(tmp / "labelled"), num_videos=12, split_ratio=8 / 12, seed=3, num_frames=8, size=32,
                          shard_size=4)
    return {"teacher": str(tmp / "teacher.pt"), "labelled": data["train_shards"],
            "classes": str(Path(data["train_shards"]).parents[1] / "classes.txt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the earlier code (pipeline/, models/, configs/)")
    parser.add_argument("--steps", type=int, default=3, help="counted steps per stage")
    parser.add_argument("--backend", default="triton", help="model.scan_backend (ref for a CPU smoke test)")
    parser.add_argument("--timeout-s", type=float, default=300, help="per version")
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # subprocess mode: the code root
    parser.add_argument("--fill", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, json.loads(args.fill), args.steps, args.backend, args.out)
        return
    from _common import RESULTS, write_results

    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as tmp:
        fill = inputs(Path(tmp))
        versions = {"after": run_version(REPO, fill, args, Path(tmp), "after")}
        if args.before:
            versions["before"] = run_version(args.before.resolve(), fill, args, Path(tmp), "before")
    rows = []
    for stage in STAGES:
        row = {"stage": stage}
        for label, results in versions.items():
            if stage not in results:
                continue
            got = results[stage]
            row.update({f"{label} syncs/step": got["syncs/step"], f"{label} ours/step": got["ours/step"],
                        f"{label} deepspeed/step": got["by origin/step"].get("deepspeed", 0.0),
                        f"{label} graphs": got["graphs"], f"{label} sites/step": got["sites/step"]})
        ours = versions["after"].get(stage, {}).get("our sites/step", {})
        row["after: our sites"] = "; ".join(f"{site} x{n:g}" for site, n in ours.items())
        rows.append(row)
        print(row, flush=True)
    columns = ["stage"] + [f"{label} {k}" for label in ("before", "after") if label in versions
                           for k in ("syncs/step", "ours/step", "deepspeed/step", "graphs")] + ["after: our sites"]
    setup = {"steps": args.steps, "scan_backend": args.backend, "configs": {s: c for s, (c, _) in STAGES.items()},
             "common overrides": COMMON, "before": str(args.before) if args.before else None}
    notes = ["syncs/step: host syncs of one training step (Trainer.train_step: forward, loss, backward and update of "
             "every micro-batch, DeepSpeed included), torch's sync debug mode; ours: made in pipeline/ or models/; "
             "deepspeed: in DeepSpeed (ZeRO's overflow check and gradient-norm validation). Not counted: copies "
             "from pageable host memory, which the driver may stage after waiting for the GPU (the engine pins "
             "batches since). graphs: model.cuda_graph=auto replays the trainable model from CUDA graphs."]
    write_results("syncs", rows, columns, "Host syncs per training step, every stage, before and after",
                  setup=setup, results_dir=args.results_dir or RESULTS, notes=notes)


if __name__ == "__main__":
    main()
