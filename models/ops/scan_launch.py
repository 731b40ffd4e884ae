"""Launch shapes of the Triton selective scan (models/ops/triton_scan.py): `ScanConfig`, and `default_config`,
which picks one per d_state, row count, layout, sequence length and SM count.

The choices are a small model of the GPU (programs resident an SM at the kernels' register counts, waves of
programs, the cost of the summary pass that splitting L adds) whose constants were fitted to the launch sweeps
in the launch sweeps of 2026-11-26 on an H200 and an H100 (benchmarks/results/history/, docs/kernels.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class ScanConfig:
    """Launch shape: channels and warps a program (forward, backward); `chunk`, the steps between the states
    the forward saves for the backward; fwd_steps, the forward's tile; the backward walks each saved chunk
    in bwd_sub_chunks tiles of chunk / bwd_sub_chunks steps; fwd_segments / bwd_segments split L into that
    many pieces run by separate programs (1: no split); bwd_scatter_sums sums dB and dC over a program's
    channels as a reduce-scatter (`_channel_sum_scattered`) rather than with tl.sum; bwd_sm_slots: 0 lets
    the backward's programs share scratch slots, as many an SM as it holds programs, only when a slot each
    would take more than BWD_SCRATCH_BUDGET; n > 0 makes them share n slots an SM whenever the grid is
    larger (fewer slots than programs an SM bound the scratch further: the others wait for a slot);
    fwd_max_registers caps the forward's registers a thread (ptxas' maxnreg, NVIDIA only; 0: the compiler's
    choice)."""

    block_e_fwd: int
    block_e_bwd: int
    chunk: int = 64
    num_warps_fwd: int = 1
    num_warps_bwd: int = 2
    fwd_steps: int = 8
    bwd_sub_chunks: int = 16
    fwd_segments: int = 1
    bwd_segments: int = 1
    bwd_scatter_sums: bool = False
    bwd_sm_slots: int = 0
    fwd_max_registers: int = 0

    def __post_init__(self) -> None:
        if self.chunk % self.fwd_steps or self.fwd_steps & (self.fwd_steps - 1):
            raise ValueError(f"fwd_steps={self.fwd_steps} must be a power of two dividing chunk={self.chunk}")
        sub = self.bwd_sub_chunks
        if sub < 1 or self.chunk % sub or (self.chunk // sub) & (self.chunk // sub - 1):
            raise ValueError(f"bwd_sub_chunks={sub} must split chunk={self.chunk} into power-of-two "
                             "backward tiles; use a divisor such as 1, 2 or 4")
        if self.fwd_segments < 1 or self.bwd_segments < 1:
            raise ValueError("fwd_segments and bwd_segments count pieces of L: use 1 (no split) or more")
        if self.fwd_max_registers and not 32 <= self.fwd_max_registers <= 255:
            raise ValueError(f"fwd_max_registers={self.fwd_max_registers}: use 0 (the compiler's choice) or a cap "
                             "between 32 and 255 registers a thread (ptxas allows at most 255)")
        if self.bwd_sm_slots < 0:
            raise ValueError(f"bwd_sm_slots={self.bwd_sm_slots}: use 0 (as many as an SM holds) or a count")
        if self.bwd_scatter_sums and self.block_e_bwd > 64:
            raise ValueError(f"bwd_scatter_sums covers up to 64 channels a program; got block_e_bwd="
                             f"{self.block_e_bwd}: lower it or set bwd_scatter_sums=False")


# Programs below which the forward splits L into segments (an H100/H200 has 132 SMs; its programs hold one
# warp and a few run on an SM): the segments' summary pass costs less than the idle SMs would.
SPLIT_BELOW_PROGRAMS = 512
# Split (B, E, L) forwards aim at this many programs (the best of the H200 sweep, 2026-11-26).
FWD_SPLIT_PROGRAMS = 3072
# The time-major forward's register cap (ptxas' maxnreg; it compiles to ~245 registers a thread, 8 warps an SM).
# With at least 8 programs an SM, 168 (12 warps an SM) is 1.05-1.35x faster than no cap; with fewer, 224 is
# 1.02-1.15x faster and 168 up to 1.1x slower (H100, 2026-11-26). The (B, E, L) forward gains nothing.
FWD_MANY_PROGRAMS_PER_SM = 8
FWD_REGISTERS_MANY_PROGRAMS, FWD_REGISTERS_FEW_PROGRAMS = 168, 224
# A split time-major forward fills one wave at the 168 cap, 65536 / (168 x 32) = 12 programs an SM: Ti 64f b4
# in 16 segments (1536 programs) 0.310 ms against 0.334 in 32, S 64f b4 in 8 0.596 against 0.611 in 16
# (H100, 2026-11-26).
FWD_SPLIT_PROGRAMS_PER_SM_TIME_MAJOR = 65536 // (FWD_REGISTERS_MANY_PROGRAMS * 32)
# Programs an SM holds at once (one warp each): the backward at 255 registers a thread, 65536 / (256 x 32);
# the adjoint summary pass at 128.
BWD_PROGRAMS_PER_SM, SUMMARY_PROGRAMS_PER_SM = 8, 16
# The backward's launch model (default_config): the tiles as (channels at d_state 16, steps, reduce-scatter
# sums, time of a program step relative to 16 x 4's), and the time of a summary step relative to the
# backward's. Fitted to H100 sweeps (2026-11-26): M 8f b16 unsplit, 8 x 8 2.58 ms in 3
# waves against 16 x 4 2.89 in 2; the summary share 0.24-0.33 at M 8f, Ti 16f, S 8f and Ti 8f.
BWD_TILES = ((16, 4, True, 1.0), (8, 8, False, 0.6))
BWD_SUMMARY_STEP_COST = 0.3
# Splits that would make more waves than this were slower than the model says (M 8f b16: 7 waves of 16 x 4
# 2.24 ms against 2.18 for 5): they are not considered.
BWD_MAX_WAVES = 5
# A split must beat the best unsplit launch by this much in the model (whose error is ~5-10%): splitting S 8f
# b16 (8% in the model) gained 3% and would have added 5 MB of scratch.
BWD_SPLIT_MIN_GAIN = 0.1
# Scratch (bytes) the backward may take as one slot a program; past it the programs share the SMs' slots.
BWD_SCRATCH_BUDGET = 16 << 20
# Each program folds the summaries of the segments before (after) it: keep that loop short.
MAX_SEGMENTS = 64


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, called by every mixer call
def default_config(d_state: int, rows: int, time_major: bool = False, *, length: int | None = None,
                   sm_count: int = 132) -> ScanConfig:
    """Launch shape for d_state, `rows` = batch x channels (B E), the inputs' layout, the sequence length if
    known and the GPU's SM count; measured best for d_state 16 on an H200 and an H100 (2026-11-26).

    Forward: 8-step tiles, 1 warp, 8 channels a program with many rows (S 8f b16: 0.40 ms against 0.80 ms
    for a time-last kernel, H200), 16 with few rows, whose L is then split into segments up to ~3072
    programs (Ti 64f b4: 32 segments, 0.58 ms against 1.05 for a time-last kernel). Time-major
    inputs (u, delta, z stored (B, L, E), channels contiguous, as the mixer makes them): 16 channels a
    program at any row count, registers capped (FWD_REGISTERS_*: 168 with many programs, else 224), L split
    to fill one wave of 12 programs an SM.
    Backward, either layout: 16 channels x 4 steps with dB/dC summed as a reduce-scatter, or 8 x 8 with
    tl.sum, on 1 warp, L split into segments, whichever a model in waves of programs gives the least time
    (`_backward_launch`). A state is saved every 64 steps; the backward walks each saved chunk forward to its
    tile starts, through scratch slots that scale with the programs resident at once, so neither
    the split nor the spacing costs memory with the grid.
    Larger state sizes get fewer channels a program, to keep the fp32 tiles in registers."""
    block_n = max(2, triton.next_power_of_2(d_state))
    # Forward tiles of T x block_n x channels: at most 64 fp32 values a thread (1 warp).
    # Time-major: 16 channels (a 32-byte bf16 row a step) at any row count; M 8f b16 0.480 ms against 0.532
    # for 8 (H200, 2026-11-26).
    fwd_e = 16 if time_major or rows < 8192 else 8
    fwd_steps = 8
    while fwd_steps * block_n * fwd_e > 64 * 32 and fwd_e > 1:
        fwd_e //= 2
    while fwd_steps * block_n * fwd_e > 64 * 32 and fwd_steps > 2:
        fwd_steps //= 2
    fwd_programs = triton.cdiv(rows, fwd_e)
    fwd_segments = 1
    if fwd_programs < SPLIT_BELOW_PROGRAMS:
        if time_major:  # whole segments within one wave: a partial second one costs more than it gains
            fwd_segments = max(1, FWD_SPLIT_PROGRAMS_PER_SM_TIME_MAJOR * sm_count // fwd_programs)
        else:
            fwd_segments = triton.cdiv(FWD_SPLIT_PROGRAMS, fwd_programs)
        fwd_segments = min(MAX_SEGMENTS, fwd_segments)
    fwd_registers = 0
    if time_major:
        many = fwd_programs * fwd_segments >= FWD_MANY_PROGRAMS_PER_SM * sm_count
        fwd_registers = FWD_REGISTERS_MANY_PROGRAMS if many else FWD_REGISTERS_FEW_PROGRAMS
    chunk = 64
    n_chunks = None if length is None else triton.cdiv(length, chunk)
    bwd_e, bwd_steps, scatter, bwd_segments = _backward_launch(block_n, rows, sm_count, n_chunks, chunk)
    return ScanConfig(block_e_fwd=fwd_e, block_e_bwd=bwd_e, chunk=chunk, num_warps_fwd=1, num_warps_bwd=1,
                      fwd_steps=fwd_steps, bwd_sub_chunks=chunk // bwd_steps, fwd_segments=fwd_segments,
                      bwd_segments=bwd_segments, bwd_scatter_sums=scatter, fwd_max_registers=fwd_registers)


def _backward_launch(block_n: int, rows: int, sm_count: int, n_chunks: int | None, chunk: int
                     ) -> tuple[int, int, bool, int]:
    """(channels, steps a tile, reduce-scatter, segments) of the backward with the least modelled time.

    A program walks a segment of L; sm_count x BWD_PROGRAMS_PER_SM programs run at once, so the main pass
    takes ceil(programs x segments / that) waves of a segment's steps; the summary pass a split needs does the
    same for segments - 1, in waves of SUMMARY_PROGRAMS_PER_SM an SM. Segments are whole saved chunks: with
    n_chunks known only the counts `split_segments` makes are tried, and a segment's steps are its chunks'. Ties
    go to fewer segments; a split must gain BWD_SPLIT_MIN_GAIN over the best unsplit launch."""
    unsplit, split = None, None
    for channels, steps, scatter, step_time in BWD_TILES:
        block_e = max(1, min(channels, channels * 16 // block_n))
        programs = triton.cdiv(rows, block_e)
        for segments in range(1, MAX_SEGMENTS + 1):
            waves = triton.cdiv(programs * segments, sm_count * BWD_PROGRAMS_PER_SM)
            if segments > 1 and waves > BWD_MAX_WAVES:
                break
            seg_steps = 1 / segments
            if n_chunks is not None:
                per, count = split_segments(n_chunks, segments)
                if count != segments:
                    continue
                seg_steps = per * chunk
            summary_waves = triton.cdiv(programs * (segments - 1), sm_count * SUMMARY_PROGRAMS_PER_SM)
            time = step_time * seg_steps * (waves + BWD_SUMMARY_STEP_COST * summary_waves)
            launch = (time, block_e, steps, scatter, segments)
            if segments == 1 and (unsplit is None or time < unsplit[0]):
                unsplit = launch
            if segments > 1 and (split is None or time < split[0] * (1 - 1e-9)):
                split = launch
    if split is not None and split[0] < unsplit[0] * (1 - BWD_SPLIT_MIN_GAIN):
        return split[1:]
    return unsplit[1:]


def split_segments(n_units: int, pieces: int) -> tuple[int, int]:
    """Split n_units (tiles or saved chunks) into at most `pieces` runs: (units per segment, segments)."""
    per = triton.cdiv(n_units, max(1, pieces))
    return per, triton.cdiv(n_units, per)
