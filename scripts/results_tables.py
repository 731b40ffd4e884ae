"""Markdown tables of benchmarks/results/*.json, shared by the README's results section and docs/performance.md.

One section per result file: its title, where it came from, one line of provenance (date, commit, device,
versions, setup) and its table. Known layouts have fixed columns; the whole-model files (`model`, `model_*`) are
pivoted into one row per (size, frames) with the models side by side; any other file gets a generic layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Result files with a known layout: stem -> (title, columns of its "rows").
TABLES = {
    "scan": ("Selective scan: our Triton kernel vs mamba-ssm's CUDA kernel",
             ["shape", "B,E,L", "ours fwd ms", "mamba fwd ms", "speedup fwd", "ours fwd+bwd ms", "mamba fwd+bwd ms",
              "speedup fwd+bwd", "max rel diff vs mamba"]),
    "scan_time_major": ("Selective scan with our inputs time-major (the mixer's layout), mamba-ssm's in (B, E, L)",
                        ["shape", "B,E,L", "ours fwd ms", "mamba fwd ms", "speedup fwd", "ours fwd+bwd ms",
                         "mamba fwd+bwd ms", "speedup fwd+bwd", "bidir speedup fwd+bwd", "ours peak GiB",
                         "mamba peak GiB"]),
    "block": ("Bidirectional mixer core: fused Triton vs the released fused path (mamba-ssm + causal-conv1d)",
              ["shape", "B,E,L", "ours fwd ms", "released fwd ms", "speedup fwd", "ours fwd+bwd ms",
               "released fwd+bwd ms", "speedup fwd+bwd", "speedup eager fwd+bwd", "ours fwd+bwd spread %",
               "released fwd+bwd spread %", "ours peak GiB (fwd+bwd)", "released peak GiB (fwd+bwd)", "out rel diff",
               "dxz rel diff"]),
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
    "config": ("Configs: today's dataclasses + coercion vs a pydantic v2 prototype of the same sections (CPU)",
               ["measure", "dataclasses (today)", "pydantic v2", "pydantic v2 + message adapter"]),
    "soak": ("Soak (CPU): toy training through Ray + DeepSpeed + MLflow with worker kills, NaN batches, driver stops",
             ["kind", "driver", "at s", "step", "resumed from", "steps redone", "recovery s", "seen", "orphans",
              "own group"]),
}
TITLES = {"model": "Whole model: ours vs the released VideoMamba code and a joint-attention TimeSformer, 224², bf16",
          "norm": "Fused add + RMSNorm: Triton vs the PyTorch reference",
          "data": "Data path (CPU): clips/s per core per decoder and footage, cores per GPU, loader",
          "data_gpu": "Data path on the GPU machine: per-core rates, NVDEC, Stage 1 data wait from S3",
          "eval": "Retrieval evaluation of 1k videos: where the time goes",
          "engine": "Training loop overhead: the DeepSpeed engine vs a bare PyTorch loop",
          "vtc_gather": "Video-text contrastive loss: cost of gathering features across ranks"}
ORDER = ["model", "block", "scan", "data", "eval"]  # then their variants and the remaining files, by name

# The whole-model pivot: one column group per model of bench_model.py.
MODEL_KEYS = ("ours", "released", "timesformer-sdpa", "timesformer-eager")
MODEL_SHORT = {"ours": "ours", "released": "released", "timesformer-sdpa": "TS-SDPA", "timesformer-eager": "TS-eager"}

# Issue 28's targets on the whole-model rows: (mode, frames, sizes, ratio column, at least).
TARGETS = [
    ("train step", 8, ("S", "M"), "vs timesformer-sdpa", 0.67),
    ("train step", 32, ("S", "M"), "vs timesformer-sdpa", 1.5),
    ("train step", 64, ("S", "M"), "vs timesformer-sdpa", 3.0),
    ("inference", 64, ("Ti", "S"), "vs timesformer-sdpa", 2.0),
    ("train step", 8, ("Ti", "S", "M"), "vs released", 3.0),
    ("inference", 8, ("Ti", "S", "M"), "vs released", 4.0),
]


def result_files(results_dir: Path = RESULTS) -> dict[str, Path]:
    """stem -> path, in the order the sections appear: known layouts first, then by name."""
    files = {path.stem: path for path in sorted(results_dir.glob("*.json"))}
    rank = {s: (ORDER.index(s.split("_")[0]) if s.split("_")[0] in ORDER else len(ORDER), s) for s in files}
    return {stem: files[stem] for stem in sorted(files, key=rank.get)}


def render_section(stem: str, path: Path, level: str = "####") -> str:
    """One result file as `#### title`, its source, its provenance line and its table."""
    data = json.loads(path.read_text())
    kind, _, variant = stem.partition("_")  # data_320px, eval_gpu, model_part2: a variant of a known layout
    if stem in TABLES:
        title, columns = TABLES[stem]
        body = meta_line(data.get("meta", {})) + "\n\n" + table(columns, data["rows"])
    elif kind == "model":
        title, body = TITLES["model"] + (f" ({variant})" if variant else ""), model_body(data)
    else:
        title = TITLES.get(stem) or (f"{TITLES[kind]} ({variant})" if kind in TITLES else stem)
        body = _eval_body(data) if kind == "eval" else _generic_body(data)
    return f"{level} {title}\n\nFrom `{shown(path)}`.\n\n{body}"


def render_results(results_dir: Path = RESULTS, level: str = "####") -> str:
    """Every result file's section, known layouts first."""
    files = result_files(results_dir)
    if not files:
        return f"No benchmark results yet: the benchmarks write them to `{shown(results_dir)}/`."
    return "\n\n".join(render_section(stem, path, level) for stem, path in files.items())


def shown(path: Path) -> Path:
    """A path as the docs show it: relative to the repository when inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def meta_line(meta: dict[str, Any]) -> str:
    """The scalar entries of a result's meta on one line; the nested ones are named (their content is in the JSON)."""
    scalars = "; ".join(f"{k} {v}" for k, v in meta.items() if _is_scalar(v) and v is not None)
    nested = [k for k, v in meta.items() if not _is_scalar(v)]
    return (scalars + "." if scalars else "") + (f" In the JSON also: {', '.join(nested)}." if nested else "")


def model_body(data: dict[str, Any]) -> str:
    """bench_model.py's rows pivoted: per mode, one row per (size, frames) with every model's clips/s."""
    meta, rows = data.get("meta", {}), data["rows"]
    configs: dict[tuple[str, str, int], dict[str, dict]] = {}
    for row in rows:
        configs.setdefault((row["mode"], row["size"], row["frames"]), {})[row["model"]] = row
    parts = [meta_line(meta)]
    for mode in ("train step", "inference"):
        keys = [k for k in configs if k[0] == mode]
        if not keys:
            continue
        models = [m for m in MODEL_KEYS if any(m in configs[k] for k in keys)]
        columns = ["size", "frames", "batch", *(f"{MODEL_SHORT[m]} clips/s" for m in models),
                   "ours / TS-SDPA", "ours / released", "ours spread %",
                   *(f"{MODEL_SHORT[m]} GiB/clip" for m in models if m != "timesformer-eager"),
                   "ours vs released: out / grad rel diff"]
        lines = []
        for key in sorted(keys, key=lambda k: (k[2], "Ti S M".split().index(k[1]) if k[1] in ("Ti", "S", "M") else 9)):
            by_model = configs[key]
            ours = by_model.get("ours", {})
            line = {"size": key[1], "frames": key[2], "batch": ours.get("batch"),
                    "ours / TS-SDPA": ours.get("vs timesformer-sdpa"), "ours / released": ours.get("vs released"),
                    "ours spread %": ours.get("spread %"),
                    "ours vs released: out / grad rel diff": _diffs(ours)}
            for m in models:
                line[f"{MODEL_SHORT[m]} clips/s"] = _speed_cell(by_model.get(m, {}), ours.get("batch"))
                line[f"{MODEL_SHORT[m]} GiB/clip"] = by_model.get(m, {}).get("GiB/clip")
            lines.append(line)
        parts.append(f"**{mode}**\n\n" + table(columns, lines))
    parts.append("clips/s of plain calls between CUDA events, median over every timed call; a model's batch differs "
                 "from the row's where it ran out of memory (shown in brackets). ours / X: clips/s ratio in the same "
                 "run. TS = TimeSformer with joint attention, the size's width and half its depth. spread: (largest "
                 "- least round median) / median. rel diff: ours against the released model with its weights.")
    return "\n\n".join(p for p in parts if p)


def _speed_cell(row: dict[str, Any], batch: int | None) -> str:
    if not row:
        return "-"
    if row.get("clips/s") is None:
        error = str(row.get("error", "-"))
        if error.startswith("out of memory"):
            return f"OOM (batch {row.get('did not fit (batch)', '?')})"
        return "skipped" if error.startswith("skipped") else "not run" if error.startswith("not run") else "error"
    cell = _cell(row["clips/s"])
    return cell if row.get("batch") == batch else f"{cell} (b{row.get('batch')})"


def _diffs(row: dict[str, Any]) -> str:
    if "out rel diff" not in row:
        return row.get("check error", "-")[:60] if row.get("check error") else "-"
    grad = row.get("grad rel diff")
    return f"{row['out rel diff']:.2g}" + (f" / {grad:.2g}" if grad is not None else "")


def target_rows(results_dir: Path = RESULTS) -> list[dict[str, Any]]:
    """Issue 28's targets against every whole-model result file: one row per (target, size)."""
    found = []
    for stem, path in result_files(results_dir).items():
        if stem.partition("_")[0] != "model":
            continue
        data = json.loads(path.read_text())
        rows = {(r["mode"], r["frames"], r["size"]): r for r in data["rows"] if r.get("model") == "ours"}
        for mode, frames, sizes, column, least in TARGETS:
            for size in sizes:
                row = rows.get((mode, frames, size))
                if row is None:
                    continue
                value = row.get(column)
                status = "not measured" if value is None else "met" if value >= least else "not met"
                found.append({"target": f"{mode}, {frames} frames: ours {column} >= {least:g}", "size": size,
                              "measured": value, "status": status, "file": f"{stem} ({data['meta'].get('date')})"})
    return found


def _eval_body(data: dict[str, Any]) -> str:
    from pipeline.evaluation.report import timing_table

    setup, runs = data["setup"], data["setup"].get("runs_total_s", [])
    rates = ", ".join(f"{k.removesuffix('_clips_per_s').replace('_', ' ')} {v} clips/s"
                      for k, v in data.get("rates", {}).items())
    when = f"{setup['date']}, commit {setup['git_commit']}; " if "date" in setup else ""
    return "\n".join([
        f"{when}{setup['videos']} videos, {setup['texts']} queries ({setup['clips']}); {setup['device']}; "
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
            parts.append(f"{key}: " + ", ".join(f"{k} {_cell(v)}" for k, v in value.items()
                                                if _is_scalar(v) and v is not None) + ".")
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            keys = dict.fromkeys(k for r in value for k in r)
            columns = [c for c in keys if all(_is_scalar(r.get(c)) for r in value)]
            parts.append(f"{key}:\n\n" + table(columns, value))
    return "\n\n".join(parts)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
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
