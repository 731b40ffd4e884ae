"""Loading checkpoint files without running code from them: `torch.load(weights_only=True)` with an allow-list.

A pickle may name any callable, and a full unpickling calls it: a crafted `rank0_state.pt` or DeepSpeed shard in a
shared checkpoint bucket would run its payload on every node that resumes or exports. Every checkpoint file is
therefore read weights-only: tensors, containers and plain values, plus exactly the classes our files and
DeepSpeed's hold (listed with `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints of ZeRO 0-3):

- `rank<r>_state.pt`: numpy arrays (the numpy RNG state), `NUMPY_ARRAY_GLOBALS`;
- DeepSpeed's `*_model_states.pt` / `*_optim_states.pt`: the ZeRO stage enum, the loss scalers (the static one on
  fp32/bf16, the dynamic one on fp16) and the fragment addresses of ZeRO 1-2 / bf16 shards, `DEEPSPEED_GLOBALS`.

Anything else is refused with `UnsafeCheckpointError`, naming the file and what it asked for. DeepSpeed's own loader
(`engine.load_checkpoint`) reads through its engine's checkpoint engine, which `WeightsOnlyCheckpointEngine`
replaces; its offline consolidation (`zero_to_fp32`) calls `torch.load(weights_only=False)` itself, so
`weights_only_loads` forces weights-only loading around it (torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, read at each
call) after `check_files` has named any file that asks for more.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to unpickle something besides tensors, containers and the allow-listed classes."""


def _numpy_array_globals() -> list[Any]:
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _no_globals() -> list[Any]:
    return []


TENSORS_ONLY = _no_globals
"""Files of tensors and plain values only (`frozen_student.pt`)."""
NUMPY_ARRAY_GLOBALS = _numpy_array_globals
"""What `rank<r>_state.pt` may hold besides tensors and plain values (a function: built when first needed)."""
DEEPSPEED_GLOBALS = _deepspeed_globals
"""What DeepSpeed's checkpoint files may hold besides tensors and plain values (DeepSpeed imported when needed)."""


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _refusal(path: str | Path, asked: list[str]) -> UnsafeCheckpointError:
    shown = ", ".join(asked) if asked else "a pickle opcode weights-only loading does not allow"
    return UnsafeCheckpointError(
        f"{path}: refused to load: it asks to unpickle {shown}, which a checkpoint of this pipeline never holds "
        "(loading it could run code). Replace the file from a trusted copy, or resume from another checkpoint."
    )


def _unexpected_globals(path: str | Path, allowed: list[Any]) -> list[str]:
    names = {_qualified(obj) for obj in allowed}
    # numpy's private module moved (numpy.core -> numpy._core); files name either
    names |= {name.replace("numpy._core.", "numpy.core.") for name in names}
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - names)


def load_file(path: str | Path, allowed: Any = NUMPY_ARRAY_GLOBALS, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with `allowed()` also allowed; `UnsafeCheckpointError` otherwise."""
    with torch.serialization.safe_globals(allowed()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refusal(path, _unexpected_globals(path, allowed())) from err


def check_files(paths: Iterable[str | Path], allowed: Any = DEEPSPEED_GLOBALS) -> None:
    """Raise `UnsafeCheckpointError` for the first file that names a global outside `allowed()` (nothing loaded)."""
    for path in paths:
        asked = _unexpected_globals(path, allowed())
        if asked:
            raise _refusal(path, asked)


@contextlib.contextmanager
def weights_only_loads(allowed: Any = DEEPSPEED_GLOBALS) -> Iterator[None]:
    """Every `torch.load` in this process is weights-only inside the block, even one that passes
    `weights_only=False` (DeepSpeed's `zero_to_fp32`), with `allowed()` added to torch's safe globals."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's torch checkpoint engine with its saves unchanged and its loads weights-only (`load_file`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, DEEPSPEED_GLOBALS, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def weights_only_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed `engine`'s checkpoint loads weights-only: `engine.load_checkpoint` reads every module state,
    optimizer shard and LR-scheduler state through `engine.checkpoint_engine.load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, WeightsOnlyCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(
            f"DeepSpeed uses checkpoint engine {type(current).__name__}; only its TorchCheckpointEngine is known to "
            "load weights-only here. Remove the DeepSpeed checkpoint option that selected it."
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(current)
