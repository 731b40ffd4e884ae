"""Run a kernel test file's `interp` subset under Triton's interpreter, for CPU CI.

TRITON_INTERPRET=1 must be set before triton is imported, hence a fresh interpreter process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_interp_subset(test_file: str, expected_passed: int, timeout_s: int) -> None:
    """Run `pytest -m interp test_file` with TRITON_INTERPRET=1; fail unless exactly `expected_passed` pass."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        pytest.skip("the kernel tests themselves run in this session")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interp", test_file],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=timeout_s,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{expected_passed} passed" in result.stdout, result.stdout[-2000:]
