"""An exponential moving average of a model's trainable weights (the released fine-tuning's optional `--model_ema`).

After every optimizer step: avg <- decay * avg + (1 - decay) * weight. The averages are fp32 buffers of this module
(DeepSpeed casts parameters, not buffers, to bf16), so they live on the training device, go into every checkpoint
with the rest of the task and come back on resume. `run(model, *inputs)` is the model's forward with the averages
in place of its weights (cast to the weights' dtype), without touching the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _buffer_name(parameter_name: str) -> str:
    return parameter_name.replace(".", "__")  # buffer names cannot hold dots


class ParameterEMA(nn.Module):
    """fp32 moving averages of `model`'s trainable parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.register_buffer(_buffer_name(name), param.detach().float().clone())

    def averages(self) -> dict[str, Tensor]:
        """{parameter name: its fp32 average}."""
        return {name: getattr(self, _buffer_name(name)) for name in self.names}

    def averages_in(self, task_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """{parameter name: its average} read from a saved state dict that holds this module under `prefix`."""
        missing = [prefix + _buffer_name(n) for n in self.names if prefix + _buffer_name(n) not in task_state]
        if missing:
            raise ValueError(f"the saved task state has no EMA averages (e.g. {missing[:2]}); was it saved by a run "
                             "with task.ema_decay set?")
        return {name: task_state[prefix + _buffer_name(name)] for name in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        averages = self.averages()
        # avg + (1 - decay) * (weight - avg) = decay * avg + (1 - decay) * weight, fused over all tensors
        torch._foreach_lerp_(list(averages.values()), [params[n].detach().float() for n in averages], 1.0 - self.decay)

    def run(self, model: nn.Module, *inputs: Tensor) -> Tensor:
        """`model(*inputs)` computed with the averaged weights."""
        params = dict(model.named_parameters())
        weights = {name: avg.to(params[name].dtype) for name, avg in self.averages().items()}
        return torch.func.functional_call(model, weights, inputs)
