"""Replay a training forward and backward as two CUDA graphs (`model.cuda_graph`, docs/stages.md).

A masked Stage 1 student sees ~20% of the tokens, so each of its kernels is small and the step is bound by the
host: Python, autograd and a few hundred kernel launches a step, not the GPU (docs/performance.md). Captured once
per input shape, the forward and the backward each become one graph launch. What the tasks use:
- `GraphedBackbone`: a VideoMamba's `forward_visible` (Stage 1's student, Stage 2's student, Stage 3's video
  encoder);
- `GraphedModule`: any module returning a tuple of tensors (Stage 4's classifier, through `ClassifierLogits`);
- `GraphedInference`: a frozen module's forward alone, under no_grad (Stage 2's teacher).
`GraphedTrainingStep` is the mechanism under the first two.

`GraphedTrainingStep(module)` wraps a module whose `forward(*inputs)` returns a tuple of tensors, with static
shapes and no host sync. Called with grad enabled on CUDA tensors, it replays the graphs inside one autograd
node; otherwise it runs the module eagerly. The capture follows torch.cuda.make_graphed_callables (warm-up on a
side stream, then both captures in one memory pool), with three differences:
- the graphs run the module on detached aliases of its parameters, so hooks that a trainer puts on the
  parameters (DeepSpeed ZeRO-2's gradient reduction) run after the replay, as in an eager step, not inside the
  capture;
- the parameter gradients are returned as copies. make_graphed_callables returns views of its static buffers,
  which autograd may install as `.grad` itself; the next backward replay then overwrites that `.grad` in place,
  so gradient accumulation over micro-batches would double-count;
- one capture per input shape (and dtype), so a short last batch gets its own graphs rather than an error.

The parameters are read in place on every replay, so optimizer updates and checkpoint loads that copy into them
are seen; rebinding a parameter's storage (`p.data = ...`) after the capture is not, and the parameters that get
gradients are the ones that required grad at the capture. Random ops inside the module (drop path, dropout) draw
fresh numbers on every replay: torch.cuda.graph registers the default CUDA generator, and each replay reads the
generator's seed and offset at launch and advances the offset by what the captured kernels draw, as eager kernels
would. So a replay draws the numbers an eager step from the same generator state draws (the GPU tests compare
drop-path steps that way); only the warm-up passes before a capture consume numbers an eager run does not. The
mask a drop path draws in the forward is saved for the backward as a tensor, so the backward draws nothing
(gradient checkpointing recomputes the mixers only, which draw nothing either).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models import Features

# Eager fwd+bwd passes before a capture, on the capture's side stream: they compile Triton kernels, initialise
# cuBLAS workspaces and settle the caching allocator (torch's make_graphed_callables uses 3).
WARMUP_PASSES = 3
# Each capture holds its own activations; more shapes than this usually means a data pipeline that varies the
# batch shape, which a graph cannot follow cheaply.
MAX_CAPTURES = 4


@dataclass
class _Capture:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    grad_outputs: tuple[Tensor | None, ...]  # None where the output needs no gradient
    params: tuple[nn.Parameter, ...]  # the trainable parameters at capture: the ones that get gradients
    param_grads: tuple[Tensor | None, ...]  # None for parameters that the module does not use
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph


def _on_gpu(inputs: Sequence[Tensor], name: str, required: bool) -> bool:
    """Whether every input is on a GPU; with `required` (model.cuda_graph=true), an error naming the setting if not."""
    on_gpu = all(x.is_cuda for x in inputs)
    if required and not on_gpu:
        raise RuntimeError(f"model.cuda_graph=true: {name}'s inputs are on {inputs[0].device}, and CUDA graphs need "
                           "a GPU; set model.cuda_graph=auto or false for CPU runs")
    return on_gpu


def _capture_key(captures: dict, inputs: Sequence[Tensor], name: str, what: str) -> tuple:
    """The captures' key of these inputs (shapes, dtypes, devices); announces a new capture, refusing too many."""
    key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
    if key in captures:
        return key
    if len(captures) >= MAX_CAPTURES:
        raise RuntimeError(f"model.cuda_graph: {name} was called with {len(captures) + 1} different input shapes "
                           f"(now {[k[0] for k in key]}); each needs its own graphs and memory. Keep the batch "
                           "shape fixed (drop the last partial batch) or set model.cuda_graph=false")
    print(f"model.cuda_graph: capturing {name}'s {what} for inputs {[tuple(x.shape) for x in inputs]}", flush=True)
    return key


def _warm_up(run: Callable[[], object]) -> torch.cuda.Stream:
    """`WARMUP_PASSES` calls of `run` on a new side stream (the stream the capture then uses), finished on return."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_PASSES):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return side


class GraphedTrainingStep:
    """module(*inputs) replayed from CUDA graphs when training on a GPU; see the module docstring."""

    def __init__(self, module: nn.Module, name: str = "model", required: bool = False) -> None:
        """`required`: on CPU inputs raise (model.cuda_graph=true) rather than run eagerly (auto)."""
        self.module, self.name, self.required = module, name, required
        self._captures: dict[tuple, _Capture] = {}

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        on_gpu = _on_gpu(inputs, self.name, self.required)
        if not torch.is_grad_enabled() or not on_gpu:
            return tuple(self.module(*inputs))  # evaluation, or a CPU run: eager
        if any(x.requires_grad for x in inputs):
            raise ValueError(f"model.cuda_graph: {self.name}'s graphed inputs must not require grad (only its "
                             "parameters get gradients)")
        key = _capture_key(self._captures, inputs, self.name, "forward and backward")
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = self._capture(inputs)
        return _Replay.apply(capture, len(inputs), *inputs, *capture.params)

    @property
    def num_captures(self) -> int:
        return len(self._captures)

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Capture:
        # The graphs run the module on detached aliases of its parameters: the same storage (so they see every
        # in-place update), but none of the hooks that a trainer such as DeepSpeed ZeRO-2 puts on the parameters
        # themselves, which would otherwise fire inside the capture. The replay hands the gradients to the
        # real parameters, where those hooks run as in an eager step.
        named = dict(self.module.named_parameters())
        trainable = [n for n, p in named.items() if p.requires_grad]
        aliases = {n: p.detach().requires_grad_(p.requires_grad) for n, p in named.items()}
        alias_params = tuple(aliases[n] for n in trainable)

        def run(*args: Tensor) -> tuple[Tensor, ...]:
            return tuple(torch.func.functional_call(self.module, aliases, args))

        static_inputs = tuple(x.detach().clone() for x in inputs)
        side = _warm_up(lambda: self._backward(run(*static_inputs), alias_params, zeros=True))

        pool = torch.cuda.graph_pool_handle()
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=pool, stream=side):
            outputs = run(*static_inputs)
        grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in outputs)
        with torch.cuda.graph(backward, pool=pool, stream=side):
            param_grads = self._backward(outputs, alias_params, grad_outputs=grad_outputs)
        return _Capture(static_inputs, outputs, grad_outputs, tuple(named[n] for n in trainable), param_grads,
                        forward, backward)

    @staticmethod
    def _backward(outputs: Sequence[Tensor], params: tuple[Tensor, ...], zeros: bool = False,
                  grad_outputs: Sequence[Tensor | None] = ()) -> tuple[Tensor | None, ...]:
        needs = [i for i, o in enumerate(outputs) if o.requires_grad]
        if not needs:
            raise RuntimeError("model.cuda_graph: no output of the graphed module requires grad")
        grads = [torch.zeros_like(outputs[i]) for i in needs] if zeros else [grad_outputs[i] for i in needs]
        return torch.autograd.grad([outputs[i] for i in needs], params, grads, allow_unused=True)


class _Replay(torch.autograd.Function):
    """One autograd node: the forward graph's replay, whose backward is the backward graph's."""

    @staticmethod
    def forward(ctx, capture: _Capture, num_inputs: int, *inputs_and_params: Tensor) -> tuple[Tensor, ...]:
        for static, x in zip(capture.inputs, inputs_and_params[:num_inputs], strict=True):
            static.copy_(x)
        capture.forward.replay()
        ctx.capture, ctx.num_inputs = capture, num_inputs
        outputs = tuple(o.detach() for o in capture.outputs)
        ctx.mark_non_differentiable(*(o for o, g in zip(outputs, capture.grad_outputs, strict=True) if g is None))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        capture: _Capture = ctx.capture
        for static, grad in zip(capture.grad_outputs, grads, strict=True):
            if static is not None:
                static.copy_(grad)
        capture.backward.replay()
        # Copies, so that no parameter's .grad aliases a buffer the next replay overwrites.
        param_grads = tuple(None if g is None else g.clone() for g in capture.param_grads)
        return (None, None, *([None] * ctx.num_inputs), *param_grads)


class GraphedModule:
    """`module(*inputs)` (a tuple of tensors) replayed from CUDA graphs (GraphedTrainingStep) while a task trains on
    a GPU and `enabled`, run eagerly otherwise. A plain object, not a module: it holds no weights of its own, so the
    task's state dict is unchanged."""

    def __init__(self, module: nn.Module, name: str, enabled: bool, required: bool = False) -> None:
        self.module, self.enabled = module, enabled
        self._step = GraphedTrainingStep(module, name, required=required)

    def __call__(self, *inputs: Tensor, training: bool) -> tuple[Tensor, ...]:
        if not (self.enabled and training):
            return tuple(self.module(*inputs))
        return self._step(*inputs)

    @property
    def num_captures(self) -> int:
        return self._step.num_captures


class ClassifierLogits(nn.Module):
    """A classifier's `forward(video) -> logits` as the one-tensor tuple a graph captures."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, video_BCTHW: Tensor) -> tuple[Tensor]:
        return (self.model(video_BCTHW),)


@dataclass
class _InferenceCapture:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    graph: torch.cuda.CUDAGraph
    single: bool  # the module returns one tensor, not a tuple


class GraphedInference:
    """A frozen module's forward, `module(*inputs) -> tensor or tuple of tensors`, replayed from one CUDA graph per
    input shape while `enabled` and the task trains on a GPU; eager otherwise. Runs under no_grad: nothing of it
    is trained. Simpler than GraphedTrainingStep: no backward, no parameter aliases (a frozen module has no
    gradient hooks). The outputs are copies: the next replay overwrites the graph's own."""

    def __init__(self, module: nn.Module, name: str, enabled: bool, required: bool = False) -> None:
        self.module, self.name, self.enabled, self.required = module, name, enabled, required
        self._captures: dict[tuple, _InferenceCapture] = {}

    @torch.no_grad()
    def __call__(self, *inputs: Tensor, training: bool) -> Tensor | tuple[Tensor, ...]:
        if not (self.enabled and training and _on_gpu(inputs, self.name, self.required)):
            return self.module(*inputs)
        key = _capture_key(self._captures, inputs, self.name, "forward")
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = self._capture(inputs)
        for static, x in zip(capture.inputs, inputs, strict=True):
            static.copy_(x)
        capture.graph.replay()
        outputs = tuple(o.clone() for o in capture.outputs)
        return outputs[0] if capture.single else outputs

    @property
    def num_captures(self) -> int:
        return len(self._captures)

    def _capture(self, inputs: tuple[Tensor, ...]) -> _InferenceCapture:
        static_inputs = tuple(x.detach().clone() for x in inputs)
        side = _warm_up(lambda: self.module(*static_inputs))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outputs = self.module(*static_inputs)
        single = not isinstance(outputs, tuple)
        return _InferenceCapture(static_inputs, (outputs,) if single else outputs, graph, single)


class BackboneOutputs(nn.Module):
    """A VideoMamba's tokens and residual taps on the visible tokens, as the tuple of tensors a graph captures."""

    def __init__(self, backbone: nn.Module, residual_indices: Sequence[int]) -> None:
        super().__init__()
        self.backbone, self.residual_indices = backbone, list(residual_indices)

    def forward(self, video_BCTHW: Tensor, index_BK: Tensor | None = None) -> tuple[Tensor, ...]:
        features = self.backbone.forward_visible(video_BCTHW, index_BK, self.residual_indices)
        return (features.tokens_BLD, *(features.residuals[i] for i in self.residual_indices))


class GraphedBackbone:
    """`backbone.forward_visible(video, index_BK, residual_indices)` of a task's trainable VideoMamba: replayed from
    CUDA graphs (GraphedTrainingStep) while the task trains on a GPU and `enabled`, run eagerly otherwise. A plain
    object, not a module: it holds no weights of its own, so the task's state dict is unchanged."""

    def __init__(self, backbone: nn.Module, residual_indices: Sequence[int], name: str, enabled: bool,
                 required: bool = False) -> None:
        self.backbone, self.residual_indices, self.enabled = backbone, list(residual_indices), enabled
        self._run = GraphedModule(BackboneOutputs(backbone, residual_indices), name, enabled, required=required)

    def __call__(self, video_BCTHW: Tensor, index_BK: Tensor | None, training: bool) -> Features:
        inputs = (video_BCTHW,) if index_BK is None else (video_BCTHW, index_BK)
        tokens_BLD, *residuals = self._run(*inputs, training=training)
        return Features(tokens_BLD, dict(zip(self.residual_indices, residuals, strict=True)))

    @property
    def num_captures(self) -> int:
        return self._run.num_captures
