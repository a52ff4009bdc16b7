"""`benchkit assets SUITE --download` against a local HTTP server: full downloads with their checks,
resume after a cut connection (and from a server that ignores Range), refused checksums, hosts that
cannot be reached, 404s, archives with members that must not be extracted, Google Drive's manual
step (and gdown when installed, faked here) and nothing to do when every file is there.

No test reaches the internet: an autouse fixture refuses every name lookup and connection that is
not to this machine's loopback, and fails the test that tried."""
from __future__ import annotations

import hashlib
import http.server
import io
import ipaddress
import socket
import struct
import sys
import tarfile
import threading
import types
import zipfile
from pathlib import Path

import pytest

from benchkit import download, registry
from benchkit.assets import Asset, recorded_digest
from benchkit.cli import main
from benchkit.hookspecs import hookimpl
from benchkit.params import Params
from conftest import write
from malformed.contract import assert_one_line_errors

PAYLOAD = bytes(range(256)) * 40 + b"the end"          # 10,247 bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


# ---------------------------------------------------------------- no internet

@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Name lookups and connections only on the loopback; anything else is refused (a lookup as
    'does not resolve', a connection with an error) and fails the test unless it declared it."""
    tried: list[str] = []
    expected: set[str] = set()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK_NAMES and not _is_loopback(host):
            tried.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            tried.append(str(address[0]))
            raise ConnectionRefusedError(f"test refused a connection to {address[0]}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(download, "RETRY_DELAY", 0.0)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield expected
    assert set(tried) <= expected, f"a test tried to reach {sorted(set(tried) - expected)}"


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- a local server

class Server:
    """Serves `files` by path; per path it can cut the connection after N body bytes (one entry of
    `cuts` per response), ignore Range headers, or serve other bytes than `files` says."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, list[int]] = {}
        self.ignore_range: set[str] = set()
        self.reset: set[str] = set()   # cut with a TCP reset instead of a clean close
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if (rng := self.headers.get("Range")) and self.path not in server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cuts.get(self.path)
                if cuts:
                    self.wfile.write(body[:cuts.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    if self.path in server.reset:   # linger 0: close() sends RST, the reader gets ECONNRESET
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    else:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------- a suite whose dataset declares the files

ASSETS: dict[str, Asset] = {}


class FilesParams(Params):
    names: list[str] = []


class FilesPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("dl-files", lambda p: None, params=FilesParams,
                 assets=lambda p: [(ASSETS[n], None) for n in p.names])


@pytest.fixture
def suite(tmp_path, monkeypatch, plugin_manager):
    """A suite file whose dataset declares ASSETS[name] for each name given; BENCHKIT_HOME in tmp_path."""
    plugin_manager.register(FilesPlugin(), name="dl-files")
    registry.reset()
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    ASSETS.clear()

    def make(**assets: Asset) -> Path:
        ASSETS.update(assets)
        return write(tmp_path / "dl.yaml", f"""
suite: dl
dataset: {{plugin: dl-files, params: {{names: [{', '.join(assets)}]}}}}
classifiers: [{{id: cnn, plugin: digits-cnn}}]
defenses: [{{id: none, plugin: identity}}]
attacks: [{{id: aa, plugin: autoattack, params: {{eps: 0.3}}}}]
""")
    yield make
    registry.reset()


def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


PROGRESS = ("benchkit: downloading ", "benchkit: continuing ")


def fetch(capsys, suite_file: Path) -> tuple[int, list[str], str]:
    """`benchkit assets SUITE --download`: status, stdout lines without the shipped classifier's, and
    stderr without the progress lines (`progress` below)."""
    status = main(["assets", str(suite_file), "--download"])
    out = capsys.readouterr()
    fetch.progress = [line for line in out.err.splitlines() if line.startswith(PROGRESS)]
    err = "".join(line for line in out.err.splitlines(True) if not line.startswith(PROGRESS))
    return status, [line for line in out.out.splitlines() if "digits_cnn" not in line], err


# ---------------------------------------------------------------- HTTP

def test_a_file_is_fetched_checked_and_moved_into_place(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, size=len(PAYLOAD), url=server.url("/a.bin")))
    status, out, err = fetch(capsys, s)
    target = home(tmp_path) / "files" / "a.bin"
    assert status == 0, err
    assert target.read_bytes() == PAYLOAD and not (target.parent / "a.bin.part").exists()
    assert out == [f"[fetched] {target}  (10,247 bytes; sha256 verified)"]
    assert err == ""   # stderr is not a terminal here: one line as the transfer starts
    assert fetch.progress == [f"benchkit: downloading {server.url('/a.bin')} (10,247 bytes) -> {target}"]
    assert server.requests == [("/a.bin", None)]
    assert recorded_digest(target) is None   # a published digest needs no record


def test_without_a_published_digest_the_received_one_is_recorded_and_printed(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    s = suite(a=Asset("files/a.bin", "the test server", url=server.url("/a.bin")))
    status, out, _ = fetch(capsys, s)
    target = home(tmp_path) / "files" / "a.bin"
    assert status == 0
    assert out == [f"[fetched] {target}  (10,247 bytes; sha256 {SHA} recorded in {home(tmp_path) / 'sha256sums'})"]
    assert recorded_digest(target) == SHA


def test_on_a_terminal_each_file_gets_a_progress_bar(server, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    server.files["/a.bin"] = PAYLOAD
    asset = Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin"))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Terminal()
    download.download_all([("s.yaml: dataset", asset, asset.path)], out=out, err=err)
    assert "a.bin" in err.getvalue() and "10.0k" in err.getvalue() and "benchkit:" not in err.getvalue()
    assert out.getvalue().startswith(f"[fetched] {asset.path}  (10,247 bytes; sha256 verified)")


def test_a_cut_transfer_resumes_with_a_range_request(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    server.cuts["/a.bin"] = [3000]
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin")))
    status, out, err = fetch(capsys, s)
    assert status == 0, err
    assert (home(tmp_path) / "files" / "a.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=3000-")]
    assert fetch.progress[1] == (f"benchkit: continuing {server.url('/a.bin')} at byte 3,000 of 10,247 bytes -> "
                                 f"{home(tmp_path) / 'files' / 'a.bin'}")


def test_a_transfer_cut_every_time_keeps_its_bytes_and_the_next_command_continues(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    server.cuts["/a.bin"] = [1000] * download.ATTEMPTS
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin")))
    target = home(tmp_path) / "files" / "a.bin"
    status, out, err = fetch(capsys, s)
    assert_one_line_errors(status, err, [
        rf"^{target}: the transfer from {server.url('/a.bin')} was cut 4 times \(the connection closed after 4,000 "
        rf"of 10,247 bytes\); run the same command again to continue from the 4,000 bytes kept in {target}\.part$"])
    assert not target.exists() and (target.parent / "a.bin.part").read_bytes() == PAYLOAD[:4000]
    status, out, err = fetch(capsys, s)
    assert status == 0, err
    assert target.read_bytes() == PAYLOAD and not (target.parent / "a.bin.part").exists()
    assert server.requests[-1] == ("/a.bin", "bytes=4000-")


def test_a_reset_connection_resumes_from_what_reached_the_disk(server, suite, tmp_path, capsys):
    big = PAYLOAD * 64   # 655,808 bytes: more than one read's worth in flight when the reset comes
    server.files["/a.bin"] = big
    server.cuts["/a.bin"] = [200_000, 300_000]
    server.reset.add("/a.bin")
    s = suite(a=Asset("files/a.bin", "t", sha256=hashlib.sha256(big).hexdigest(), url=server.url("/a.bin")))
    status, _, err = fetch(capsys, s)
    assert status == 0, err
    assert (home(tmp_path) / "files" / "a.bin").read_bytes() == big
    assert len(server.requests) == 3   # what was read before each reset may or may not have reached the disk


def test_a_server_that_ignores_range_is_read_again_from_the_start(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    server.cuts["/a.bin"] = [3000]
    server.ignore_range.add("/a.bin")
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin")))
    status, _, err = fetch(capsys, s)
    assert status == 0, err
    assert (home(tmp_path) / "files" / "a.bin").read_bytes() == PAYLOAD   # not 3,000 bytes twice
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=3000-")]


def test_a_part_that_is_already_whole_is_finished_without_a_body(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    part = write(home(tmp_path) / "files" / "a.bin.part", "")
    part.write_bytes(PAYLOAD)
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin")))
    status, _, err = fetch(capsys, s)
    assert status == 0, err
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD)}-")]   # answered 416: nothing left to send


def test_a_wrong_checksum_is_refused_and_nothing_is_put_in_place(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD[::-1]
    s = suite(a=Asset("files/a.bin", "the test server", sha256=SHA, url=server.url("/a.bin")))
    status, out, err = fetch(capsys, s)
    target = home(tmp_path) / "files" / "a.bin"
    got = hashlib.sha256(PAYLOAD[::-1]).hexdigest()
    assert_one_line_errors(status, err, [
        rf"^{target}: sha256 mismatch \(expected {SHA}, got {got}\) in what {server.url('/a.bin')} served; not put "
        r"in place \(the partial file is deleted\): run the same command again; if it says so again, the address "
        r"serves another file$"])
    assert out == [] and not target.exists() and not (target.parent / "a.bin.part").exists()


def test_a_wrong_size_or_prefix_or_md5_is_refused(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    url = server.url("/a.bin")
    s = suite(a=Asset("files/a.bin", "t", size=5, url=url), b=Asset("files/b.bin", "t", sha256_prefix="ffff", url=url),
              c=Asset("files/c.bin", "t", md5="0" * 32, url=url),
              d=Asset("files/d.bin", "t", sha256_prefix=SHA[:8], md5=hashlib.md5(PAYLOAD).hexdigest(), url=url))
    status, out, err = fetch(capsys, s)
    files = home(tmp_path) / "files"
    tail = r" in what .* served; not put in place"
    assert_one_line_errors(status, err, [
        rf"^{files / 'a.bin'}: it has 10,247 bytes, the published file 5{tail}",
        rf"^{files / 'b.bin'}: sha256 mismatch \(the published file's starts with ffff, got {SHA}\){tail}",
        rf"^{files / 'c.bin'}: md5 mismatch \(expected 0{{32}}, got {hashlib.md5(PAYLOAD).hexdigest()}\){tail}"])
    assert out == [f"[fetched] {files / 'd.bin'}  (10,247 bytes; sha256 prefix {SHA[:8]} verified; md5 verified; "
                   f"sha256 {SHA} recorded in {home(tmp_path) / 'sha256sums'})"]
    assert sorted(p.name for p in files.iterdir()) == ["d.bin"]


def test_a_host_that_cannot_be_reached_is_one_line(server, suite, tmp_path, capsys, no_internet):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()   # nothing listens there now
    no_internet.add("nonexistent.invalid")
    s = suite(a=Asset("files/a.bin", "t", url=f"http://127.0.0.1:{port}/a.bin"),
              b=Asset("files/b.bin", "t", url="http://nonexistent.invalid/b.bin"))
    status, out, err = fetch(capsys, s)
    files = home(tmp_path) / "files"
    assert_one_line_errors(status, err, [
        rf"^{files / 'a.bin'}: cannot reach http://127\.0\.0\.1:{port}/a\.bin: the connection was refused; check the "
        r"network \(or a proxy: https_proxy\) and run the same command again$",
        rf"^{files / 'b.bin'}: cannot reach http://nonexistent\.invalid/b\.bin: the host name does not resolve; "])
    assert out == []


def test_a_404_is_one_line(server, suite, tmp_path, capsys):
    s = suite(a=Asset("files/a.bin", "t", url=server.url("/gone.bin")))
    status, _, err = fetch(capsys, s)
    assert_one_line_errors(status, err, [
        rf"^{home(tmp_path) / 'files' / 'a.bin'}: {server.url('/gone.bin')} answered HTTP 404 Not Found; the "
        r"address may have moved: get the file from its publisher and place it there$"])
    assert not (home(tmp_path) / "files" / "a.bin.part").exists()


# ---------------------------------------------------------------- manual steps and Google Drive

def test_files_without_an_address_and_google_drive_files_name_their_manual_step(suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)   # not installed
    s = suite(a=Asset("data/val", "the licensed data set (https://example.org/get)"),
              b=Asset("files/b.pth", "t", url="https://drive.google.com/file/d/1AbC-d_E/view?usp=sharing"),
              c=Asset("files/weights.pt", "t", url="https://drive.google.com/drive/folders/1FoLdEr"))
    status, out, err = fetch(capsys, s)
    h = home(tmp_path)
    assert_one_line_errors(status, err, [
        rf"^{h / 'data' / 'val'}: not published at a direct download address: get it from the licensed data set "
        r"\(https://example\.org/get\) and place it there$",
        rf"^{h / 'files' / 'b.pth'}: not downloadable with a plain HTTP GET \(Google Drive\): open "
        r"https://drive\.google\.com/file/d/1AbC-d_E/view\?usp=sharing in a browser and save it here \(or pip install "
        r"gdown and run the same command again\)$",
        rf"^{h / 'files' / 'weights.pt'}: not downloadable with a plain HTTP GET \(Google Drive\): open "
        r"https://drive\.google\.com/drive/folders/1FoLdEr in a browser and save its weights\.pt here "])


def test_google_drive_goes_through_gdown_when_it_is_installed(suite, tmp_path, capsys, monkeypatch):
    calls = []

    def fake_download(id, output, quiet, resume):
        calls.append(("file", id, resume))
        Path(output).write_bytes(PAYLOAD)
        return output

    def fake_folder(id, output, quiet, use_cookies):
        calls.append(("folder", id))
        write(Path(output) / "wrn" / "weights.pt", "").write_bytes(PAYLOAD)
        return [str(Path(output) / "wrn" / "weights.pt")]

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download, download_folder=fake_folder))
    s = suite(a=Asset("files/a.pth", "t", sha256=SHA, url="https://drive.google.com/uc?id=1XyZ"),
              b=Asset("files/weights.pt", "t", sha256=SHA, url="https://drive.google.com/drive/folders/1FoLdEr?usp=x"))
    status, out, err = fetch(capsys, s)
    assert status == 0, err
    assert calls == [("file", "1XyZ", True), ("folder", "1FoLdEr")]
    files = home(tmp_path) / "files"
    assert out == [f"[fetched] {files / 'a.pth'}  (10,247 bytes; sha256 verified)",
                   f"[fetched] {files / 'weights.pt'}  (10,247 bytes; sha256 verified)"]
    assert sorted(p.name for p in files.iterdir()) == ["a.pth", "weights.pt"]   # no staging folder left


def test_gdown_refusing_is_one_line(suite, tmp_path, capsys, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("Too many users have viewed or downloaded this file recently.\nPlease try later")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=refuse))
    s = suite(a=Asset("files/a.pth", "t", url="https://drive.google.com/uc?id=1XyZ"))
    status, _, err = fetch(capsys, s)
    assert_one_line_errors(status, err, [
        rf"^{home(tmp_path) / 'files' / 'a.pth'}: Google Drive did not serve it through gdown \(Too many users have "
        r"viewed or downloaded this file recently\. Please try later\): open https://drive\.google\.com/uc\?id=1XyZ "
        r"in a browser and save it here$"])


# ---------------------------------------------------------------- archives

def _tar_gz(members: dict[str, bytes], links: dict[str, str] = {}) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def test_an_archive_is_fetched_once_and_only_safe_members_are_extracted(server, suite, tmp_path, capsys):
    archive = _tar_gz({"top/batches/test_batch": PAYLOAD, "top/batches/data_batch_1": b"one", "../escape.bin": b"x"},
                      links={"top/batches/link": "/etc/passwd"})
    server.files["/data.tar.gz"] = archive
    common = dict(archive=server.url("/data.tar.gz"), archive_md5=hashlib.md5(archive).hexdigest())
    s = suite(t=Asset("cifar/test_batch", "t", md5=hashlib.md5(PAYLOAD).hexdigest(), member="batches/test_batch", **common),
              d=Asset("cifar/data_batch_1", "t", member="top/batches/data_batch_1", **common),
              e=Asset("cifar/escape.bin", "t", member="escape.bin", **common),
              l=Asset("cifar/link", "t", member="batches/link", **common))
    status, out, err = fetch(capsys, s)
    cifar, url = home(tmp_path) / "cifar", server.url("/data.tar.gz")
    assert_one_line_errors(status, err, [
        rf"^{cifar / 'escape.bin'}: archive member \.\./escape\.bin of {url} is refused by tarfile's 'data' filter "
        r"\(it would land outside the folder it is extracted into\); not extracted$",
        rf"^{cifar / 'link'}: archive member top/batches/link of {url} is a symbolic link, not a regular file; "
        r"not extracted$"])
    assert [line.split("  (")[0] for line in out] == [f"[extracted] {cifar / 'test_batch'}", f"[extracted] {cifar / 'data_batch_1'}"]
    assert "md5 verified" in out[0]
    assert (cifar / "test_batch").read_bytes() == PAYLOAD and (cifar / "data_batch_1").read_bytes() == b"one"
    assert sorted(p.name for p in cifar.iterdir()) == ["data_batch_1", "test_batch"]   # no staging left
    assert not list(tmp_path.rglob("escape.bin")) and not list(tmp_path.rglob("passwd"))
    assert server.requests == [("/data.tar.gz", None)]   # one download for every member
    # the archive is kept while a member is missing, so the next command does not fetch it again
    assert (home(tmp_path) / "downloads" / "data.tar.gz").is_file()


def test_an_archive_is_deleted_once_its_members_are_in_place_and_a_zip_member_is_found_by_suffix(server, suite, tmp_path,
                                                                                                   capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("results/pretrained_classifiers/celebahq/Eyeglasses/net_best.pth", PAYLOAD)
        z.writestr("results/pretrained_classifiers/celebahq/Smiling/net_best.pth", b"smile")
    server.files["/classifiers.zip"] = buf.getvalue()
    s = suite(e=Asset("celebahq/Eyeglasses/net_best.pth", "t", archive=server.url("/classifiers.zip"),
                      member="celebahq/Eyeglasses/net_best.pth"))
    status, out, err = fetch(capsys, s)
    target = home(tmp_path) / "celebahq" / "Eyeglasses" / "net_best.pth"
    assert status == 0, err
    assert target.read_bytes() == PAYLOAD
    assert out == [f"[extracted] {target}  (10,247 bytes; sha256 {SHA} recorded in {home(tmp_path) / 'sha256sums'})"]
    assert not (home(tmp_path) / "downloads" / "classifiers.zip").exists()


def test_an_archive_with_the_wrong_md5_is_refused_for_each_of_its_files(server, suite, tmp_path, capsys):
    server.files["/data.tar.gz"] = _tar_gz({"a": b"a", "b": b"b"})
    common = dict(archive=server.url("/data.tar.gz"), archive_md5="0" * 32)
    s = suite(a=Asset("x/a", "t", member="a", **common), b=Asset("x/b", "t", member="b", **common))
    status, out, err = fetch(capsys, s)
    x = home(tmp_path) / "x"
    pattern = (r": from the archive data\.tar\.gz: md5 mismatch of the archive http://127\.0\.0\.1:\d+/data\.tar\.gz "
               r"\(expected 0{32}, got [0-9a-f]{32}\); it was deleted: run the same command again$")
    assert_one_line_errors(status, err, [rf"^{x / 'a'}{pattern}", rf"^{x / 'b'}{pattern}"])
    assert not (home(tmp_path) / "downloads" / "data.tar.gz").exists() and not x.exists()


# ---------------------------------------------------------------- nothing to do

def test_with_every_file_present_nothing_is_fetched(server, suite, tmp_path, capsys):
    server.files["/a.bin"] = PAYLOAD
    s = suite(a=Asset("files/a.bin", "t", sha256=SHA, url=server.url("/a.bin")),
              b=Asset("files/b.bin", "t", url=server.url("/b.bin")),
              t=Asset("cifar/test_batch", "t", archive=server.url("/x.tar.gz"), member="test_batch"))
    for name in ("files/a.bin", "files/b.bin", "cifar/test_batch"):
        write(home(tmp_path) / name, "").write_bytes(PAYLOAD)
    status, out, err = fetch(capsys, s)
    h = home(tmp_path)
    assert (status, err) == (0, "")
    assert out == [f"[ok     ] {h / 'files' / 'a.bin'}  (sha256 verified)", f"[ok     ] {h / 'files' / 'b.bin'}",
                   f"[ok     ] {h / 'cifar' / 'test_batch'}"]
    assert server.requests == []


def test_a_present_file_that_fails_its_check_is_reported_not_replaced(server, suite, tmp_path, capsys):
    s = suite(a=Asset("files/a.bin", "t", sha256=SHA, url=server.url("/a.bin")))
    write(home(tmp_path) / "files" / "a.bin", "not it")
    status, _, err = fetch(capsys, s)
    assert_one_line_errors(status, err, [
        rf"^{home(tmp_path) / 'files' / 'a.bin'}: sha256 mismatch \(expected {SHA}, got [0-9a-f]{{64}}\); delete it "
        r"and run the same command again to download it anew$"])
    assert server.requests == []


def test_the_checklist_says_what_download_would_fetch(suite, tmp_path, capsys):
    s = suite(a=Asset("files/a.bin", "t", url="http://127.0.0.1:9/a.bin"), b=Asset("data/val", "somewhere"))
    status = main(["assets", str(s)])
    err = capsys.readouterr().err
    assert_one_line_errors(status, err, [
        rf"^2 file\(s\) missing: `benchkit assets {s} --download` fetches 1; 1 need a manual step \(see where each "
        r"is published\)$"])
