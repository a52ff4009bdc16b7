"""Checkpoints and data files: located under BENCHKIT_HOME, verified by sha256, loaded safely.

Nothing is downloaded at run time. A missing file is a MissingAsset error naming the expected
path, where the file is published and (when known) its size or sha256.
"""
from __future__ import annotations

import functools
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
    # Checked by `benchkit assets --download` where the publisher gives no sha256 (benchkit/download.py):
    md5: str | None = None            # a published md5 of the file (e.g. torchvision's for CIFAR-10 and CelebA)
    sha256_prefix: str | None = None  # the start of the sha256 that the published file name carries
                                      # (torch.hub's check_hash convention: resnet50-0676ba61.pth)
    # Files the publisher ships inside an archive: fetched once, only the needed members extracted.
    archive: str | None = None        # the archive's address (then `url` is None)
    member: str | None = None         # the file's path inside it (a unique '/'-suffix of a member name is enough)
    archive_md5: str | None = None    # the archive's published md5

    @property
    def path(self) -> Path:
        return home() / self.relpath

    def describe(self) -> str:
        facts = [f"sha256 {self.sha256}" if self.sha256 else "", f"{self.size:,} bytes" if self.size else ""]
        extra = ", ".join(f for f in facts if f)
        return f"{self.path} (from {self.source}{'; ' + extra if extra else ''})"

    def require(self, path: str | Path | None = None, *, published: bool = True) -> Path:
        """The file's path (an explicit `path` overrides the default location), checked: present,
        not empty and, when `published` (the file claims to be the published one), of the published
        size and sha256 where those are declared. MissingAsset, one line naming the file, otherwise."""
        p = Path(path).expanduser() if path else self.path
        if not p.exists():
            raise MissingAsset(f"missing file {p}: get it from {self.source}"
                               + (f" (sha256 {self.sha256})" if self.sha256 else "")
                               + ("" if path else " and place it there, or set BENCHKIT_HOME"))
        if not p.is_file():
            return p   # a folder (a data set): its files are checked by the plugin that reads them
        size = p.stat().st_size
        if size == 0:
            raise MissingAsset(f"{p}: empty (0 bytes); is the download complete?")
        if published and self.size and size != self.size:
            raise MissingAsset(f"{p}: {size:,} bytes but the published file is {self.size:,}; the download is "
                               "incomplete or it is another file")
        if published:
            self._verify_digest(p)
        return p

    def _verify_digest(self, p: Path) -> None:
        """The published sha256, else the prefix its file name carries, else the digest recorded when
        it was downloaded: a file swapped for another (a random init of the right shapes) is refused."""
        if self.sha256:
            verify_sha256(p, self.sha256)
            return
        recorded = recorded_digest(p)
        if not (self.sha256_prefix or recorded):
            return
        actual = file_digest(p)
        if self.sha256_prefix and not actual.startswith(self.sha256_prefix):
            raise MissingAsset(f"{p}: sha256 {actual[:16]}…, but the published file's starts with {self.sha256_prefix} "
                               "(its name says so); the file is corrupt or not the published one")
        if recorded and actual != recorded:
            raise MissingAsset(f"{p}: changed since it was downloaded (sha256 {recorded[:16]}… recorded in "
                               f"{home() / LEDGER}, now {actual[:16]}…): delete it and run `benchkit assets SUITE "
                               "--download`, or, if you replaced it on purpose, remove its line there")


def hash_file(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file read in 1 MiB blocks (sha256; md5 where a publisher gives only that)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return hash_file(path)


_DIGESTS: dict[str, str] = {}   # this process's digests by cache key: the cache file is read once per file


def file_digest(path: str | Path) -> str:
    """The file's sha256, computed once per (path, size, modification time): a 2 GB checkpoint is
    hashed once, not on every run. The cache lives in BENCHKIT_HOME/sha256-cache.json."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache_file = home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(digest := cache.get(key), str):
        _DIGESTS[key] = digest
        return digest
    digest = _DIGESTS[key] = sha256_file(p)
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
    actual = file_digest(path)   # cached: a 2 GB checkpoint is hashed once, not on every run
    if actual != expected:
        raise MissingAsset(f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupt or not the published one")


def digest_if_file(path: str | Path) -> str | None:
    """file_digest of a regular file; None for a folder or a missing path, which have no digest."""
    p = Path(path).expanduser()
    return file_digest(p) if p.is_file() else None


def declared_digests(items: list[tuple[Asset, str | Path | None]]) -> dict[str, str]:
    """{asset relpath: sha256} of the declared files that are on disk (a component's `assets(params)`).
    Keyed by the relpath, not where the file lies, so moving BENCHKIT_HOME changes no key."""
    out = {}
    for asset, explicit in items:
        digest = digest_if_file(Path(explicit).expanduser() if explicit else asset.path)
        if digest is not None:
            out[asset.relpath] = digest
    return out


class DoesNotFit(MissingAsset, ValueError):
    """A checkpoint whose tensors do not fit the architecture (bad input, and a ValueError for
    callers that load a state themselves)."""


def _reason(exc: BaseException) -> str:
    """An exception in a few words: its type and the first sentence of its first line."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text.split(". ")[0].rstrip(".")[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@functools.lru_cache(maxsize=1)
def _data_globals() -> frozenset[str]:
    # What torch's weights-only unpickler rebuilds tensors with; anything else is code to call.
    try:
        from torch import _weights_only_unpickler as wou

        return frozenset(wou._get_allowed_globals())
    except (ImportError, AttributeError):   # a torch without that private helper: judge by module
        return frozenset()


def _is_data_global(name: str) -> bool:
    return name in _data_globals() or name.startswith("torch.") or name in ("collections.OrderedDict", "builtins.set")


def pickled_callables(path: str | Path) -> list[str]:
    """The globals (module.name) that a torch file's pickle would call beyond torch's tensor rebuilders:
    what makes unpickling run code. Read from the opcodes, nothing is executed; [] when the file holds
    no readable pickle."""
    import io
    import pickletools
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                stream = io.BytesIO(z.read(name)) if name else io.BytesIO()
        else:
            stream = io.BytesIO(path.read_bytes()[: 64 << 20])   # a legacy file: its pickles come first
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    names: list[str] = []
    for _ in range(4):   # a legacy torch file is several pickles in a row (magic, version, info, data)
        strings: list[str | None] = []
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
        except Exception:  # noqa: BLE001 - a truncated or foreign stream: keep what was read
            break
        if stream.tell() >= len(stream.getbuffer()):
            break
    return [n for n in dict.fromkeys(names) if not _is_data_global(n)]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (or a checkpoint's dict) from safetensors or a torch file, never executing pickled
    code. Every failure is one line naming the file: empty, truncated or not a checkpoint, or
    holding pickled code. (Sizes and checksums are checked where the file is located: Asset.require.)"""
    path = Path(path)
    if not path.is_file():
        raise MissingAsset(f"missing file {path}")
    if path.stat().st_size == 0:
        raise MissingAsset(f"{path}: empty (0 bytes); is the download complete?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError: the file, not the code
            raise MissingAsset(f"{path}: truncated or not a safetensors file ({_reason(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated files and pickles with code both land here
        code = pickled_callables(path)
        if code:
            raise MissingAsset(f"{path}: holds pickled code, which benchkit never runs; it would call {code[0]}: "
                               "use the published file, or a .safetensors copy of its tensors") from None
        raise MissingAsset(f"{path}: truncated or not a torch checkpoint ({_reason(exc)})") from None


def state_mismatch(module: torch.nn.Module, state: object) -> str | None:
    """Why `state` does not load strictly into `module`, in a few words, or None when it fits:
    `3 missing keys (e.g. 'x'), 2 unexpected (e.g. 'y'), shape of 'z' is [3, 3] but the model has [64, 3]`."""
    from collections.abc import Mapping

    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a state dict"
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted((k for k in state if k not in expected), key=str)
    common = [k for k in expected if k in state]
    not_tensor = [k for k in common if not isinstance(state[k], torch.Tensor)]
    wrong = [k for k in common if k not in not_tensor and list(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if not_tensor:
        k = not_tensor[0]
        parts.append(f"{k!r} is a {type(state[k]).__name__}, not a tensor"
                     + (f" ({len(not_tensor) - 1} more)" if len(not_tensor) > 1 else ""))
    if wrong:
        k = wrong[0]
        parts.append(f"shape of {k!r} is {list(state[k].shape)} but the model has {expected[k]}"
                     + (f" ({len(wrong) - 1} more wrong shapes)" if len(wrong) > 1 else ""))
    return ", ".join(parts) or None


def unfit(module: torch.nn.Module, state: object) -> str | None:
    """None once `state` is loaded strictly into `module`; else why it does not fit, in a few words
    (state_mismatch, or what load_state_dict itself refused)."""
    problem = state_mismatch(module, state)
    if problem is None:
        try:
            module.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:   # beyond the key and shape check
            problem = _reason(exc)
    return problem


def does_not_fit(path: str | Path, what: str, problem: str) -> DoesNotFit:
    """The one line for a checkpoint that does not fit: `PATH: does not fit WHAT: PROBLEM; is it the published file?`."""
    return DoesNotFit(f"{path}: does not fit {what}: {problem}; is it the published file?")


def load_into(module: torch.nn.Module, state: object, path: str | Path, what: str) -> torch.nn.Module:
    """module.load_state_dict(state), strict; DoesNotFit in one line naming the file when the tensors do
    not fit (`what`, e.g. "the ddpmpp architecture")."""
    if (problem := unfit(module, state)) is not None:
        raise does_not_fit(path, what, problem)
    return module


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
