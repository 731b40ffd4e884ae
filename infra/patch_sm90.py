"""Restrict mamba-ssm / causal-conv1d CUDA builds to sm_90 (H100/H200) by editing their setup.py in place.

Their setup.py files append hard-coded `-gencode` pairs (9 targets with CUDA 13) and ignore TORCH_CUDA_ARCH_LIST,
so a full build takes far longer than an sm_90-only one (reference: docs/operations.md, "Cluster image").

    python infra/patch_sm90.py mamba_ssm-2.3.2.post1/setup.py causal_conv1d-1.7.0/setup.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# `cc_flag.append("-gencode")` followed by `cc_flag.append("arch=compute_XX,code=sm_XX")` for every XX but 90.
_OTHER_ARCH = re.compile(
    r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_(?!90,)\d+a?,code=sm_\d+a?"\)'
)


def patch(path: Path) -> int:
    text = path.read_text()
    patched, removed = _OTHER_ARCH.subn("pass", text)
    if 'arch=compute_90,code=sm_90' not in patched:
        raise SystemExit(f"{path}: no sm_90 target left; the setup.py layout changed, check it by hand")
    compile(patched, str(path), "exec")  # still valid Python
    path.write_text(patched)
    return removed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: removed {patch(Path(name))} non-sm_90 targets")
