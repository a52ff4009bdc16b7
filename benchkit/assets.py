"""Checkpoints and data files: located under BENCHKIT_HOME, verified by sha256, loaded safely.

Nothing is downloaded at run time. A missing file is a MissingAsset error naming the expected
path, where the file is published and (when known) its size or sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from benchkit.errors import MissingAsset


def home() -> Path:
    """BENCHKIT_HOME, default ~/.cache/benchkit."""
    return Path(os.environ.get("BENCHKIT_HOME") or Path.home() / ".cache" / "benchkit").expanduser()


@dataclass(frozen=True)
class Asset:
    relpath: str          # under BENCHKIT_HOME
    source: str           # where a user gets it (shown to people)
    sha256: str | None = None   # the published digest, where the publisher gives one
    size: int | None = None     # the published size in bytes, where known
    url: str | None = None      # the address `benchkit assets --download` fetches (None: a manual step)

    @property
    def path(self) -> Path:
        return home() / self.relpath

    def describe(self) -> str:
        facts = [f"sha256 {self.sha256}" if self.sha256 else "", f"{self.size:,} bytes" if self.size else ""]
        extra = ", ".join(f for f in facts if f)
        return f"{self.path} (from {self.source}{'; ' + extra if extra else ''})"

    def require(self, path: str | Path | None = None) -> Path:
        """The file's path (an explicit `path` overrides the default location); checked."""
        p = Path(path).expanduser() if path else self.path
        if not p.exists():
            raise MissingAsset(f"missing file {p}: get it from {self.source}"
                               + (f" (sha256 {self.sha256})" if self.sha256 else "")
                               + ("" if path else " and place it there, or set BENCHKIT_HOME"))
        if self.sha256 and p.is_file():
            verify_sha256(p, self.sha256)
        return p


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """The file's sha256, computed once per (path, size, modification time): a 2 GB checkpoint is
    hashed once, not on every run. The cache lives in BENCHKIT_HOME/sha256-cache.json."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(digest := cache.get(key), str):
        return digest
    digest = sha256_file(p)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")} | {key: digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        tmp.replace(cache_file)
    except OSError:
        pass   # a read-only BENCHKIT_HOME costs a re-hash next time, nothing more
    return digest


LEDGER = "sha256sums"   # in BENCHKIT_HOME, `sha256sum` format: digests recorded where none is published


def recorded_digest(path: str | Path) -> str | None:
    """The digest recorded for this file when it was downloaded (files without a published one)."""
    p = str(Path(path).resolve())
    try:
        lines = (home() / LEDGER).read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        digest, _, name = line.partition("  ")
        if name == p:
            found = digest
    return found


def record_digest(path: str | Path, digest: str) -> None:
    """Remember a downloaded file's digest (the last record of a path wins)."""
    ledger = home() / LEDGER
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a") as f:
        f.write(f"{digest}  {Path(path).resolve()}\n")


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise MissingAsset(f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupt or not the published one")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never executing pickled code (checksums are
    checked where the file is located: Asset.require)."""
    path = Path(path)
    if not path.is_file():
        raise MissingAsset(f"missing file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files and pickles with code both land here
        raise MissingAsset(f"{path}: cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def suite_assets(suite, path: str) -> list[tuple[str, Asset, Path]]:
    """(where in the suite, asset, resolved path) for every file the suite's components declare."""
    from benchkit import registry

    out = []
    comps = [("datasets", "dataset", suite.dataset)]
    comps += [(k, f"{k}[{i}]", c) for k in ("classifiers", "defenses", "attacks") for i, c in enumerate(getattr(suite, k))]
    for kind, where, comp in comps:
        entry = registry.get(kind).get(comp.plugin)
        if entry.assets is None:
            continue
        params = entry.validate(comp.params, f"{path}: {where}")
        for asset, explicit in entry.assets(params):
            out.append((f"{path}: {where}", asset, Path(explicit).expanduser() if explicit else asset.path))
    return out


def checklist(items: list[tuple[str, Asset, Path]]) -> list[str]:
    """One line per file, whatever number of components need it (each place is named)."""
    places: dict[Path, tuple[Asset, list[str]]] = {}
    for where, asset, p in items:
        places.setdefault(p, (asset, []))[1].append(where)
    lines = []
    for p, (asset, wheres) in places.items():
        mark = "ok     " if p.exists() else "MISSING"
        facts = "; ".join(f for f in (f"sha256 {asset.sha256}" if asset.sha256 else "",
                                      f"{asset.size:,} bytes" if asset.size else "") if f)
        lines.append(f"[{mark}] {p}  <- {asset.source}{'  (' + facts + ')' if facts else ''}  [{_places(wheres)}]")
    return lines


def _places(wheres: list[str]) -> str:
    # 'suite.yaml: defenses[1], defenses[2]' rather than the file name twice.
    file = wheres[0].split(": ", 1)[0]
    if all(w.split(": ", 1)[0] == file and ": " in w for w in wheres):
        return f"{file}: " + ", ".join(dict.fromkeys(w.split(": ", 1)[1] for w in wheres))
    return "; ".join(dict.fromkeys(wheres))
