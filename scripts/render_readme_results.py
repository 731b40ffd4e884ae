"""Regenerate the README's model-zoo and results sections from the code and benchmarks/results/, never by hand.

    .venv/bin/python scripts/render_readme_results.py           # rewrite README.md between the markers
    .venv/bin/python scripts/render_readme_results.py --check   # exit 1 if README.md is out of date

Two sections, each between a pair of markers in README.md:
  <!-- zoo:start --> ... <!-- zoo:end -->          depth, width and parameters of every registered size
                                                    (400-class 8-frame classifier and the headless backbone)
  <!-- results:start --> ... <!-- results:end -->  one table per benchmarks/results/*.json: the scan kernel and
                                                    the fused mixer core (GPU), data loading and the retrieval
                                                    evaluation's time split (CPU), and any other result file
                                                    in a generic layout. tests/test_readme.py keeps them in sync.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
COMMAND = ".venv/bin/python scripts/render_readme_results.py"

# Sizes shown in the zoo (the CPU test models are left out): registry name -> paper name.
ZOO = {"videomamba_tiny": "Ti", "videomamba_small": "S", "videomamba_middle": "M", "videomamba_base": "B"}

# Result files with a known layout: stem -> (title, columns of its "rows"). Others get the generic layout.
TABLES = {
    "scan": ("Selective scan: our Triton kernel vs mamba-ssm's CUDA kernel",
             ["shape", "B,E,L", "ours fwd ms", "mamba fwd ms", "speedup fwd", "ours fwd+bwd ms", "mamba fwd+bwd ms",
              "speedup fwd+bwd", "max rel diff vs mamba"]),
    "scan_time_major": ("Selective scan with our inputs time-major (the mixer's layout), mamba-ssm's in (B, E, L)",
                        ["shape", "B,E,L", "ours fwd ms", "mamba fwd ms", "speedup fwd", "ours fwd+bwd ms",
                         "mamba fwd+bwd ms", "speedup fwd+bwd", "bidir speedup fwd+bwd", "ours peak GiB",
                         "mamba peak GiB"]),
    "block": ("Bidirectional mixer core: fused Triton vs mamba-ssm scan + unfused PyTorch glue",
              ["shape", "B,E,L", "ours fwd ms", "base fwd ms", "speedup fwd", "ours fwd+bwd ms", "base fwd+bwd ms",
               "speedup fwd+bwd", "speedup eager fwd+bwd", "ours peak GiB (fwd+bwd)", "base peak GiB (fwd+bwd)"]),
    "model": ("Whole model: VideoMamba-Ti (Triton scan) vs joint-attention TimeSformer-Ti (SDPA), 224², bf16",
              ["model", "mode", "frames", "batch", "ms", "clips/s", "GiB/clip", "baseline clips/s (H100)",
               "vs baseline", "TimeSformer / VideoMamba"]),
    "masked": ("Stage 1 training step: frozen CLIP ViT-B/16 teacher + VideoMamba student at 80% masking",
               ["model", "batch", "tokens (masked / all)", "step ms", "clips/s", "peak GiB", "teacher share",
                "student share", "student clips/s (masked)", "student clips/s (no mask)",
                "masked / unmasked clips/s", "clips/s, graphs", "graphs speedup (step)",
                "masked / unmasked clips/s, graphs", "peak GiB, graphs"]),
    "video_text": ("Stage 3 training step: VideoMamba-M video-text (VTC + VTM + UTA), eager and CUDA-graphed",
                   ["model", "batch", "mask", "checkpointing", "eager step ms", "eager clips/s", "eager peak GiB",
                    "graphs step ms", "graphs clips/s", "graphs peak GiB", "graphs speedup"]),
    "scaling": ("Data-parallel scaling: Stage 1 VideoMamba-S as Ray Jobs on 1-4 H100s (DeepSpeed ZeRO, bf16, NCCL)",
                ["zero", "workers", "global batch", "clips/s", "per worker", "efficiency", "comm busy",
                 "comm exposed", "compute busy", "peak GiB", "data wait", "step s"]),
    "scaling_vtc_1gpu": ("Stage 3 (video-text, VideoMamba-M) as a Ray Job on one H100",
                         ["zero", "workers", "global batch", "clips/s", "compute busy", "peak GiB", "data wait",
                          "step s"]),
    "scaling_vtc_2gpu": ("Stage 3 (video-text, VideoMamba-M) as Ray Jobs on 1 and 2 H100s",
                         ["zero", "workers", "global batch", "clips/s", "per worker", "efficiency", "comm busy",
                          "peak GiB", "data wait", "step s"]),
    "scaling_fault": ("Worker loss: one of 2 H100 ranks SIGKILLed after a committed checkpoint, Ray restarts the group",
                      ["workers", "zero", "killed at s", "resumed after kill s", "resumed from", "final step",
                       "steps unique", "recovered", "wall s"]),
}
TITLES = {"data": "Data path (CPU): clips/s per core per decoder and footage, cores per GPU, loader",
          "data_gpu": "Data path on the GPU machine: per-core rates, NVDEC, Stage 1 data wait from S3",
          "eval": "Retrieval evaluation of 1k videos: where the time goes",
          "engine": "Training loop overhead: the DeepSpeed engine vs a bare PyTorch loop",
          "vtc_gather": "Video-text contrastive loss: cost of gathering features across ranks"}
ORDER = ["scan", "block", "model", "data", "eval"]  # then their variants and the remaining files, by name


def render_zoo() -> str:
    """Markdown table of the registered sizes, counted on the meta device (no memory, no init)."""
    import torch

    from models import create_model

    lines = ["| model | registry name | depth | width | params, 400 classes (8x224²) | params, backbone only |",
             "|---|---|---:|---:|---:|---:|"]
    for name, short in ZOO.items():
        with torch.device("meta"):
            classifier = create_model(name, num_classes=400, num_frames=8)
            backbone = create_model(name, num_classes=0, num_frames=8)
        counts = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (classifier, backbone)]
        lines.append(f"| VideoMamba-{short} | `{name}` | {classifier.depth} | {classifier.embed_dim} | "
                     f"{counts[0]:.2f} M | {counts[1]:.2f} M |")
    return "\n".join(lines)


def render_results(results_dir: Path = RESULTS) -> str:
    """One subsection per result file, known layouts first."""
    files = {path.stem: path for path in sorted(results_dir.glob("*.json"))}
    if not files:
        return f"No benchmark results yet: the benchmarks write them to `{_shown(results_dir)}/`."
    stems = sorted(files, key=lambda s: (ORDER.index(s.split("_")[0]) if s.split("_")[0] in ORDER else len(ORDER), s))
    sections = []
    for stem in stems:
        data = json.loads(files[stem].read_text())
        where = f"`{_shown(files[stem])}`"
        kind, _, variant = stem.partition("_")  # data_320px, eval_gpu: a variant of a known layout
        if stem in TABLES:
            title, columns = TABLES[stem]
            body = _meta_line(data.get("meta", {})) + "\n\n" + _table(columns, data["rows"])
        else:
            title = TITLES.get(stem) or (f"{TITLES[kind]} ({variant})" if kind in TITLES else stem)
            body = _eval_body(data) if kind == "eval" else _generic_body(data)
        sections.append(f"#### {title}\n\nFrom {where}.\n\n{body}")
    return "\n\n".join(sections)


def _shown(path: Path) -> Path:
    """A path as the README shows it: relative to the repository when inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def _meta_line(meta: dict[str, Any]) -> str:
    return "; ".join(f"{k} {v}" for k, v in meta.items()) + "." if meta else ""


def _eval_body(data: dict[str, Any]) -> str:
    from pipeline.evaluation.report import timing_table

    setup, runs = data["setup"], data["setup"].get("runs_total_s", [])
    rates = ", ".join(f"{k.removesuffix('_clips_per_s').replace('_', ' ')} {v} clips/s"
                      for k, v in data.get("rates", {}).items())
    return "\n".join([
        f"{setup['videos']} videos, {setup['texts']} queries ({setup['clips']}); {setup['device']}; "
        f"{setup['model']} at {setup['num_frames']}x{setup['img_size']}px, batch {setup['batch_size']}, "
        f"{setup['decode_workers']} decoding workers, {setup['precision']}; torch {setup['torch']}."
        + (f" Evaluation {len(runs)} of {len(runs)} shown (totals of each: {', '.join(f'{t:.1f}' for t in runs)} s)."
           if len(runs) > 1 else ""),
        *timing_table(data["timing"], {}), "",
        f"Bounded by **{data['bounded_by']}**" + (f" ({rates})." if rates else "."),
    ])


def _generic_body(data: Any) -> str:
    """Scalars as one line, nested mappings as `key: a=1, b=2` lines, lists of mappings as tables."""
    if isinstance(data, list):
        data = {"rows": data}
    scalars = {k: v for k, v in data.items() if _is_scalar(v)}
    parts = [", ".join(f"{k} {_cell(v)}" for k, v in scalars.items()) + "."] if scalars else []
    for key, value in data.items():
        if isinstance(value, dict):
            parts.append(f"{key}: " + ", ".join(f"{k} {_cell(v)}" for k, v in value.items() if _is_scalar(v)) + ".")
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            keys = dict.fromkeys(k for r in value for k in r)
            columns = [c for c in keys if all(_is_scalar(r.get(c)) for r in value)]
            parts.append(f"{key}:\n\n" + _table(columns, value))
    return "\n\n".join(parts)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    rule = "|---|" + "---:|" * (len(columns) - 1)  # first column (a name) left, numbers right
    lines = ["| " + " | ".join(columns) + " |", rule]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Numbers: 2 decimals from 1 to 100, 1 above, 3 significant digits below 1; missing ones as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or value == 0:
        return str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the lines between `<!-- name:start -->` and `<!-- name:end -->` replaced by `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README.md must hold exactly one '{start}' line followed by one '{end}' line")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    note = f"<!-- generated by `{COMMAND}`: edit the script or the result files, not this section -->"
    return f"{head}{start}\n{note}\n\n{body}\n\n{end}{tail}"


def render_readme(text: str, results_dir: Path = RESULTS) -> str:
    """The README text with both generated sections brought up to date."""
    text = replace_section(text, "zoo", render_zoo())
    return replace_section(text, "results", render_results(results_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render_readme(current)
    if args.check:
        if fresh != current:
            print(f"README.md's generated sections are stale; run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    print("README.md: zoo and results sections " + ("unchanged" if fresh == current else "rewritten"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
