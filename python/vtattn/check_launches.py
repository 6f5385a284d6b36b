"""`python -m vtattn.check_launches`: would every kernel launch vtattn can make succeed on sm_80,
sm_86, sm_89 and sm_90? Checked without a GPU, exits 1 on any launch that would fail.

CUDA: the launchers take grid, block, dynamic shared memory and the shared-memory opt-in from the
launch plans of csrc/include/launch_plan.h; this check compiles that header on the host
(csrc/check/launch_plans.cpp), asks it for the launches of every op over a grid of shapes covering
each op's range (a launcher's own refusals are fine: they raise a clear error, and _cuda_caps sends
those inputs elsewhere), and checks each launch against the architecture's limits with the
registers and static shared memory ptxas reported for the kernel (recorded at build time by
scripts/nvcc_record.sh in build/ptxas/). Triton: the same limits for every autotuning config as
compiled for sm_90 and sm_80 (scripts/compile_triton.py --record), and the grids of every launcher
(vtattn._check_triton)."""
import argparse
import ctypes
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (an editable install)


class Arch(NamedTuple):
    name: str
    smem_optin: int  # bytes of shared memory a block may opt in to (static + dynamic)
    sass: str        # the SASS target that runs there (vtattn builds sm_80 and sm_90a)
    triton: int      # the Triton compile target whose figures stand for it
    sms: tuple[int, ...]  # SM counts of common parts (the decode split count depends on it)


ARCHS = (
    Arch("sm_80", 163 * 1024, "sm_80", 80, (108,)),          # A100
    Arch("sm_86", 99 * 1024, "sm_80", 80, (84, 72)),         # A40 / RTX 3090, A10
    Arch("sm_89", 99 * 1024, "sm_80", 80, (142, 58)),        # L40, L4
    Arch("sm_90", 227 * 1024, "sm_90a", 90, (132, 114)),     # H100 / H200 SXM, H100 PCIe
)
DEFAULT_SMEM = 48 * 1024
MAX_THREADS = 1024
REGS_PER_BLOCK = 65536
MAX_REGS = 255
MAX_GRID = (2**31 - 1, 65535, 65535)


# ---- the launch plans, compiled from csrc/ ---------------------------------------------------------

class Plans:
    """csrc/include/launch_plan.h behind ctypes: plan(op, *sizes, smem_optin=..., sms=...) -> dict."""

    def __init__(self, source: Path = ROOT):
        cpp, header = source / "csrc" / "check" / "launch_plans.cpp", source / "csrc" / "include" / "launch_plan.h"
        if not cpp.exists():
            raise SystemExit(f"check_launches: {cpp} not found: run it from a source checkout (pip install -e .)")
        digest = hashlib.sha256(cpp.read_bytes() + header.read_bytes()).hexdigest()[:16]
        lib = Path(tempfile.gettempdir()) / f"vtattn-launch-plans-{digest}.so"
        if not lib.exists():
            tmp = lib.with_suffix(f".{id(self)}.tmp")
            cmd = ["c++", "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{header.parent}", str(cpp), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"check_launches: compiling the launch plans failed:\n{done.stderr}")
            tmp.replace(lib)
        self._lib = ctypes.CDLL(str(lib))
        fn = self._lib.vtattn_launch_plan
        fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._buf = ctypes.create_string_buffer(1 << 14)

    def plan(self, op: str, *sizes: int, smem_optin: int = 0, sms: int = 1) -> dict[str, Any]:
        args = (ctypes.c_int64 * max(1, len(sizes)))(*sizes)
        n = self._lib.vtattn_launch_plan(op.encode(), args, len(sizes), smem_optin, sms, self._buf, len(self._buf))
        if n < 0:
            raise ValueError(f"check_launches: the plans know no {op}{sizes}")
        plan: dict[str, Any] = json.loads(self._buf.value)
        return plan


# ---- ptxas's resource report ---------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
Resources = dict[tuple[str, str], tuple[int, int]]  # (kernel, sass target) -> (registers, static smem)


def kernel_name(mangled: str) -> str:
    """The unqualified function name of an Itanium-mangled kernel (`_ZN6vtattn..13select_kernelI..` ->
    select_kernel); template arguments and namespaces dropped, no c++filt needed."""
    if not mangled.startswith("_Z"):
        return mangled
    i = 3 if mangled.startswith("_ZN") else 2
    name = ""
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        name, i = mangled[j:j + n], j + n
    return name


def read_ptxas(directory: Path) -> Resources:
    """{(kernel, sass target): (registers, static smem bytes)}, the maximum over a kernel's
    instantiations, from every report in `directory` (scripts/nvcc_record.sh)."""
    out: Resources = {}
    for path in sorted(directory.glob("*.txt")):
        entry = None
        for line in path.read_text().splitlines():
            m = _ENTRY.search(line)
            if m:
                entry = (kernel_name(m.group(1)), m.group(2))
                continue
            m = _USED.search(line)
            if m and entry:
                smem = _SMEM.search(line)
                regs, static = int(m.group(1)), int(smem.group(1)) if smem else 0
                old = out.get(entry, (0, 0))
                out[entry] = (max(old[0], regs), max(old[1], static))
                entry = None
    return out


# ---- the shapes of each op's range --------------------------------------------------------------------

BIG = 2**31 - 1
Shape = tuple[str, tuple[int, ...]]  # (op, sizes)


def cuda_shapes() -> Iterator[Shape]:
    """(op, sizes) over each CUDA op's range, the edges of every limit included; sizes as the plan
    functions of launch_plan.h take them."""
    for L in range(0, 16384 + 2):  # every segment length (shared memory grows with it)
        yield "select_tokens", (1, 1, L)
    for B in (0, 1, 65535, 65536):
        for S in (0, 1, 256, 257):
            for L in (1, 16384):
                yield "select_tokens", (B, S, L)
    for rows in (0, 1, 5, 4 * BIG, 4 * BIG + 1):
        for C in (0, 1, 4096):
            yield "gather_tokens", (rows, C)
    for heads in (0, 1, 4096, BIG, BIG + 1):
        for n in (0, 1, 3):
            yield "paged_append", (heads, n)
    for B in (0, 1, 65535, 65536):
        for N in (0, 1, 577, BIG - 1, BIG):
            for C in (0, 1, 1025, 1024 * 65535, 1024 * 65535 + 1):
                for K in (0, 1, 64, BIG - 1):
                    yield "merge_tokens", (B, N, C, K)
    for rows in (1, 128, 577, 4096, BIG - 1, BIG):  # the flash kernel: rows x heads x batch (sequences)
        for heads in (1, 32, 65535, 65536):
            for problems in (1, 65535, 65536):
                for D in range(8, 144, 8):
                    for lse_only, extra in ((0, 0), (1, 0), (0, 1024)):  # attention / varlen, LSE only, index
                        yield "flash", (rows, heads, problems, D, 2, lse_only, extra)
    for rows in (1, 128, 4097, BIG - 1):  # block_sparse_attention: the flash kernel over listed blocks
        for heads, batch in ((1, 1), (32, 65535), (65536, 1)):
            for D in (8, 64, 72, 128, 136):
                for bs in (64, 128, 256, 1024):
                    yield "block_sparse_attention", (rows, rows, heads, batch, D, 2, bs)
    for B, Hq in ((1, 1), (32, 16), (65535, 1), (65535, 65535)):
        for Nk in (0, 1, 577, 65535 * 32, 65535 * 128 + 1, BIG - 1):
            for R in (1, 16, 17, 4096):
                for D in (8, 64, 72, 128):
                    for esize in (2, 4):
                        for has_lse in (0, 1):
                            yield "key_importance", (B, Hq, Nk, R, D, esize, has_lse)
    for B in (1, 32, 65535, 2**20):
        for Hkv in (1, 8, 64):
            for group in (1, 3, 4, 8, 9):
                for cap in (0, 1, 255, 4096, 2**17, BIG - 1, BIG):
                    for D in (8, 64, 72, 128, 136):
                        yield "decode_attention", (B, Hkv * group, Hkv, cap, D)


# ---- the check ----------------------------------------------------------------------------------------

# (op, kernel, arch, kind) -> (count, the first sizes, its message)
Failures = dict[tuple[str, str, str, str], tuple[int, tuple[int, ...], str]]


def check_launch(launch: dict[str, Any], arch: Arch, resources: Resources, bounds: dict[str, int]
                 ) -> list[tuple[str, str]]:
    """(kind, message) of each thing that would make this launch fail on `arch` (empty: it launches)."""
    kernel, grid, block, dyn = launch["kernel"], launch["grid"], launch["block"], launch["dyn_smem"]
    found = resources.get((kernel, arch.sass))
    if found is None:
        return [("record", f"no ptxas record of {kernel} for {arch.sass}")]
    regs, static = found
    problems = []
    for axis, (n, most) in enumerate(zip(grid, MAX_GRID)):
        if not 1 <= n <= most:
            problems.append(("grid", f"grid axis {'xyz'[axis]} = {n} outside [1, {most}]"))
    if not 1 <= block <= MAX_THREADS:
        problems.append(("block", f"block of {block} threads"))
    if regs > MAX_REGS or -(-regs // 8) * 8 * block > REGS_PER_BLOCK:
        problems.append(("registers", f"{regs} registers x {block} threads > {REGS_PER_BLOCK}"))
    if static + dyn > arch.smem_optin:
        problems.append(("smem", f"{static} + {dyn} bytes of shared memory > the {arch.smem_optin} a block may "
                                 "opt in to"))
    elif static + dyn > DEFAULT_SMEM and not launch["opt_in"]:
        problems.append(("opt-in", f"{static} static + {dyn} dynamic bytes of shared memory > {DEFAULT_SMEM} "
                                   "without the opt-in"))
    if kernel in bounds and static > bounds[kernel]:
        problems.append(("bound", f"ptxas reports {static} bytes of static shared memory, the plan assumes at "
                                  f"most {bounds[kernel]}"))
    return problems


def check_cuda(plans: Plans, resources: Resources, shapes: Iterable[Shape] | None = None
               ) -> tuple[Failures, int, int, set[str]]:
    """Every planned launch of every shape on every arch -> ({(op, kernel, arch, kind): (count, first
    shape, its message)}, launches checked, inputs the launchers refuse, the kernels launched)."""
    bounds = plans.plan("constants")["static_smem_bounds"]
    failures: Failures = {}
    planned: set[str] = set()
    checked, refused = 0, 0
    for op, sizes in (shapes if shapes is not None else cuda_shapes()):
        for arch in ARCHS:
            for sms in arch.sms if op == "decode_attention" else arch.sms[:1]:
                plan = plans.plan(op, *sizes, smem_optin=arch.smem_optin, sms=sms)
                if plan["error"]:
                    refused += 1
                    continue
                for launch in plan["launches"]:
                    checked += 1
                    planned.add(launch["kernel"])
                    for kind, message in check_launch(launch, arch, resources, bounds):
                        key = (op, launch["kernel"], arch.name, kind)
                        count, first, first_message = failures.get(key, (0, sizes, message))
                        failures[key] = (count + 1, first, first_message)
    return failures, checked, refused, planned


def _report(failures: Failures) -> str:
    lines = []
    for (op, kernel, arch, _), (count, first, message) in sorted(failures.items()):
        lines.append(f"FAIL {op} {kernel} on {arch}: {message} ({count} launches; the first: sizes {first})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtattn.check_launches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ptxas", metavar="DIR", type=Path, default=ROOT / "build" / "ptxas",
                   help="ptxas reports of the build (default: build/ptxas, written by scripts/nvcc_record.sh)")
    p.add_argument("--triton", metavar="JSON", type=Path, default=ROOT / "build" / "triton_launches.json",
                   help="Triton compile figures (scripts/compile_triton.py --record; default: "
                        "build/triton_launches.json)")
    p.add_argument("--source", metavar="DIR", type=Path, default=ROOT, help="the source tree whose plans to check")
    p.add_argument("--skip-triton", action="store_true", help="check the CUDA launches only")
    a = p.parse_args(argv)

    resources = read_ptxas(a.ptxas)
    if not resources:
        print(f"check_launches: no ptxas report in {a.ptxas}: build the extension with CUDA (setup.py records them "
              "through scripts/nvcc_record.sh) or pass --ptxas DIR", file=sys.stderr)
        return 1
    failures, checked, refused, planned = check_cuda(Plans(a.source), resources)
    status = 0
    if failures:
        print(_report(failures))
        status = 1
    unplanned = sorted({k for k, _ in resources} - planned)
    if unplanned:  # a kernel no plan launches: its launches go unchecked
        print(f"FAIL kernels the build holds that no launch plan launches: {', '.join(unplanned)}")
        status = 1
    print(f"check_launches: CUDA: {checked} launches of {len(planned)} kernels checked on "
          f"{', '.join(x.name for x in ARCHS)} ({refused} inputs refused by their launcher), "
          f"{sum(c for c, _, _ in failures.values())} would fail")
    if not a.skip_triton:
        from ._check_triton import check_triton
        status |= check_triton(a.triton, ARCHS)
    return status


if __name__ == "__main__":
    sys.exit(main())
