"""What produced a run: versions, git state, device, the resolved suite and its hash, the digest of
every file it loads; and, for a cell recomputed under a new configuration, what changed."""
from __future__ import annotations

import json
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


def collect(device: torch.device, suite_hash: str, seed: int, resolved=None) -> dict:
    """The run's provenance; with the resolved suite, also `files`: {path: sha256} of every file its
    components declare."""
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
        **({"files": files(resolved)} if resolved is not None else {}),
    }


def files(resolved) -> dict[str, str]:
    """{path: sha256} of every file the suite's components declare that is on disk (data sets,
    checkpoints, the zoo's shipped weights), hashed on the driver once per file."""
    from benchkit.assets import digest_if_file

    return {str(path.resolve()): digest for _, _, path in resolved.assets()
            if (digest := digest_if_file(path)) is not None}


_ROLES = ("dataset", "classifier", "defense", "attack")


def config_changes(old: dict, new: dict) -> str | None:
    """How cell configuration `new` differs from `old` when it differs only in its files' digests or its
    plugins' versions (resolve.Cell.config), in words: `weights changed since these results (defense
    'diffpure': digits_unet.safetensors 1a2b3c4d… -> 5e6f7a8b…)`, `plugin code changed since these
    results (attacks 0.1.0 -> 0.2.0)`. None when anything else differs too (another configuration, not
    a change of weights or code) or nothing does."""
    new = json.loads(json.dumps(new))   # as stored: lists, not tuples
    rest = lambda c: {k: v for k, v in c.items() if k not in ("files", "plugins")}
    if rest(old) != rest(new):
        return None
    what, details = [], []
    changed = {r: _file_changes(old.get("files", {}).get(r, {}), new.get("files", {}).get(r, {})) for r in _ROLES}
    if roles := [r for r in _ROLES if changed[r]]:
        what.append("data" if roles == ["dataset"] else "weights and data" if "dataset" in roles else "weights")
        details += [f"{_role(new, r)}: {', '.join(changed[r])}" for r in roles]
    before, now = old.get("plugins", {}), new.get("plugins", {})
    if plugins := [f"{name} {before.get(name) or '?'} -> {now.get(name) or '?'}"
                   for name in sorted({*before, *now}) if before.get(name) != now.get(name)]:
        what.append("plugin code")
        details += plugins
    return f"{' and '.join(what)} changed since these results ({'; '.join(details)})" if what else None


def _file_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    # One entry per declared file whose digest differs: "name 1a2b3c4d… -> 5e6f7a8b…".
    short = lambda d: f"{d[:8]}…" if d else "none"
    return [f"{Path(rel).name} {short(before.get(rel))} -> {short(now.get(rel))}"
            for rel in sorted({*before, *now}) if before.get(rel) != now.get(rel)]


def _role(config: dict, role: str) -> str:
    # "defense 'diffpure'"; the dataset has no id: its plugin names it.
    return f"dataset '{config['dataset']['plugin']}'" if role == "dataset" else f"{role} '{config[role]['id']}'"
