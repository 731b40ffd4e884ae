"""Whole model on one GPU, in one process: our VideoMamba, the released VideoMamba code path, and a joint-attention
TimeSformer of matched width with fused (SDPA) and eager attention; inference and a full training step.

Models (the `model` column):
  ours               models.create_model("videomamba_<size>", scan_backend="triton"): our Triton kernels.
  released           the released model file read from --released-repo (a checkout of OpenGVLab/VideoMamba), with
                     its mamba-ssm fork's fused mamba_inner_fn_no_out_proj on mamba-ssm's selective-scan and
                     causal-conv1d's kernels (benchmarks/_released.py, scripts/build_released_kernels.py).
  timesformer-sdpa   TimeSformer with joint space-time attention (DeiT blocks, the paper's Figure 1 model): the
  timesformer-eager  size's width, half its depth (a ViT block has two residual branches, attention and MLP, a
                     VideoMamba block one: Ti 192 x 12 = DeiT-Ti, S 384 x 12 = DeiT-S, M 576 x 16), width / 64
                     heads. One set of weights; attention by torch's scaled_dot_product_attention, or written out
                     as softmax(Q K^T / sqrt(d)) V.
Outputs compared before timing: ours gets the released model's weights (the parameter names
are the official ones) and its logits (inference) or loss and gradients (training step) are compared with the
released model's at the configuration's batch; TimeSformer's eager attention is compared with its SDPA the same
way on --check-batch clips.

Setup: 224², bf16 autocast over fp32 weights, a 400-class head; training step = cross-entropy, backward, fused
AdamW, zero_grad; stochastic depth and dropout off. Batch: --train-clip-frames / frames clips for the training
step (256: 32 clips at 8 frames, 4 at 64) and --infer-clip-frames / frames for inference (512); a model that runs
out of memory halves its own batch and its row lists the batches that did not fit. Timing: plain calls (the host's
Python and launches count, as in a training loop), each between CUDA events. After 2 warm-up calls each, the
models are timed in --rounds rounds whose order alternates (ours, released, SDPA, eager; then the reverse); a
round gives each model at least --round-s seconds (1 to --max-calls calls). Rows give the median over every timed
call, the least and largest round median and their spread. Configurations run targets first (training at 8
frames, inference at 8, training at 64, ...); those left when --budget-s is spent are listed as skipped.
Results: <results-dir>/<stem>.{json,md}, rewritten after every (mode, frames, size).

    PYTHONPATH=.:benchmarks python benchmarks/bench_model.py --released-repo PATH --released-ext DIR \
        [--sizes Ti S M] [--frames 8 16 32 64] [--modes train infer] [--budget-s 330]
    ... --check-released         say what the released path lacks here, import nothing, exit 1 if anything
    ... --models ours --rounds 0 build and run each configuration once: compiles and caches our Triton kernels
    ... --device cpu --tiny --frames 2 4 --rounds 1   CPU smoke test (tiny widths, reference kernels)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, rel_err, write_results
from _released import ReleasedPath, ReleasedPathError, load, problems
from torch import Tensor, nn

from models import create_model

MODELS = ("ours", "released", "timesformer-sdpa", "timesformer-eager")
LABELS = {"ours": "VideoMamba, ours (Triton)", "released": "VideoMamba, released code (mamba-ssm, causal-conv1d)",
          "timesformer-sdpa": "TimeSformer, SDPA attention", "timesformer-eager": "TimeSformer, eager attention"}
MODES = {"train": "train step", "infer": "inference"}
# Targets first: issue 28's ratios are at 8, 32 and 64 frames; within a mode the sizes its targets name first.
ORDER = [("train", 8), ("infer", 8), ("train", 64), ("infer", 64), ("train", 32), ("infer", 32), ("train", 16),
         ("infer", 16)]
SIZE_ORDER = {"train": ("S", "M", "Ti"), "infer": ("Ti", "S", "M")}


@dataclass(frozen=True)
class Size:
    """A VideoMamba size and its TimeSformer twin."""

    registry: str
    width: int
    depth: int
    img_size: int = 224
    heads: int = 0  # TimeSformer heads; 0: width // 64

    @property
    def timesformer(self) -> tuple[int, int, int]:
        """(width, depth, heads) of the matched TimeSformer."""
        return self.width, max(1, self.depth // 2), self.heads or self.width // 64


SIZES = {"Ti": Size("videomamba_tiny", 192, 24), "S": Size("videomamba_small", 384, 24),
         "M": Size("videomamba_middle", 576, 32)}
TINY = Size("videomamba_test", 32, 2, img_size=32, heads=2)  # --tiny: every size becomes this one


class JointAttentionBlock(nn.Module):
    """Pre-norm ViT block (DeiT): multi-head self-attention over every token, then a GELU MLP. `attention` picks
    torch's fused SDPA or the written-out softmax(Q K^T / sqrt(d)) V."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads, self.attention = heads, "sdpa"
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.norm1(x_BLD)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            attn_BHLd = F.scaled_dot_product_attention(q, k, v)
        else:
            attn_BHLd = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        x_BLD = x_BLD + self.proj(attn_BHLd.transpose(1, 2).reshape(B, L, D))
        return x_BLD + self.mlp(self.norm2(x_BLD))


class TimeSformerJoint(nn.Module):
    """TimeSformer with joint space-time attention: per-frame 16x16 patches + spatial and temporal position
    embeddings, CLS first, DeiT blocks over all 1 + T*P tokens, a linear head on the CLS token."""

    def __init__(self, num_frames: int, img_size: int, embed_dim: int, depth: int, heads: int,
                 num_classes: int = 400, patch_size: int = 16) -> None:
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv3d(3, embed_dim, (1, patch_size, patch_size), (1, patch_size, patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.blocks = nn.ModuleList(JointAttentionBlock(embed_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def set_attention(self, impl: str) -> None:
        for block in self.blocks:
            block.attention = impl

    def forward(self, video_BCTHW: Tensor) -> Tensor:
        x_BTPD = self.patch_embed(video_BCTHW).flatten(3).permute(0, 2, 3, 1)
        x_BTPD = x_BTPD + self.pos_embed[:, None, 1:] + self.time_embed[:, :, None]
        cls_BLD = (self.cls_token + self.pos_embed[:, :1]).expand(x_BTPD.shape[0], -1, -1)
        x_BLD = torch.cat([cls_BLD, x_BTPD.flatten(1, 2)], dim=1)
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self.head(self.norm(x_BLD[:, 0]))


@dataclass
class Runner:
    """One model in one (mode, frames) configuration: its inputs, optimizer and batch, and its timings."""

    key: str
    model: nn.Module
    train: bool
    frames: int
    img_size: int
    device: torch.device
    batch: int
    attention: str | None = None  # TimeSformer's attention for this runner
    did_not_fit: list[int] = field(default_factory=list)
    error: str | None = None
    times_ms: list[list[float]] = field(default_factory=list)  # one list a round
    gib_per_clip: float | None = None

    def __post_init__(self) -> None:
        self.optimizer = (torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
                          if self.train else None)
        self.video = self.labels = None

    def make_inputs(self) -> None:
        self.video, self.labels = _clips(self.batch, self.frames, self.img_size, self.device)

    def step(self) -> None:
        if self.attention is not None:
            self.model.set_attention(self.attention)
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")
        if self.optimizer is None:
            with torch.inference_mode(), autocast:
                self.model(self.video)
            return
        with autocast:
            loss = F.cross_entropy(self.model(self.video).float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self) -> None:
        """Two calls at the batch, halving it on out-of-memory; other errors are kept in `error`."""
        while self.batch >= 1:
            try:
                self.make_inputs()
                self.step()
                self.step()
                _sync(self.device)
                return
            except torch.OutOfMemoryError:
                self.did_not_fit.append(self.batch)
                self.batch //= 2
                self.video = self.labels = None
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                _free(self.device)
            except Exception as err:  # noqa: BLE001 - one failing model must not stop the others' rows
                self.error = f"{type(err).__name__}: {str(err)[:300]}"
                return
        self.error = "out of memory at batch 1"

    def time_round(self, round_s: float, max_calls: int) -> None:
        """At least `round_s` seconds (1 to `max_calls` calls) of timed calls; the first round also records
        the peak memory above what was resident before it."""
        measure_memory = not self.times_ms and self.device.type == "cuda"
        if measure_memory:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times: list[float] = []
        start = time.perf_counter()
        try:
            while len(times) < max_calls and (not times or time.perf_counter() - start < round_s):
                times.append(timed_call_ms(self.step, self.device))
        except Exception as err:  # noqa: BLE001 - kept in the row; the other models go on
            self.error = f"{type(err).__name__} while timing: {str(err)[:300]}"
            return
        self.times_ms.append(times)
        if measure_memory:
            self.gib_per_clip = (torch.cuda.max_memory_allocated() - resident) / 2**30 / self.batch

    def release(self) -> None:
        self.video = self.labels = self.optimizer = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn`: between CUDA events on a GPU (host time included), else wall time."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _clips(batch: int, frames: int, img_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random clips (B, 3, T, H, W) and 400-class labels."""
    video = torch.randn(batch, 3, frames, img_size, img_size, device=device)
    return video, torch.randint(0, 400, (batch,), device=device)


def _outputs(model: nn.Module, video: Tensor, labels: Tensor, train: bool,
             before: Callable[[], None] = lambda: None) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits or loss, parameter gradients by name) of one call on `video`, under the benchmark's autocast."""
    before()
    autocast = torch.autocast(video.device.type, torch.bfloat16, enabled=video.is_cuda)
    if not train:
        with torch.inference_mode(), autocast:
            return model(video).float(), {}
    with autocast:
        loss = F.cross_entropy(model(video).float(), labels)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compare(a: Callable[[], tuple[Tensor, dict]], b: Callable[[], tuple[Tensor, dict]]) -> dict[str, object]:
    """Relative differences of a's output (and gradients) against b's."""
    out_a, grads_a = a()
    out_b, grads_b = b()
    result: dict[str, object] = {"out rel diff": rel_err(out_a, out_b)}
    names = [n for n in grads_b if n in grads_a]
    if names:
        flat_a = torch.cat([grads_a[n].flatten().float() for n in names])
        flat_b = torch.cat([grads_b[n].flatten().float() for n in names])
        result["grad rel diff"] = rel_err(flat_a, flat_b)
        worst = max(names, key=lambda n: rel_err(grads_a[n], grads_b[n]) if grads_b[n].norm() > 0 else 0.0)
        result["worst grad"] = f"{worst} {rel_err(grads_a[worst], grads_b[worst]):.2e}"
        if set(grads_a) != set(grads_b):
            result["grads only one has"] = sorted(set(grads_a) ^ set(grads_b))[:5]
    return result


def _checked(check: Callable[[], dict], models: list[nn.Module], device: torch.device) -> dict[str, object]:
    """check(), or the error it raised (out of memory included); either way no gradients are left behind."""
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - recorded in the row; the timing goes on
        return {"check error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        for model in models:
            model.zero_grad(set_to_none=True)
        _free(device)


def build_models(size_name: str, size: Size, frames: int, train: bool, batch: int, wanted: list[str],
                 released: ReleasedPath | None, args: argparse.Namespace,
                 device: torch.device) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The configuration's models (TimeSformer's two attentions share one module) and their output checks: ours
    against the released model at the configuration's batch (the shapes the timing compiles kernels for),
    TimeSformer's eager attention against SDPA at --check-batch clips (eager attention's memory grows with L^2)."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {}
    checks: dict[str, dict] = {}
    if "released" in wanted and released is not None:
        models["released"] = released.build_model(size_name, num_frames=frames, num_classes=400,
                                                  img_size=size.img_size, drop_path_rate=0.0).to(device)
    if "ours" in wanted:
        models["ours"] = create_model(size.registry, num_frames=frames, num_classes=400, img_size=size.img_size,
                                      scan_backend=args.backend).to(device)
    if any(k.startswith("timesformer") for k in wanted):
        width, depth, heads = size.timesformer
        models["timesformer"] = TimeSformerJoint(frames, size.img_size, width, depth, heads).to(device)
    for model in models.values():
        model.train(train)
    if "ours" in models and "released" in models:
        ours, theirs = models["ours"], models["released"]
        video, labels = _clips(batch, frames, size.img_size, device)

        def against_released() -> dict[str, object]:
            ours.load_state_dict(theirs.state_dict())
            return compare(lambda: _outputs(ours, video, labels, train), lambda: _outputs(theirs, video, labels, train))

        checks["ours"] = {"checked against": "released", **_checked(against_released, [ours, theirs], device)}
    if "timesformer-sdpa" in wanted and "timesformer-eager" in wanted:
        ts = models["timesformer"]
        video, labels = _clips(min(batch, args.check_batch), frames, size.img_size, device)

        def eager_against_sdpa() -> dict[str, object]:
            return compare(lambda: _outputs(ts, video, labels, train, lambda: ts.set_attention("eager")),
                           lambda: _outputs(ts, video, labels, train, lambda: ts.set_attention("sdpa")))

        checks["timesformer-eager"] = {"checked against": "timesformer-sdpa",
                                       **_checked(eager_against_sdpa, [ts], device)}
    return models, checks


def run_config(mode: str, frames: int, size_name: str, args: argparse.Namespace, released: ReleasedPath | None,
               device: torch.device) -> list[dict]:
    """Rows of one (mode, frames, size): every wanted model built, checked, warmed up and timed in rounds."""
    train = mode == "train"
    size = TINY if args.tiny else SIZES[size_name]
    batch = max(1, (args.train_clip_frames if train else args.infer_clip_frames) // frames)
    wanted = list(args.models)
    models, checks = build_models(size_name, size, frames, train, batch, wanted, released, args, device)
    runners: list[Runner] = []
    rows: dict[str, dict] = {}
    for key in wanted:
        base = {"mode": MODES[mode], "frames": frames, "size": size_name, "model": key}
        module = models.get("timesformer" if key.startswith("timesformer") else key)
        if module is None:
            rows[key] = {**base, "error": "not run: the released code path is unavailable (the JSON's meta says why)"}
            continue
        attention = key.removeprefix("timesformer-") if key.startswith("timesformer") else None
        runners.append(Runner(key, module, train, frames, size.img_size, device, batch, attention))
        rows[key] = {**base, "params M": sum(p.numel() for p in module.parameters()) / 1e6}
    for runner in runners:
        runner.warm_up()
    live = [r for r in runners if r.error is None]
    for i in range(args.rounds):
        for runner in (live if i % 2 == 0 else live[::-1]):
            if runner.error is None:
                runner.time_round(args.round_s, args.max_calls)
    for runner in runners:
        rows[runner.key].update(_summary(runner, args.rounds))
        rows[runner.key].update(checks.get(runner.key, {}))
        runner.release()
    _add_ratios(list(rows.values()))
    del models, runners
    _free(device)
    return [rows[k] for k in wanted]


def _summary(runner: Runner, rounds: int) -> dict[str, object]:
    row: dict[str, object] = {"batch": runner.batch if runner.batch >= 1 else None}
    if runner.did_not_fit:
        row["did not fit (batch)"] = ", ".join(map(str, runner.did_not_fit))
    if runner.error:
        row["error"] = runner.error
        return row
    if rounds == 0:
        return row
    every = [t for rnd in runner.times_ms for t in rnd]
    medians = [statistics.median(rnd) for rnd in runner.times_ms]
    ms = statistics.median(every)
    row.update({"ms": ms, "ms round min": min(medians), "ms round max": max(medians),
                "spread %": (max(medians) - min(medians)) / ms * 100, "calls": len(every),
                "clips/s": runner.batch / ms * 1e3, "GiB/clip": runner.gib_per_clip})
    return row


def _add_ratios(rows: list[dict]) -> None:
    """Each row's clips/s over TimeSformer-SDPA's and over the released model's, same configuration."""
    speed = {r["model"]: r.get("clips/s") for r in rows}
    for r in rows:
        for other, column in (("timesformer-sdpa", "vs timesformer-sdpa"), ("released", "vs released")):
            if r.get("clips/s") and speed.get(other) and r["model"] != other:
                r[column] = r["clips/s"] / speed[other]


def plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(mode, frames, size) in the order they run: ORDER first, then anything else asked for."""
    order = ORDER + [(m, f) for m in ("train", "infer") for f in sorted(args.frames) if (m, f) not in ORDER]
    return [(mode, frames, size) for mode, frames in order if mode in args.modes and frames in args.frames
            for size in SIZE_ORDER[mode] if size in args.sizes]


COLUMNS = ["mode", "frames", "size", "model", "params M", "batch", "ms", "spread %", "clips/s", "GiB/clip",
           "vs timesformer-sdpa", "vs released", "out rel diff", "grad rel diff", "did not fit (batch)", "error"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["Ti", "S", "M"], choices=list(SIZES))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=list(MODES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--released-repo", type=Path, help="a checkout of github.com/OpenGVLab/VideoMamba")
    parser.add_argument("--released-ext", type=Path,
                        help="folder with selective_scan_cuda.so and causal_conv1d_cuda.so "
                             "(scripts/build_released_kernels.py); default: installed modules")
    parser.add_argument("--released-commit", help="the checkout's commit, recorded when it is not a git checkout")
    parser.add_argument("--check-released", action="store_true", help="list what the released path lacks; exit")
    parser.add_argument("--train-clip-frames", type=int, default=256, help="training batch = this / frames")
    parser.add_argument("--infer-clip-frames", type=int, default=512, help="inference batch = this / frames")
    parser.add_argument("--check-batch", type=int, default=2, help="clips of TimeSformer's eager vs SDPA check")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (0: warm-up calls only)")
    parser.add_argument("--round-s", type=float, default=0.5, help="least seconds of a model's calls a round")
    parser.add_argument("--max-calls", type=int, default=8, help="most calls of a model a round")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the configurations left after this")
    parser.add_argument("--backend", default="triton", help="our scan_backend")
    parser.add_argument("--tiny", action="store_true", help="every size as a 2-layer width-32 model at 32 px")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stem", default="model", help="result file name")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.check_released:
        found = problems(args.released_repo, args.released_ext, need_cuda=True)
        print("\n".join(f"- {p}" for p in found) or "the released code path can run here")
        return 1 if found else 0
    released, released_why = None, None
    if "released" in args.models:
        try:
            released = load(args.released_repo, args.released_ext)
            if args.released_commit:
                released.provenance["checkout_commit"] = args.released_commit
        except ReleasedPathError as err:
            released_why = str(err).replace("\n  - ", " | ")
            print(err, file=sys.stderr)
    setup = {"released path": released.provenance if released else released_why,
             "precision": "bf16 autocast, fp32 weights", "img_size": (TINY if args.tiny else SIZES["Ti"]).img_size,
             "batch": f"training {args.train_clip_frames} / frames clips, inference {args.infer_clip_frames} / frames",
             "timesformer": "joint attention, the VideoMamba size's width, half its depth, width / 64 heads",
             "optimizer": "torch AdamW (fused on CUDA)", "timing": f"plain calls between CUDA events; {args.rounds} "
             f"rounds in alternating order, each >= {args.round_s} s (<= {args.max_calls} calls) a model, after "
             "2 warm-up calls", "scan_backend": args.backend}
    notes = ["ms: median over every timed call; spread %: (largest - least round median) / ms. GiB/clip: peak "
             "memory above what weights, inputs and optimizer state hold, per clip. vs X: clips/s over X's, same "
             "configuration. out / grad rel diff: against the model named in the JSON's `checked against`, "
             "same weights: ours against the released model at the row's batch, TimeSformer's eager attention "
             f"against its SDPA at {args.check_batch} clips."]
    rows: list[dict] = []
    start = time.perf_counter()
    for mode, frames, size in plan(args):
        if time.perf_counter() - start > args.budget_s:
            rows += [{"mode": MODES[mode], "frames": frames, "size": size, "model": key,
                      "error": f"skipped: the {args.budget_s:g} s budget was spent"} for key in args.models]
        else:
            rows += run_config(mode, frames, size, args, released, device)
            for row in rows[-len(args.models):]:
                print(row, flush=True)
        write_results(args.stem, rows, COLUMNS, "Whole model: ours vs the released VideoMamba code and TimeSformer",
                      setup=setup, results_dir=args.results_dir, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
