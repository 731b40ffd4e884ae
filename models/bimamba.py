"""The bidirectional Mamba mixer of the released VideoMamba ("bimamba v2").

Shared in_proj / out_proj; separate conv1d, x_proj, dt_proj, A_log, D per direction (the backward ones end in
`_b`); the backward branch runs on the reversed sequence; the two gated outputs are summed (no /2) before
out_proj. Parameter names and shapes are the official ones, so released checkpoints load as they are.

Legend: B batch, L tokens, D model width, E inner width (expand * D), N state size, R dt rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.ops import BACKENDS, DirectionWeights, bimamba_inner


class BiMamba(nn.Module):
    """x_BLD -> y_BLD. Attribute order matches the official module so state_dict keys come out in its order."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {', '.join(BACKENDS)}; got {scan_backend!r}")
        self.scan_backend = scan_backend
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = E = expand * d_model
        self.dt_rank = R = math.ceil(d_model / 16)

        # S4D-real init: A = -[1..N] for every channel; D = 1 (skip). Both directions alike.
        A_log_EN = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1)
        self.A_log = nn.Parameter(A_log_EN.clone())
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(A_log_EN.clone())
        self.D_b = nn.Parameter(torch.ones(E))

        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(R, E)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            self._init_dt(dt_proj, dt_min, dt_max, dt_init_floor)

    @staticmethod
    def _init_dt(dt_proj: nn.Linear, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Mamba's dt init: weight U(+-R^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        std = dt_proj.in_features ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        E = dt_proj.out_features
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # read by the GPT-2 style init in videomamba.py

    def _direction(self, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor,
                   D: Tensor) -> DirectionWeights:
        return DirectionWeights(conv.weight.squeeze(1), conv.bias, x_proj.weight, dt_proj.weight,
                                dt_proj.bias, A_log, D)

    def forward(self, x_BLD: Tensor) -> Tensor:
        xz_BLF = self.in_proj(x_BLD)
        x_BEL, z_BEL = xz_BLF.transpose(1, 2).chunk(2, dim=1)
        fwd = self._direction(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        bwd = self._direction(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y_BEL = bimamba_inner(x_BEL, z_BEL, fwd, bwd, backend=self.scan_backend)
        return self.out_proj(y_BEL.transpose(1, 2))
