"""Measured peaks (once per run) and the reproducibility header."""
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import _env
from .cases import DTYPE_NAMES
from .timing import time_fns


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense matmul throughput in `dtype`
    (fp32 on CPU): the ceilings that `pct_peak` is a percentage of."""
    cuda = device.type == "cuda"
    numel = (1 << 30 if cuda else 1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU: far beyond any cache
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fns([lambda: dst.copy_(src)], device, quick)
    del src, dst
    n = 8192 if cuda else 1024
    mm_dtype = dtype if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_mm = time_fns([lambda: torch.mm(a, b)], device, quick)
    return {
        "copy_gbps": 2 * numel * 4 / t_copy.median_ms / 1e6,
        "matmul_tflops": 2 * n**3 / t_mm.median_ms / 1e9,
        "matmul_shape": f"{n}x{n}x{n}",
        "matmul_dtype": DTYPE_NAMES[mm_dtype],
    }


def _nvidia_smi(fields: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit (+dirty) when running from one (editable installs): the commit
    recorded at build time goes stale as the tree moves on."""
    import vtattn

    git = ["git", "-C", str(Path(vtattn.__file__).parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def header(device: torch.device) -> dict[str, Any]:
    import vtattn

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        info = vtattn.info()
    except Exception as e:  # the header must never stop a run
        info = {"error": repr(e)}
    h = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "vtattn": info.get("vtattn") or info.get("version") or vtattn.__version__,
        # VTATTN_GIT_COMMIT: for a copy of the tree without .git (a lent GPU machine).
        "git_commit": _env.get("VTATTN_GIT_COMMIT") or _git_commit() or info.get("build", {}).get("git_commit"),
        "vtattn_info": info,
    }
    if device.type == "cuda":
        # Clocks are read as they are; the benchmark never changes them.
        h["driver"] = _nvidia_smi("driver_version")
        h["clocks_mhz"] = _nvidia_smi("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem")
        h["clocks_fields"] = "sm, mem, max sm, max mem"
    else:
        h["cpu_threads"] = torch.get_num_threads()
        h["cpu_count"] = os.cpu_count()
        try:  # other processes' load: the header says how busy the machine was
            h["load_avg"] = round(os.getloadavg()[0], 2)
        except OSError:
            h["load_avg"] = None
    return h
