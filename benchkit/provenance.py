"""What produced a run: versions, git state, device, the resolved suite and its hash."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import benchkit
from benchkit.plugins import plugin_info


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect(device: torch.device, suite_hash: str, seed: int) -> dict:
    root = Path(benchkit.__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {
        "benchkit": benchkit.__version__,
        "plugins": {p["name"]: p["version"] for p in plugin_info()},
        "git_commit": commit, "git_dirty": bool(status) if status is not None else None,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device),
        # With the ray executor the driver may have no GPU: the device then runs on the cluster.
        "device_name": (torch.cuda.get_device_name(device) if torch.cuda.is_available() else "on the Ray cluster")
                       if device.type == "cuda" else platform.processor() or "cpu",
        "suite_hash": suite_hash, "seed": seed,
    }
