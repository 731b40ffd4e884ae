"""CUDA-graph replay of the training step (pipeline/cuda_graph.py, `model.cuda_graph`).

The replay tests need a GPU (marker `gpu`); the config checks and the CPU refusal run everywhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

import pytest
import torch

from pipeline import cuda_graph
from pipeline.config import ConfigError, load_config
from pipeline.cuda_graph import GraphedInference, GraphedTrainingStep
from pipeline.tasks import build_task
from tests.unit.test_masked_alignment import clip, tiny_cfg
from tests.unit.test_self_distill import write_teacher_export

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VTC_CONFIG = "configs/stages/pretrain_vtc_test.yaml"
VTC_TEACHER = "task.teacher.vision_overrides={layers: 1, width: 64, head_width: 32}"
DISTILL_CONFIG = "configs/stages/self_distill_test.yaml"
FINETUNE_CONFIG = "configs/stages/finetune_test.yaml"


def distill_cfg(teacher_path, *overrides: str):
    """The tiny Stage 2 task: videomamba_test (width 32) teaches videomamba_test_wide (48)."""
    return load_config(DISTILL_CONFIG, [f"task.teacher_checkpoint={teacher_path}", "task.teacher_model=null",
                                        *overrides])


def finetune_cfg(*overrides: str):
    """The tiny Stage 4 task: videomamba_test, 4 classes, Mixup / CutMix, drop path 0.1."""
    return load_config(FINETUNE_CONFIG, ["task.class_index=null", *overrides])


def tube_keep(batch: int, seed: int) -> torch.Tensor:
    """A data-side tube mask of the tiny model's 4 frames x 4 patches at ratio 0.5: the same 2 patches per frame."""
    frame = torch.zeros(4, dtype=torch.bool)
    frame[torch.randperm(4, generator=torch.Generator().manual_seed(seed))[:2]] = True
    return frame.repeat(4).expand(batch, -1).clone()


@pytest.mark.parametrize("overrides,match", [
    (["task.name=toy"], "task 'toy' runs eagerly"),
    (["task.name=masked_alignment", "deepspeed.zero_stage=3"], "zero_stage"),
    (["task.name=masked_alignment", "scaling.use_gpu=false"], "CUDA graphs need a GPU"),
])
def test_config_refuses_cuda_graph_where_it_cannot_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.cuda_graph=true", *overrides])


def test_auto_uses_graphs_only_where_they_work():
    assert tiny_cfg().cuda_graph_wanted()  # the default, auto, for Stage 1
    assert not tiny_cfg("model.cuda_graph=false").cuda_graph_wanted()
    assert tiny_cfg("model.use_checkpoint=true").cuda_graph_wanted()
    assert not tiny_cfg("deepspeed.zero_stage=3").cuda_graph_wanted()
    assert not load_config(None, ["task.name=toy"]).cuda_graph_wanted()
    assert load_config(VTC_CONFIG).cuda_graph_wanted()
    # Stage 2 and 4's graphed steps have not run on a GPU yet: auto keeps them eager, true opts in.
    assert not finetune_cfg().cuda_graph_wanted() and not distill_cfg("teacher.pt").cuda_graph_wanted()
    assert finetune_cfg("model.cuda_graph=true").cuda_graph_wanted()


def test_graphed_task_runs_eagerly_on_cpu_unless_graphs_are_demanded():
    batch = {"video": clip()}
    for setting in ("auto", "true"):
        tasks = []
        for graphs in (setting, "false"):  # the same init and the same mask draws
            torch.manual_seed(0)
            tasks.append(build_task(tiny_cfg(f"model.cuda_graph={graphs}")))
        task, eager = tasks
        assert task._student_runner.enabled and not eager._student_runner.enabled
        task.eval(), eager.eval()
        with torch.no_grad():  # evaluation runs eagerly either way
            torch.testing.assert_close(task(batch)["loss"], eager(batch)["loss"], rtol=0, atol=0)
        task.train(), eager.train()
        if setting == "auto":  # a CPU run: the same eager step
            torch.testing.assert_close(task(batch)["loss"], eager(batch)["loss"], rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="graphs need a GPU; set model.cuda_graph=auto or false"):
                task(batch)


@pytest.mark.parametrize("stage", ["self_distill", "classification"])
def test_stage_2_and_4_run_eagerly_unless_graphs_are_demanded(tmp_path, stage):
    write_teacher_export(tmp_path / "teacher.pt")
    batch = {"video": clip(), "label": torch.tensor([0, 3]), "keep": tube_keep(2, seed=0)}

    def task_for(graphs: str):
        torch.manual_seed(0)  # the same init, and the same drop-path draws below
        if stage == "self_distill":
            return build_task(distill_cfg(tmp_path / "teacher.pt", "model.scan_backend=ref", "data.mask.type=tube",
                                          "data.mask.ratio=0.5", f"model.cuda_graph={graphs}"))
        return build_task(finetune_cfg(f"model.cuda_graph={graphs}"))

    eager = task_for("false").train()
    runners = ("_student_runner", "_teacher_runner") if stage == "self_distill" else ("_model_runner",)
    assert not any(getattr(eager, runner).enabled for runner in runners)
    torch.manual_seed(1)
    expected = eager(batch)["loss"]
    for setting in ("auto", "true"):
        task = task_for(setting).train()
        # Stage 2's and 4's graphs are opt-in until checked on a GPU (TaskSpec.cuda_graph_auto=False): auto stays eager
        assert all(getattr(task, runner).enabled == (setting == "true") for runner in runners)
        torch.manual_seed(1)
        if setting == "auto":  # a CPU run: the same eager step, bit for bit
            torch.testing.assert_close(task(batch)["loss"], expected, rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="graphs need a GPU; set model.cuda_graph=auto or false"):
                task(batch)
        with torch.no_grad():  # evaluation runs eagerly either way
            task.eval()
            task(batch)


# ----------------------------------------------------------------------------- on a GPU


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
        self.unused = torch.nn.Linear(2, 2)  # gets no gradient: the replay must hand back None for it

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.a(x)) * scale[:, None]
        return self.b(hidden), hidden


@pytest.mark.gpu
@needs_cuda
def test_replay_matches_eager_and_accumulates_over_micro_batches():
    torch.manual_seed(0)
    model = _TwoLayers().cuda()
    step = GraphedTrainingStep(model, "a test model")
    batches = [(torch.randn(4, 16, device="cuda"), torch.rand(4, device="cuda")) for _ in range(3)]

    def loss(outputs):
        return outputs[0].square().mean() + outputs[1].mean()

    hook_calls = []  # a trainer's hook on a parameter (DeepSpeed ZeRO-2 reduces gradients in one)
    hook = model.a.weight.register_hook(lambda grad: hook_calls.append(grad.shape))
    for p in model.parameters():
        p.grad = None
    for x, s in batches[:2]:  # two micro-batches: the second backward replay must not touch the first's grads
        loss(step(x, s)).backward()
    assert len(hook_calls) == 2  # once a backward, as eagerly; never inside the warm-up or the capture
    hook.remove()
    graphed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    for x, s in batches[:2]:
        loss(model(x, s)).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(graphed) == set(eager) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)

    with torch.no_grad():  # an optimizer step writes the weights in place; the graphs read them on replay
        model.a.weight.mul_(0.5)
    x, s = batches[2]
    torch.testing.assert_close(step(x, s)[0], model(x, s)[0], rtol=1e-5, atol=1e-6)
    assert step.num_captures == 1

    step(torch.randn(2, 16, device="cuda"), torch.rand(2, device="cuda"))  # a short last batch: its own capture
    assert step.num_captures == 2
    with pytest.raises(RuntimeError, match="different input shapes"):
        for rows in range(3, 3 + cuda_graph.MAX_CAPTURES):
            step(torch.randn(rows, 16, device="cuda"), torch.rand(rows, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_replay_draws_fresh_random_numbers():
    class Dropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(64, device="cuda"))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.nn.functional.dropout(x * self.weight, 0.5),)

    step = GraphedTrainingStep(Dropout(), "dropout")
    x = torch.ones(64, device="cuda")
    first, second = step(x)[0].clone(), step(x)[0].clone()
    assert not torch.equal(first, second)
    assert set(first.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.gpu
@needs_cuda
def test_inference_replay_matches_eager_and_returns_copies():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).cuda().eval()
    graphed = GraphedInference(model, "a frozen model", enabled=True)
    x, y = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    first = graphed(x, training=True)
    second = graphed(y, training=True)  # the same capture, another input: must not change `first`
    assert graphed.num_captures == 1
    with torch.no_grad():
        torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second, model(y), rtol=1e-5, atol=1e-6)
        model[0].weight.mul_(0.5)  # weights read in place on replay
        torch.testing.assert_close(graphed(x, training=True), model(x), rtol=1e-5, atol=1e-6)
    assert not first.requires_grad and graphed(x, training=False).data_ptr() != first.data_ptr()
    graphed(torch.randn(2, 16, device="cuda"), training=True)
    assert graphed.num_captures == 2


def _assert_graphed_matches_eager(run) -> None:
    """`run(graph) -> (losses, tensors)` graphed and eager: the same losses and final tensors (the replay runs the
    same kernels on the same weights)."""
    eager_losses, eager_tensors = run(graph=False)
    graphed_losses, graphed_tensors = run(graph=True)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-4)
    for name, value in eager_tensors.items():
        torch.testing.assert_close(graphed_tensors[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _prime(runner_calls) -> None:
    """Trigger the captures before the compared steps: their warm-up passes draw random numbers that an eager run
    does not, so both runs then start each step from the same seeded generator state."""
    for call in runner_calls:
        outputs = call()
        if outputs.requires_grad:
            outputs.float().square().mean().backward()


def _adamw_steps(task, batches, prime=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Three AdamW steps, each from a seeded CUDA generator (drop path draws from it, graphed or not)."""
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    if prime is not None:
        _prime(prime)
    losses = []
    for i, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(100 + i)
        loss = task(batch)["loss"]
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()
        losses.append(float(loss.detach()))
    return losses, {n: t.detach().clone() for n, t in task.state_dict().items()}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mask,drop_path", [("tube", 0.0), ("none", 0.0), ("tube", 0.2)])
def test_graphed_self_distill_steps_match_eager(tmp_path, mask, drop_path):
    """Three AdamW steps of the tiny Stage 2 task on the Triton kernels: the student's forward and backward and the
    teacher's forward graphed, against eager, from the same init; with drop path, from the same generator state."""
    write_teacher_export(tmp_path / "teacher.pt")
    batches = [{"video": clip(seed=i, batch=4).cuda(), "keep": tube_keep(4, seed=i).cuda()} for i in range(3)]

    def run(graph: bool):
        torch.manual_seed(0)
        cfg = distill_cfg(tmp_path / "teacher.pt", "model.scan_backend=triton", f"data.mask.type={mask}",
                          "data.mask.ratio=0.5", f"model.drop_path_rate={drop_path}",
                          "task.teacher_model_kwargs={scan_backend: triton}", f"model.cuda_graph={str(graph).lower()}")
        task = build_task(cfg).cuda().train()
        video, keep = batches[0]["video"], batches[0]["keep"]
        index = task.masks.visible_index(keep if mask == "tube" else None, task.student)
        prime = [lambda: task._student_runner(video, index, True).tokens_BLD,
                 lambda: task._teacher_runner(video, training=True)] if graph else None
        result = _adamw_steps(task, batches, prime)
        assert (task._student_runner.num_captures, task._teacher_runner.num_captures) == ((1, 1) if graph else (0, 0))
        return result

    _assert_graphed_matches_eager(run)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("drop_path,ema", [(0.0, "null"), (0.1, "0.9")])
def test_graphed_classification_steps_match_eager(drop_path, ema):
    """Three AdamW steps of the tiny Stage 4 task (Mixup / CutMix on the input, label smoothing, the weight EMA): the
    classifier's forward and backward graphed on the mixed clip, against eager; drop path from the same seeded
    generator state in both."""
    batches = [{"video": clip(seed=i, batch=4).cuda(), "label": torch.tensor([0, 1, 2, 3]).roll(i).cuda()}
               for i in range(3)]

    def run(graph: bool):
        torch.manual_seed(0)
        cfg = finetune_cfg("model.scan_backend=triton", f"model.drop_path_rate={drop_path}", f"task.ema_decay={ema}",
                           f"model.cuda_graph={str(graph).lower()}")
        task = build_task(cfg).cuda().train()
        prime = [lambda: task._model_runner(batches[0]["video"], training=True)[0]] if graph else None
        result = _adamw_steps(task, batches, prime)
        assert task._model_runner.num_captures == int(graph)
        return result

    _assert_graphed_matches_eager(run)  # the weights and, with the EMA, its averages


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mask,checkpointing", [("attention", False), ("none", False), ("attention", True)])
def test_graphed_stage1_steps_match_eager(mask, checkpointing):
    """Three AdamW steps of the tiny Stage 1 task on the Triton kernels, graphed and eager, from the same init; also
    with gradient checkpointing, whose recomputation the backward graph then holds."""
    def run(graph: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        cfg = tiny_cfg("model.scan_backend=triton", f"data.mask.type={mask}", f"model.cuda_graph={str(graph).lower()}",
                       f"model.use_checkpoint={str(checkpointing).lower()}", "model.checkpoint_num=2")
        task = build_task(cfg).cuda().train()
        params = [p for p in task.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for i in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = task({"video": clip(seed=i, batch=4).cuda()})["loss"]
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses, {n: p.detach().clone() for n, p in task.named_parameters()}

    _assert_graphed_matches_eager(run)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mask", ["attention", "none"])
def test_graphed_video_text_steps_match_eager(mask):
    """Three AdamW steps of the tiny Stage 3 task (contrastive + matching losses, and UTA with attention masks):
    the video encoder graphed and eager, from the same init."""
    texts = ["a red circle moves left", "two blue squares move up", "a green triangle moves right",
             "a white square moves down"]

    def run(graph: bool) -> list[float]:
        torch.manual_seed(0)
        overrides = ["model.scan_backend=triton", f"model.cuda_graph={str(graph).lower()}", f"data.mask.type={mask}"]
        if mask == "attention":
            overrides += ["task.uta_weight=1.0", "task.teacher.pretrained=null", VTC_TEACHER]
        task = build_task(load_config(VTC_CONFIG, overrides)).cuda().train()
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for i in range(3):
            optimizer.zero_grad(set_to_none=True)
            batch = {"video": clip(seed=i, batch=4).cuda(), "text": texts, "index": torch.arange(4)}
            loss = task(batch)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert task._video_runner.enabled == graph
        return losses

    assert run(graph=True) == pytest.approx(run(graph=False), rel=1e-4)


def _deepspeed_run(graph: bool, zero_stage: int, world: int, rank: int) -> tuple[list[float], list[float]]:
    """Six micro-batches (three steps of two) of the tiny Stage 1 task under the engine's DeepSpeed setup (bf16),
    on this process's GPU: (losses, global gradient norms)."""
    import deepspeed

    from pipeline.engine import deepspeed_config
    from pipeline.optim import build_optimizer, peak_lr

    torch.manual_seed(0)
    cfg = tiny_cfg("model.scan_backend=triton", f"model.cuda_graph={str(graph).lower()}", "data.batch_size=4",
                   f"deepspeed.zero_stage={zero_stage}", "deepspeed.grad_accum_steps=2")
    task = build_task(cfg).cuda()
    optimizer, scheduler = build_optimizer(task, cfg.optim, peak_lr(cfg.optim, 8 * world))
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world, on_gpu=True))
    losses, norms = [], []
    for i in range(6):
        loss = engine({"video": clip(seed=10 * rank + i, batch=4).cuda().bfloat16()})["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if i % 2:
            norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_graphed_stage1_under_deepspeed_matches_eager(zero_stage):
    """The engine's DeepSpeed setup (bf16, ZeRO 1 or 2, 2 micro-batches a step) over the tiny Stage 1 task, graphed
    and eager: the same losses and gradient norms. Adam's update barely depends on the gradients' scale, so the
    norms are what would show a gradient counted twice across the micro-batches."""
    from pipeline.distributed import ensure_process_group

    ensure_process_group("nccl")
    eager_losses, eager_norms = _deepspeed_run(False, zero_stage, world=1, rank=0)
    graphed_losses, graphed_norms = _deepspeed_run(True, zero_stage, world=1, rank=0)
    assert graphed_losses == pytest.approx(eager_losses, rel=2e-3)
    assert graphed_norms == pytest.approx(eager_norms, rel=2e-3)


def _nccl_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import json

    from pipeline.distributed import ensure_process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.cuda.set_device(rank)
    ensure_process_group("nccl")
    results = {f"{zero}-{graph}": _deepspeed_run(graph, zero, world, rank)
               for zero in (1, 2) for graph in (False, True)}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs (NCCL)")
@pytest.mark.timeout(400)
def test_graphed_stage1_on_nccl_ranks_matches_eager(tmp_path):
    """The same on every GPU of the host: each rank captures its own graphs while NCCL's watchdog runs, and
    ZeRO's reductions follow each backward replay."""
    import json

    from tests._spawn import free_port, run_spawned

    world = torch.cuda.device_count()
    run_spawned(_nccl_rank, (world, free_port(), str(tmp_path)), nprocs=world, deadline_s=350)
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for zero in (1, 2):
            eager, graphed = results[f"{zero}-False"], results[f"{zero}-True"]
            assert graphed[0] == pytest.approx(eager[0], rel=2e-3), (rank, zero)
            assert graphed[1] == pytest.approx(eager[1], rel=2e-3), (rank, zero)
