"""Count the host syncs of a piece of training code, each with the line that caused it (docs/performance.md).

A host sync is a point where the Python thread waits for the GPU to finish what it has queued: reading a value
back (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `.cpu()`, a blocking copy) or an explicit synchronize. While
the host waits it queues nothing, so the GPU idles for the host's launch latency after every such point; a step
without them lets the host run ahead.

On a GPU, `count_host_syncs` turns on torch's sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`), which
warns at every synchronising CUDA call, and records each warning with the Python stack of the call. It does not
see copies from pageable host memory, which the driver may stage after waiting for the stream (the engine pins
batches for that reason).

On a CPU nothing synchronises; there it counts the reads of tensor values made from Python instead (the same
calls: item, tolist, __float__, __int__, __bool__, numpy, cpu), which would be host syncs on a GPU, so that the
logic of a step can be checked on a machine without one. Reads inside torch's C++ (torch.multinomial's input
checks, say) are not seen there; a GPU sees them.

Each sync is attributed to a site: the innermost frame of the call's stack outside torch itself, named
`pipeline/engine.py:123 (any_rank_flags)` when it is this repository's library code (`pipeline/`, `models/` under
one of `roots`), `deepspeed` (or another package's name) with the file and line otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import sysconfig
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("pipeline", "models")
# torch's sync debug mode warning (c10/cuda/CUDAFunctions.cpp).
_SYNC_WARNING = "called a synchronizing CUDA operation"
_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")
_TORCH = str(Path(torch.__file__).parent)
_STDLIB = sysconfig.get_paths()["stdlib"]


@dataclass(frozen=True)
class SyncSite:
    """Where a host sync came from: `origin` is "ours" (this repository's library code) or a package's name."""

    origin: str
    file: str
    line: int
    function: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line} ({self.function})"
        return where if self.origin == "ours" else f"{self.origin}: {where}"


@dataclass
class SyncLog:
    """The host syncs seen inside a `count_host_syncs` block, in order."""

    sites: list[SyncSite] = field(default_factory=list)

    @property
    def ours(self) -> list[SyncSite]:
        """The syncs made by this repository's library code (pipeline/, models/)."""
        return [site for site in self.sites if site.origin == "ours"]

    def summary(self) -> dict[str, int]:
        """{site: how many times}, most frequent first."""
        return dict(Counter(str(site) for site in self.sites).most_common())


def _skipped(filename: str) -> bool:
    """torch's own frames, the standard library's and this module's: a sync is charged to who called them."""
    if filename.startswith(_TORCH) or filename == __file__:
        return True
    return filename.startswith(_STDLIB) and "-packages" not in filename


def _package_of(path: Path) -> str:
    """The top-level package a file belongs to, from the import path (site-packages or a --target folder)."""
    entries = sorted((Path(p).resolve() for p in sys.path if p), key=lambda p: len(p.parts), reverse=True)
    for entry in entries:
        if path.is_relative_to(entry) and path != entry:
            return path.relative_to(entry).parts[0].removesuffix(".py")
    return "python"


def site_of(stack: Sequence[traceback.FrameSummary], roots: Sequence[Path] = (REPO,)) -> SyncSite:
    """The site of a sync whose Python stack (outermost first) is `stack`: its innermost frame outside torch and
    the standard library."""
    frame = ([f for f in stack if not _skipped(f.filename)] or list(stack))[-1]
    path = Path(frame.filename).resolve()
    for root in roots:
        root = Path(root).resolve()
        if path.is_relative_to(root):
            relative = path.relative_to(root)
            origin = "ours" if relative.parts[0] in LIBRARY_DIRS else "caller"
            return SyncSite(origin, str(relative), frame.lineno or 0, frame.name)
    return SyncSite(_package_of(path), path.name, frame.lineno or 0, frame.name)


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str, roots: Sequence[Path] = (REPO,)) -> Iterator[SyncLog]:
    """Record every host sync (GPU) or Python-level read of a tensor value (CPU) inside the block; see the module
    docstring. `roots`: the checkouts whose `pipeline/` and `models/` count as "ours"."""
    log = SyncLog()
    device = torch.device(device)
    if device.type == "cuda":
        with _sync_debug_warnings(log, roots):
            yield log
    else:
        with _tensor_reads(log, roots):
            yield log


@contextlib.contextmanager
def _sync_debug_warnings(log: SyncLog, roots: Sequence[Path]) -> Iterator[None]:
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if _SYNC_WARNING in str(message):
            log.sites.append(site_of(traceback.extract_stack()[:-1], roots))
        else:
            shown(message, category, filename, lineno, file, line)

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{_SYNC_WARNING}")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def _tensor_reads(log: SyncLog, roots: Sequence[Path]) -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    own = {name for name in _READS if name in vars(torch.Tensor)}  # the rest are inherited from TensorBase

    def counted(original):
        def read(self, *args, **kwargs):
            log.sites.append(site_of(traceback.extract_stack()[:-1], roots))
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


def print_summary(title: str, log: SyncLog, file=sys.stdout) -> None:
    """`title: N syncs (M ours)` and one line per site."""
    print(f"{title}: {len(log.sites)} host syncs ({len(log.ours)} in pipeline/ or models/)", file=file)
    for site, count in log.summary().items():
        print(f"  {count:3d} x {site}", file=file)
