"""The scan forward's sm_90 machine code, compiled on the CPU (benchmarks/kernel_sass.py): the math helpers'
instruction savings as counts that do not depend on timing (docs/kernels.md, "Math helpers").

A tile is 8 steps x 16 states x 16 channels on one warp: 64 elements a lane, and each lane owns 4 of the
tile's 128 (step, channel) pairs. Without triton_math's helpers the loop compiles to 1201 instructions on Triton
3.6 (the GPU image's) and 736 on Triton 3.8 (this suite's); with them to 647 and 642.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
_spec = importlib.util.spec_from_file_location(
    "kernel_sass", Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_sass.py")
kernel_sass = sys.modules["kernel_sass"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(kernel_sass)


@pytest.fixture(scope="module")
def forward():
    return kernel_sass.compile_sass(kernel_sass.variants()["fwd"])


def test_forward_tile_evaluates_each_exponential_once(forward):
    mix = forward.loop_mix
    # One ex2 a decay (64), softplus and the gate's sigmoid once a (step, channel) pair (4 each), softplus' log
    # and the sigmoid's division on the hardware units (without triton_math: libdevice's ~22-instruction logf,
    # and on Triton 3.6 softplus in two layouts, 12 times a lane).
    assert mix["MUFU.EX2"] == 64 + 4 + 4
    assert mix["MUFU.LG2"] == 4
    assert mix["MUFU.RCP"] == 4


def test_forward_tile_does_not_unpack_broadcast_b_and_c(forward):
    # bf16 -> fp32 unpacking (shifts and byte permutes): ~250 a tile on Triton 3.6 when every lane unpacked
    # the 128 B/C values it gathered (before triton_math.upcast); upcast keeps it to the lane's own u, delta and z
    # and the packed output, whatever the Triton version's layout heuristics.
    unpack = forward.loop_mix["PRMT"] + forward.loop_mix["SHF.L.U32"] + forward.loop_mix["IMAD.U32"]
    assert unpack <= 64, forward.loop_mix


def test_forward_tile_fits_its_instruction_budget(forward):
    # Without triton_math: 1201 (Triton 3.6) / 736 (3.8); with it 647 / 642. The arithmetic floor is ~320 (5 an
    # element).
    # No spills under the 224-register cap.
    assert 0 < forward.loop_instructions <= 700, forward.loop_instructions
    assert forward.spill_bytes == 0
