"""Build the compiled kernels that the released VideoMamba code path calls, from their PyPI sdists, for one GPU.

The released model (OpenGVLab/VideoMamba) imports a fork of mamba-ssm 1.0.1 and causal-conv1d 1.0.0. Their
Python code is read from the user's checkout (benchmarks/_released.py); their compiled kernels are not in it
and the 1.0.x sdists on PyPI hold no CUDA sources. This script builds the two extension modules from the sdists
that do:
  selective_scan_cuda  from mamba-ssm 2.3.2.post1: the fork's selective-scan kernels with ROCm and newer-compiler
                       portability edits, the same launch shapes, and the same `fwd` / `bwd` signatures;
  causal_conv1d_cuda   from causal-conv1d 1.7.0: the fork's conv kernels plus sequence-index and initial-state
                       options; its calls take output buffers, which benchmarks/_released.py adapts to the
                       fork's 1.0.0 signatures.
Both are built with their setup.py's compiler flags, through torch.utils.cpp_extension (ninja), concurrently.

By default only what the benchmarks run is compiled: bf16 activations with fp32 weights (VideoMamba under bf16
autocast); `--dtype fp32` compiles fp32 activations with fp32 weights instead (the released model run in fp32,
as scripts/check_released_eval.py does). The template instantiations of the other dtypes are dropped and the
dtype dispatch keeps the one branch: 1 of causal-conv1d's 9 dtype pairs, whose full build took 8.4 minutes on
an H100 machine's 16 cores (2026-11-24), and 2 of selective-scan's 9 translation units. Other dtypes then raise
"was built for ... only". --all-dtypes builds everything. Each module's build seconds are recorded in its
<module>.json.

    python scripts/build_released_kernels.py --sdists DIR --out DIR [--arch 90] [--jobs 16] [--dtype bf16|fp32]
        [--all-dtypes]

DIR holds mamba_ssm-2.3.2.post1.tar.gz and causal_conv1d-1.7.0.tar.gz, which `pip download` fetches without
a GPU (see docs/performance.md, "Reproduce"). --out receives `<module>.so` and `<module>.json` (versions,
flags, dtypes, build seconds); put it on sys.path, or pass it to the benchmarks' --released-ext.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# Both setup.py files' flags (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0) less `--ptxas-options=-v`, and less
# `-std=c++17`: the C++ standard is the one torch's headers ask for (C++17 up to torch 2.11, C++20 later).
NVCC_FLAGS = (
    "-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "-lineinfo",
)
CXX_FLAGS = ("-O3",)
# The activation dtypes a restricted build can keep, as (C++ type, ScalarType, source file tag); weights stay fp32.
INPUT_TYPES = {"bf16": ("at::BFloat16", "BFloat16", "bf16"), "fp32": ("float", "Float", "fp32")}
WEIGHT_TYPE = ("float", "Float")


@dataclass(frozen=True)
class Extension:
    """One compiled module: where its sources are in the sdist, and the subset a one-dtype build compiles."""

    sdist_prefix: str  # the sdist's file name up to the version: "mamba_ssm-"
    version: str
    sources: tuple[str, ...]  # relative to the unpacked sdist
    restricted_sources: tuple[str, ...]  # "{dtype}" stands for the kept activation dtype's file tag
    include: str

    def sdist(self, folder: Path) -> Path:
        path = folder / f"{self.sdist_prefix}{self.version}.tar.gz"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: fetch it with `MAMBA_SKIP_CUDA_BUILD=TRUE "
                             f"CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: "
                             f"--no-build-isolation {self.sdist_prefix[:-1].replace('_', '-')}=={self.version} "
                             f"-d {folder}`")
        return path


_SCAN = "csrc/selective_scan/selective_scan"
EXTENSIONS = {
    "selective_scan_cuda": Extension(
        "mamba_ssm-", "2.3.2.post1",
        sources=(f"{_SCAN}.cpp", *(f"{_SCAN}_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")),
                 *(f"{_SCAN}_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex"))),
        restricted_sources=(f"{_SCAN}.cpp", f"{_SCAN}_fwd_{{dtype}}.cu", f"{_SCAN}_bwd_{{dtype}}_real.cu"),
        include="csrc/selective_scan"),
    "causal_conv1d_cuda": Extension(
        "causal_conv1d-", "1.7.0",
        sources=tuple(f"csrc/causal_conv1d{s}" for s in (".cpp", "_fwd.cu", "_bwd.cu", "_update.cu")),
        restricted_sources=tuple(f"csrc/causal_conv1d{s}" for s in (".cpp", "_fwd.cu", "_bwd.cu", "_update.cu")),
        include="csrc"),
}

_INSTANTIATION = re.compile(r"^template void (\w+)<([^<>,]+), ([^<>]+)>\(.*\);[ \t]*(?:\n|\Z)", re.MULTILINE)
_DISPATCH = re.compile(r"^#define (DISPATCH_\w+)\((\w+), NAME, \.\.\.\)[^\n]*\\\n(?:[^\n]*\\\n)*[^\n]*\n",
                       re.MULTILINE)


def restrict_dtypes(text: str, dtype: str) -> tuple[str, int]:
    """`text` with the template instantiations and dtype-dispatch branches of other dtypes than `dtype` inputs
    (INPUT_TYPES) and fp32 weights removed; also returns how many instantiations and macros it rewrote."""
    changes = 0
    kept = {"input": INPUT_TYPES[dtype][:2], "weight": WEIGHT_TYPE}

    def instantiation(match: re.Match) -> str:
        nonlocal changes
        keep = match[2] == kept["input"][0] and match[3] == kept["weight"][0]
        changes += not keep
        return match[0] if keep else ""

    def dispatch(match: re.Match) -> str:
        nonlocal changes
        macro, param = match[1], match[2]
        body = match[0]
        role = "input" if "using input_t" in body else "weight"
        cpp_type, scalar = kept[role]
        changes += 1
        return (f"#define {macro}({param}, NAME, ...) \\\n"
                f"    if ({param} == at::ScalarType::{scalar}) {{ \\\n"
                f"        using {role}_t = {cpp_type}; \\\n"
                f"        __VA_ARGS__(); \\\n"
                f"    }} else {{ \\\n"
                f"        AT_ERROR(#NAME, \" was built for {scalar} {role}s only \" \\\n"
                f"                 \"(scripts/build_released_kernels.py); got '\", toString({param}), \"'\"); \\\n"
                f"    }}\n")

    text = _INSTANTIATION.sub(instantiation, text)
    return _DISPATCH.sub(dispatch, text), changes


def build_one(name: str, sdists: Path, out: Path, work: Path, arch: str, all_dtypes: bool, dtype: str = "bf16"
              ) -> dict:
    """Unpack, optionally restrict to `dtype` inputs, compile with ninja, copy `<name>.so` to `out`; returns the
    build record."""
    from torch.utils import cpp_extension

    ext = EXTENSIONS[name]
    start = time.perf_counter()
    src = work / name / "src"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(ext.sdist(sdists)) as tar:
        tar.extractall(src, filter="data")
    root = next(src.iterdir())
    sources = ext.sources if all_dtypes else tuple(s.format(dtype=INPUT_TYPES[dtype][2])
                                                    for s in ext.restricted_sources)
    rewritten = 0
    if not all_dtypes:
        for rel in sources:
            path = root / rel
            text, changes = restrict_dtypes(path.read_text(), dtype)
            path.write_text(text)
            rewritten += changes
        if rewritten == 0:
            raise SystemExit(f"{name}: found no dtype instantiation or dispatch macro to restrict; the sdist's "
                             "sources changed: build with --all-dtypes or update restrict_dtypes")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
    build_dir = work / name / "ninja"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(root / s) for s in sources], extra_cflags=list(CXX_FLAGS),
                       extra_cuda_cflags=list(NVCC_FLAGS), extra_include_paths=[str(root / ext.include)],
                       build_directory=str(build_dir), verbose=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / f"{name}.so", out / f"{name}.so")
    record = {"module": name, "sdist": ext.sdist(sdists).name, "version": ext.version, "arch": f"sm_{arch}",
              "dtypes": "all" if all_dtypes else f"{dtype} inputs, fp32 weights", "sources": list(sources),
              "rewritten": rewritten, "nvcc_flags": list(NVCC_FLAGS), "seconds": round(time.perf_counter() - start, 1),
              "so_bytes": (out / f"{name}.so").stat().st_size}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdists", type=Path, required=True, help="folder holding the two sdists")
    parser.add_argument("--out", type=Path, required=True, help="folder for <module>.so and <module>.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/released_kernels_build"))
    parser.add_argument("--arch", default="90", help="compute capability without the dot (H100/H200: 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes in all")
    parser.add_argument("--dtype", choices=sorted(INPUT_TYPES), default="bf16",
                        help="the activation dtype a restricted build keeps (weights fp32)")
    parser.add_argument("--all-dtypes", action="store_true", help="compile every dtype pair (much slower)")
    parser.add_argument("--only", choices=sorted(EXTENSIONS), help="build this one in this process")
    args = parser.parse_args()
    if not re.fullmatch(r"\d{2,3}", args.arch):
        raise SystemExit(f"--arch must be a compute capability such as 90; got {args.arch!r}")
    if args.only:
        print(json.dumps(build_one(args.only, args.sdists, args.out, args.work, args.arch, args.all_dtypes,
                                   args.dtype)))
        return 0
    # Both at once: each build is bound by its slowest translation unit, not by the cores.
    share = max(1, args.jobs // len(EXTENSIONS))
    procs = {}
    for name in EXTENSIONS:
        cmd = [sys.executable, __file__, "--only", name, "--sdists", str(args.sdists), "--out", str(args.out),
               "--work", str(args.work), "--arch", args.arch, "--dtype", args.dtype,
               *(["--all-dtypes"] if args.all_dtypes else [])]
        procs[name] = subprocess.Popen(cmd, env={**os.environ, "MAX_JOBS": str(share)})
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        print(f"build failed: {', '.join(failed)} (the compiler output is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
