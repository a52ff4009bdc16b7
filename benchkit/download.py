"""`benchkit assets SUITE... --download`: fetch every missing file the suites declare.

A file is written to `<path>.part`, continued with an HTTP Range request when a transfer is cut
(within the command, and by running the same command again), checked against what its publisher
gives (size, sha256, md5, the sha256 prefix in the file name) and only then moved into place with
os.replace: a file at the expected path is always whole. Where no sha256 is published, the one of
the bytes received is recorded in BENCHKIT_HOME/sha256sums and printed.

Files published inside an archive (CIFAR-10's tar.gz, gan-ensembling's zip) are fetched once per
archive into BENCHKIT_HOME/downloads/ and only the needed members are extracted (tarfile's 'data'
filter: no member lands outside its folder, no links, no devices); the archive is deleted once
every needed member is in place. Google Drive does not serve large files to a plain GET: those go
through gdown when it is installed (it comes with the robustbench extra), else they are a manual
step, as is data behind a licence (ImageNet, CelebA-HQ). Nothing here runs at `benchkit run` time.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Iterator, TextIO

from benchkit.assets import LEDGER, Asset, file_digest, hash_file, home, record_digest
from benchkit.errors import BadInput

CHUNK = 1 << 20
TIMEOUT = 60.0       # seconds without a byte before a transfer counts as cut
ATTEMPTS = 4         # transfers of one file per command; each continues where the last one stopped
RETRY_DELAY = 2.0    # seconds before the next attempt, times the attempt number
USER_AGENT = "benchkit-assets (python urllib)"
DRIVE_HOSTS = {"drive.google.com", "docs.google.com", "drive.usercontent.google.com"}


class Failed(Exception):
    """A file that could not be put in place: the one line that says why and what to do."""


class _Cut(Exception):
    """The transfer stopped before the end: worth another attempt from where it stopped."""


# ---------------------------------------------------------------- the command

def download_all(items: list[tuple[str, Asset, Path]], *, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
    """Put every declared file in place. One stdout line per file (`[ok     ]`, `[fetched]`),
    progress on `err`; BadInput with one line per file that is still missing at the end."""
    out, err = out or sys.stdout, err or sys.stderr
    progress = _Progress(err)
    places: dict[Path, Asset] = {}
    for _, asset, path in items:
        places.setdefault(path, asset)
    problems: list[str] = []
    archives: dict[str, list[tuple[Path, Asset]]] = {}
    for path, asset in places.items():
        if not path.exists() and asset.archive:
            archives.setdefault(asset.archive, []).append((path, asset))
    from_archives = {path for members in archives.values() for path, _ in members}
    for path, asset in places.items():
        if path in from_archives:
            if path == archives[asset.archive][0][0]:   # all of one archive's members at the first one's turn
                problems += _archive(asset.archive, archives[asset.archive], progress, out)
            continue
        try:
            if path.exists():
                print(f"[ok     ] {path}{_present(path, asset)}", file=out, flush=True)
            else:
                _fetch(path, asset, progress, out)
        except Failed as exc:
            problems.append(str(exc))
    if problems:
        raise BadInput(problems)


def _present(path: Path, asset: Asset) -> str:
    """A file already there, checked against what is declared (a folder is a data set: its plugin checks it)."""
    if not path.is_file():
        return ""
    problem, passed = _check(asset, path.stat().st_size, file_digest(path) if _wants_sha(asset) else None,
                             hash_file(path, "md5") if asset.md5 else None)
    if problem:
        raise Failed(f"{path}: {problem}; delete it and run the same command again to download it anew")
    return f"  ({passed})" if passed else ""


def _fetch(path: Path, asset: Asset, progress: _Progress, out: TextIO) -> None:
    if not asset.url:
        raise Failed(f"{path}: not published at a direct download address: get it from {asset.source} "
                     "and place it there")
    if urllib.parse.urlparse(asset.url).scheme not in ("http", "https"):
        raise Failed(f"{path}: {asset.url} is not an http(s) address: get the file from {asset.source} and place it there")
    part = _part(path)
    _mkdir(path)
    with _locked(part, path) as f:
        _fetch_into(asset.url, f, part, path, asset.size, progress)
        _put_in_place(part, path, asset, asset.url, out)


def _fetch_into(url: str, f: IO[bytes], part: Path, path: Path, size: int | None, progress: _Progress) -> None:
    """Complete the locked `.part` behind `f` from `url`: through gdown for Google Drive, else HTTP."""
    drive = _drive(url)
    if drive is not None:
        _fetch_drive(url, drive, path, part, f, progress)
    else:
        _fetch_http(url, f, size, path, progress)
    f.flush()


def _put_in_place(part: Path, path: Path, asset: Asset, origin: str, out: TextIO, verb: str = "fetched") -> None:
    """Check the finished `.part` against what is declared, then move it into place (or delete it)."""
    sha = hashlib.sha256()
    md5 = hashlib.md5() if asset.md5 else None
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            sha.update(block)
            if md5 is not None:
                md5.update(block)
    size, digest = part.stat().st_size, sha.hexdigest()
    problem, passed = _check(asset, size, digest, md5.hexdigest() if md5 else None)
    if problem:
        part.unlink(missing_ok=True)
        raise Failed(f"{path}: {problem} in what {origin} served; not put in place (the partial file is deleted): "
                     "run the same command again; if it says so again, the address serves another file")
    os.replace(part, path)
    facts = [f"{size:,} bytes"] + ([passed] if passed else [])
    if not asset.sha256:   # nothing published to hold it to later: remember what was received
        record_digest(path, digest)
        facts.append(f"sha256 {digest} recorded in {home() / LEDGER}")
    print(f"[{verb:7}] {path}  ({'; '.join(facts)})", file=out, flush=True)


def _mkdir(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Failed(f"{path}: cannot create {path.parent} ({exc.strerror or exc}); make it writable or set "
                     "BENCHKIT_HOME") from None


def _wants_sha(asset: Asset) -> bool:
    return bool(asset.sha256 or asset.sha256_prefix)


def _check(asset: Asset, size: int, sha256: str | None, md5: str | None) -> tuple[str | None, str]:
    """(the first mismatch with what is declared, or None; the checks that passed, '' when none is declared)."""
    if asset.size and size != asset.size:
        return f"it has {size:,} bytes, the published file {asset.size:,}", ""
    passed = []
    if asset.sha256:
        if sha256 != asset.sha256:
            return f"sha256 mismatch (expected {asset.sha256}, got {sha256})", ""
        passed.append("sha256 verified")
    elif asset.sha256_prefix:
        if not (sha256 or "").startswith(asset.sha256_prefix):
            return f"sha256 mismatch (the published file's starts with {asset.sha256_prefix}, got {sha256})", ""
        passed.append(f"sha256 prefix {asset.sha256_prefix} verified")
    if asset.md5:
        if md5 != asset.md5:
            return f"md5 mismatch (expected {asset.md5}, got {md5})", ""
        passed.append("md5 verified")
    return None, "; ".join(passed)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


@contextlib.contextmanager
def _locked(part: Path, path: Path) -> Iterator[IO[bytes]]:
    """The `.part` file opened for appending, locked: two commands never write the same file."""
    try:
        f = open(part, "ab")
    except OSError as exc:
        raise Failed(f"{path}: cannot write {part} ({exc.strerror or exc}); make the folder writable or set "
                     "BENCHKIT_HOME") from None
    with f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:   # not POSIX: no lock, as before
            pass
        except OSError:
            raise Failed(f"{path}: another process is downloading it into {part}; wait for it to finish") from None
        try:
            yield f
        finally:
            with contextlib.suppress(OSError):   # a failure before the first byte leaves no empty .part behind
                if part.stat().st_size == 0:
                    part.unlink()


# ---------------------------------------------------------------- HTTP with resume

def _fetch_http(url: str, f: IO[bytes], size: int | None, path: Path, progress: _Progress) -> None:
    """Complete the `.part` behind `f` from `url`, continuing a cut transfer with a Range request."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(url, f, size, path, progress)
            return
        except _Cut as exc:
            cut = str(exc)
            if attempt < ATTEMPTS:
                time.sleep(RETRY_DELAY * attempt)
    raise Failed(f"{path}: the transfer from {url} was cut {ATTEMPTS} times ({cut}); run the same command "
                 f"again to continue from the {os.fstat(f.fileno()).st_size:,} bytes kept in {_part(path)}")


def _transfer(url: str, f: IO[bytes], size: int | None, path: Path, progress: _Progress) -> None:
    offset = os.fstat(f.fileno()).st_size
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:   # the .part already holds the whole file, or is not a prefix of it
            total = _range_total(exc.headers.get("Content-Range", ""))
            if total == offset:
                return
            _restart(f)
            raise _Cut(f"the server refused to continue from byte {offset:,}; starting over") from None
        raise Failed(f"{path}: {url} answered HTTP {exc.code} {exc.reason}; the address may have moved: "
                     "get the file from its publisher and place it there") from None
    except urllib.error.URLError as exc:
        raise Failed(f"{path}: cannot reach {url}: {_why(exc.reason)}; check the network (or a proxy: "
                     "https_proxy) and run the same command again") from None
    except ValueError as exc:   # http.client.InvalidURL and urllib's unknown url types
        raise Failed(f"{path}: {url} is not a valid address ({_why(exc)}); get the file from its publisher") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Cut(_why(exc)) from None
    with resp:
        if resp.status == 206 and _range_start(resp.headers.get("Content-Range", "")) != offset:
            _restart(f)   # another range than asked for: its bytes do not continue the .part
            raise _Cut(f"the server answered another range than bytes={offset}-; starting over")
        if offset and resp.status != 206:
            _restart(f)   # it ignored the Range and sends the whole file (200): start over
            offset = 0
        length = _int(resp.headers.get("Content-Length"))
        total = offset + length if length is not None else size
        bar = progress.bar(path, url, total, offset)
        got = 0
        try:
            while True:
                try:
                    chunk = resp.read1(CHUNK)   # what has arrived: a reset loses no more than that
                except (OSError, http.client.HTTPException) as exc:
                    raise _Cut(f"after {offset + got:,} bytes: {_why(exc)}") from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise Failed(f"{path}: cannot write {_part(path)} ({exc.strerror or exc}); free some space "
                                 "and run the same command again to continue") from None
                got += len(chunk)
                bar.update(len(chunk))
        finally:
            f.flush()   # the next attempt continues from the size on disk
            bar.close()
        if length is not None and got < length:
            raise _Cut(f"the connection closed after {offset + got:,} of {offset + length:,} bytes")


def _restart(f: IO[bytes]) -> None:
    f.flush()
    f.truncate(0)   # an "ab" file appends at the new end, so writing starts at byte 0


def _range_start(content_range: str) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(m[1]) if m else None


def _range_total(content_range: str) -> int | None:
    m = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", content_range.strip())
    return int(m[1]) if m else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _why(reason: object) -> str:
    """A network error in words a user acts on."""
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT:.0f} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text[:200]


# ---------------------------------------------------------------- Google Drive

def _drive(url: str) -> tuple[str, str | None] | None:
    """('file' | 'folder', id) for a Google Drive address; None for any other."""
    parts = urllib.parse.urlparse(url)
    if parts.hostname not in DRIVE_HOSTS:
        return None
    if m := re.search(r"/folders/([\w-]+)", parts.path):
        return "folder", m[1]
    if m := re.search(r"/file/d/([\w-]+)", parts.path):
        return "file", m[1]
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return "file", ids[0] if ids else None


def _fetch_drive(url: str, drive: tuple[str, str | None], path: Path, part: Path, f: IO[bytes],
                 progress: _Progress) -> None:
    kind, drive_id = drive
    what = f"save its {path.name} here" if kind == "folder" else "save it here"
    manual = f"open {url} in a browser and {what}"
    try:
        import gdown
    except ImportError:
        raise Failed(f"{path}: not downloadable with a plain HTTP GET (Google Drive): {manual} "
                     "(or pip install gdown and run the same command again)") from None
    if drive_id is None:
        raise Failed(f"{path}: a Google Drive address without a file id: {manual}")
    quiet = not progress.tty
    if kind == "file":
        # gdown takes the (locked) .part as its own temporary file: resume=True continues it with a Range
        result, why = _gdown(lambda: gdown.download(id=drive_id, output=str(part), quiet=quiet, resume=True))
        if not result or not part.is_file() or part.stat().st_size == 0:
            raise Failed(f"{path}: Google Drive did not serve it through gdown ({why}): {manual}")
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        result, why = _gdown(lambda: gdown.download_folder(id=drive_id, output=str(staging), quiet=quiet,
                                                           use_cookies=False))
        found = sorted(p for p in staging.rglob(path.name) if p.is_file())
        if not result or not found:
            held = sorted(p.name for p in staging.rglob("*") if p.is_file())
            if held:
                why = f"the folder holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}, no {path.name}"
            raise Failed(f"{path}: Google Drive did not serve it through gdown ({why}): {manual}")
        if len(found) > 1:
            raise Failed(f"{path}: the Google Drive folder {url} holds {len(found)} files named {path.name}: {manual}")
        _restart(f)
        with open(found[0], "rb") as src:
            shutil.copyfileobj(src, f, CHUNK)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gdown(call) -> tuple[object, str]:
    """(what gdown returned, why it saved nothing). gdown raises its own exception types (quota
    exceeded, permission, requests' errors) or returns None, depending on its version: any of them
    means Drive did not serve the file."""
    try:
        return call(), "nothing was saved"
    except Exception as exc:  # noqa: BLE001 - see above
        return None, _why(exc)


# ---------------------------------------------------------------- archives

def _archive(url: str, members: list[tuple[Path, Asset]], progress: _Progress, out: TextIO) -> list[str]:
    """Fetch the archive once, extract each needed member into place; one problem line per member
    that could not be put in place."""
    first = members[0][1]
    store = home() / "downloads" / _file_name(url)
    try:
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise Failed(f"{store}: {url} is not an http(s) address: get the archive from {first.source}")
        _mkdir(store)
        if not store.is_file():
            part = _part(store)
            with _locked(part, store) as f:
                _fetch_into(url, f, part, store, None, progress)
                if first.archive_md5 and (got := hash_file(part, "md5")) != first.archive_md5:
                    part.unlink(missing_ok=True)
                    raise Failed(f"{store}: md5 mismatch of the archive {url} (expected {first.archive_md5}, got "
                                 f"{got}); it was deleted: run the same command again")
                os.replace(part, store)
        elif first.archive_md5 and (got := hash_file(store, "md5")) != first.archive_md5:
            store.unlink()
            raise Failed(f"{store}: md5 mismatch of the archive kept there (expected {first.archive_md5}, got {got}); "
                         "it was deleted: run the same command again")
    except Failed as exc:   # the archive's problem, told once per file it holds (each names the archive's file)
        reason = str(exc).removeprefix(f"{store}: ")
        return [f"{path}: from the archive {store.name}: {reason}" for path, _ in members]
    problems = []
    try:
        with _Reader(store) as reader:
            for path, asset in members:
                try:
                    _mkdir(path)
                    _extract(reader, path, asset, url, out)
                except Failed as exc:
                    problems.append(str(exc))
    except Failed as exc:   # not an archive at all, or a truncated one
        store.unlink(missing_ok=True)
        return [f"{path}: not extracted: {exc}" for path, _ in members]
    if not problems:
        store.unlink(missing_ok=True)   # every needed member is in place; archives are large
    return problems


def _file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return re.sub(r"[^\w.-]", "_", name) or "archive"


class _Reader:
    """A tar (any compression) or zip archive: member names, and one member extracted safely."""

    def __init__(self, store: Path):
        self.store = store
        self.tar: tarfile.TarFile | None = None
        self.zip: zipfile.ZipFile | None = None

    def __enter__(self) -> _Reader:
        try:
            if zipfile.is_zipfile(self.store):
                self.zip = zipfile.ZipFile(self.store)
            else:
                self.tar = tarfile.open(self.store, "r:*")
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise Failed(f"{self.store} is not a readable tar or zip archive ({_why(exc)}); "
                         "it was deleted: run the same command again") from None
        return self

    def __exit__(self, *exc) -> None:
        for a in (self.tar, self.zip):
            if a is not None:
                a.close()

    def names(self) -> list[str]:
        try:
            if self.zip is not None:
                return [i.filename for i in self.zip.infolist() if not i.is_dir()]
            return [m.name for m in self.tar.getmembers() if not m.isdir()]
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise Failed(f"{self.store} is truncated or corrupt ({_why(exc)}); it was deleted: run the same "
                         "command again") from None

    def extract(self, name: str, staging: Path) -> Path:
        """The member as a regular file under `staging`; Failed for anything that is not one, or
        that would land outside `staging`."""
        if self.tar is not None:
            info = self.tar.getmember(name)
            if not info.isfile():
                raise _Unsafe(f"is a {_tar_kind(info)}, not a regular file")
            try:
                safe = tarfile.data_filter(info, str(staging))
                self.tar.extract(info, staging, filter="data")
            except tarfile.FilterError as exc:   # its message holds whole paths: say what kind of escape
                why = {"OutsideDestinationError": "it would land outside the folder it is extracted into",
                       "AbsolutePathError": "its path is absolute"}.get(type(exc).__name__, type(exc).__name__)
                raise _Unsafe(f"is refused by tarfile's 'data' filter ({why})") from None
            return staging / safe.name
        info = self.zip.getinfo(name)
        posix = PurePosixPath(name)
        if posix.is_absolute() or ".." in posix.parts or "\\" in name:
            raise _Unsafe("would land outside the folder it is extracted into")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _Unsafe("is a symbolic link, not a regular file")
        target = staging / "member"   # never a path taken from the archive
        with self.zip.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return target


class _Unsafe(Exception):
    pass


def _tar_kind(info: tarfile.TarInfo) -> str:
    return ("symbolic link" if info.issym() else "hard link" if info.islnk() else
            "device" if info.isdev() else "FIFO" if info.isfifo() else "special member")


def _member(names: list[str], member: str) -> list[str]:
    """Members named `member`, or ending in '/' + `member` (the publisher's top folder may vary)."""
    member = member.strip("/")
    exact = [n for n in names if n.removeprefix("./") == member]
    return exact or [n for n in names if n.endswith("/" + member)]


def _extract(reader: _Reader, path: Path, asset: Asset, url: str, out: TextIO) -> None:
    member = asset.member or path.name
    found = _member(reader.names(), member)
    if not found:
        raise Failed(f"{path}: {url} has no member {member}; get the file from {asset.source} and place it there")
    if len(found) > 1:
        raise Failed(f"{path}: {url} has {len(found)} members ending in {member} ({', '.join(found[:3])}); "
                     "extract the right one by hand and place it there")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            extracted = reader.extract(found[0], staging)
        except _Unsafe as exc:
            raise Failed(f"{path}: archive member {found[0]} of {url} {exc}; not extracted") from None
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise Failed(f"{path}: cannot extract {found[0]} from {url} ({_why(exc)}); run the same command "
                         "again") from None
        part = _part(path)
        os.replace(extracted, part)
        _put_in_place(part, path, asset, f"{url} ({found[0]})", out, verb="extracted")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- progress

class _Progress:
    """One tqdm bar per transfer on a terminal; otherwise (logs, CI) one line as each transfer starts,
    so a long download shows in the log while it runs (stdout says how each file ended)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def bar(self, path: Path, url: str, total: int | None, initial: int):
        if not self.tty:
            size = f"{total:,} bytes" if total is not None else "size unknown"
            print(f"benchkit: continuing {url} at byte {initial:,} of {size} -> {path}" if initial else
                  f"benchkit: downloading {url} ({size}) -> {path}", file=self.stream, flush=True)
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=path.name, unit="B", unit_scale=True, unit_divisor=1024,
                    file=self.stream, leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
