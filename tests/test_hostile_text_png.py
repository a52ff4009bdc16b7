"""Hostile input that is not a suite: PNG files built to exhaust memory or to lie about themselves,
text carrying terminal escapes or bidi controls (from plugins' exceptions or a results.sqlite
someone else wrote), and Ctrl-C while `benchkit` is still importing."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchkit import png
from benchkit.cli import main
from benchkit.hookspecs import hookimpl
from benchkit.interrupt import Interrupted, SigintWatch
from benchkit.report import printable
from conftest import ROOT, TINY_SUITE, write
from malformed.contract import assert_one_line_errors
from malformed.setup_cli import SIGNATURE, bomb, chunk, grey_png, zeros_zlib
from test_purify_cli import filtered_png

# What must never reach a terminal or a CSV raw: C0 but newline (tables and CSV have rows), DEL,
# C1, bidi controls and invisible marks, line / paragraph separators.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def decode_error(data: bytes, **limits) -> str:
    with pytest.raises(png.PNGError) as exc:
        png.decode(data, **limits)
    message = str(exc.value)
    assert "\n" not in message and not RAW_CONTROL.search(message)
    return message


def ihdr(w: int, h: int, color: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)


# ------------------------------------------------------------------ PNG: what decodes still decodes exactly

@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [1, 2, 13])
def test_round_trip_every_colour_type_filter_and_width(channels, width):
    rng = np.random.default_rng(channels * 100 + width)
    a = rng.integers(0, 256, (12, width, channels), dtype=np.uint8)
    assert np.array_equal(png.decode(png.encode(a)), a)
    filters = [int(f) for f in rng.integers(0, 5, 12)]
    assert np.array_equal(png.decode(filtered_png(a, filters)), a)


def test_idat_split_over_chunks_ancillary_chunks_and_bytes_after_iend():
    a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    raw = zlib.compress(b"".join(b"\0" + a[y].tobytes() for y in range(4)))
    data = (SIGNATURE + chunk(b"IHDR", ihdr(4, 4, color=2)) + chunk(b"tEXt", b"Comment\0hi")
            + chunk(b"IDAT", raw[:5]) + chunk(b"IDAT", raw[5:]) + chunk(b"IEND", b"") + b"trailing junk")
    assert np.array_equal(png.decode(data), a)


# ------------------------------------------------------------------ PNG: damaged files say what is wrong

GOOD = grey_png(8, 8, b"\0" * (8 * 9))


@pytest.mark.parametrize("kind", [b"IHDR", b"IDAT", b"IEND"])
def test_every_chunks_crc_is_checked(kind):
    at = GOOD.index(kind) + 4                      # first byte of the chunk's body (or CRC for IEND)
    length = struct.unpack(">I", GOOD[at - 8:at - 4])[0]
    crc_at = at + length
    bad = GOOD[:crc_at] + bytes([GOOD[crc_at] ^ 1]) + GOOD[crc_at + 1:]
    assert decode_error(bad) == f"corrupt PNG: bad CRC in {kind.decode()} chunk"


def test_a_corrupted_pixel_byte_is_a_bad_crc_not_other_pixels():
    at = GOOD.index(b"IDAT") + 6
    assert decode_error(GOOD[:at] + bytes([GOOD[at] ^ 0x10]) + GOOD[at + 1:]) == "corrupt PNG: bad CRC in IDAT chunk"


def test_truncated_files():
    iend = GOOD.index(b"IEND") - 4
    assert decode_error(GOOD[:iend]) == "truncated PNG: no IEND chunk"
    assert decode_error(GOOD[:iend - 3]) == "corrupt PNG: truncated file (the IDAT chunk is cut short)"
    assert decode_error(GOOD[:iend + 5]) == "corrupt PNG: truncated file (a chunk header is cut short)"
    assert decode_error(SIGNATURE) == "truncated PNG: no IEND chunk"


def test_header_must_come_first_once_and_be_whole():
    text = chunk(b"tEXt", b"a\0b")
    assert decode_error(SIGNATURE + text + GOOD[8:]) == "corrupt PNG: the first chunk is tEXt, not IHDR"
    assert decode_error(GOOD[:33] + chunk(b"IHDR", ihdr(8, 8)) + GOOD[33:]) == "corrupt PNG: a second IHDR chunk"
    assert decode_error(SIGNATURE + chunk(b"IHDR", ihdr(8, 8)[:12]) + GOOD[33:]) == "corrupt PNG: IHDR chunk of 12 bytes, not 13"
    assert decode_error(SIGNATURE + chunk(b"IHDR", ihdr(0, 8)) + GOOD[33:]) == "corrupt PNG: IHDR declares 0x8 pixels"
    no_idat = SIGNATURE + chunk(b"IHDR", ihdr(8, 8)) + chunk(b"IEND", b"")
    assert decode_error(no_idat) == "corrupt PNG: no IDAT chunk"


def test_a_chunk_type_with_escapes_is_shown_escaped():
    data = SIGNATURE + chunk(b"\x1b[2J", b"") + GOOD[8:]
    assert decode_error(data) == r"corrupt PNG: the first chunk is b'\x1b[2J', not IHDR"


def test_absurd_chunk_length():
    data = GOOD[:33] + struct.pack(">I", 2**31) + b"IDAT" + b"\0" * 16
    assert decode_error(data) == "corrupt PNG: IDAT chunk length 2147483648 is over 2^31-1"


def test_too_little_image_data_or_a_cut_stream():
    assert decode_error(grey_png(8, 8, b"\0" * (8 * 9 - 1))) == "corrupt PNG: wrong amount of image data"
    cut = zlib.compress(b"\0" * (8 * 9))[:-4]     # every pixel there, the stream's checksum not
    data = SIGNATURE + chunk(b"IHDR", ihdr(8, 8)) + chunk(b"IDAT", cut) + chunk(b"IEND", b"")
    assert decode_error(data) == "corrupt PNG: wrong amount of image data"


# ------------------------------------------------------------------ PNG: memory is bounded by the IHDR's size

class InflateSpy:
    """Stands in for png's zlib: records every decompress call's max_length and output size."""

    def __init__(self, allowed: bool = True):
        self.allowed, self.calls = allowed, []
        self.crc32, self.error = zlib.crc32, zlib.error

    def decompressobj(self):
        assert self.allowed, "decompressed although the IHDR alone refuses the image"
        real, calls = zlib.decompressobj(), self.calls

        class Obj:
            def decompress(self, data, max_length=0):
                out = real.decompress(data, max_length)
                calls.append((max_length, len(out)))
                return out

            eof = property(lambda self: real.eof)
        return Obj()


def test_a_bomb_is_refused_from_its_header_before_decompressing(tmp_path, monkeypatch):
    bomb(tmp_path)
    data = (tmp_path / "big.png").read_bytes()
    assert len(data) < 400_000                      # 400 MB of pixels in under 400 KB
    monkeypatch.setattr(png, "zlib", InflateSpy(allowed=False))
    assert decode_error(data) == ("not decoded: 20000x20000 pixels is over the limit of 67108864 pixels "
                                  "and 16384 per side; resize it first")


@pytest.mark.parametrize("w, h", [(16385, 1), (1, 16385), (8193, 8192)])
def test_limits_per_side_and_in_total(w, h, monkeypatch):
    monkeypatch.setattr(png, "zlib", InflateSpy(allowed=False))
    data = SIGNATURE + chunk(b"IHDR", ihdr(w, h)) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    assert decode_error(data).startswith(f"not decoded: {w}x{h} pixels is over the limit")


def test_the_limit_itself_decodes_and_callers_may_ask_for_less():
    n = 8192 * 8193                                 # 8192 rows of a filter byte and 8192 pixels
    data = SIGNATURE + chunk(b"IHDR", ihdr(8192, 8192)) + chunk(b"IDAT", zeros_zlib(n, 8193 * 64)) + chunk(b"IEND", b"")
    a = png.decode(data)
    assert a.shape == (8192, 8192, 1) and not a.any()
    assert decode_error(data, max_pixels=64 * 64) == ("not decoded: 8192x8192 pixels is over the limit of 4096 pixels "
                                                      "and 16384 per side; resize it first")


def test_a_lying_header_allocates_no_more_than_it_declares(monkeypatch):
    spy = InflateSpy()
    monkeypatch.setattr(png, "zlib", spy)
    liar = grey_png(8, 8, b"\0" * 2**26)            # 64 MB of pixel data under an 8x8 header
    assert decode_error(liar) == "corrupt PNG: more image data than the IHDR's 8x8 pixels"
    assert spy.calls == [(8 * 9 + 1, 8 * 9 + 1)]   # inflated one byte past the 72 it declares, no more


# ------------------------------------------------------------------ text: one visible line, whatever it holds

def test_printable_escapes_controls_and_bidi_and_keeps_the_rest():
    assert printable("a\x1b[2Jb") == r"a\x1b[2Jb"
    assert printable("x\x9b31m\x7f\x00") == r"x\x9b31m\x7f\x00"
    assert printable("abc\u202edef\u2066\u200b") == r"abc\u202edef\u2066\u200b"
    assert printable("one\ntwo\r\nthree\tfour") == "one two  three four"
    assert printable("line\u2028sep\x85") == r"line\u2028sep\x85"
    assert printable("Linf 8/255 ± 1.00 ✓ é 中") == "Linf 8/255 ± 1.00 ✓ é 中"
    assert printable(3) == "3"


ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"             # set the title, clear the screen, go red
BIDI = "\u202e\u2066"


class EvilPlugin:
    """An attack whose exception message carries escapes, bidi controls and a line break."""

    @hookimpl
    def register_attacks(self, register):
        from test_run import FGSM, FGSMParams
        from benchkit.threat import Linf

        class Evil(FGSM):
            def run(self, model, x, y, ctx):
                raise RuntimeError(f"{ESC}boom{BIDI}\nsecond line")

        register("evil", Evil, params=FGSMParams, threat=lambda p: Linf(p.eps))


EVIL_SUITE = """
suite: blobs
seed: 3
dataset: {plugin: blobs}
classifiers: [{id: near, plugin: nearest}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: fgsm, plugin: fgsm, params: {eps: 0.2}}, {id: evil, plugin: evil, params: {eps: 0.2}}]
grid: all
eval: {batch_size: 8, repeats: 1}
references: [{defense: none, attack: fgsm, standard: 99.0, robust: 50.0, source: "Made up et al."},
             {label: plain, standard: 90.0, source: "also made up"}]
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A run whose plugin failed with escapes in its message, then its store rewritten (as someone
    could before sending it) so that every text it holds carries escapes and bidi controls."""
    from benchkit import plugins, registry
    from test_run import LocalPlugin

    plugins.reset_plugin_manager()
    plugins.get_plugin_manager().register(LocalPlugin(), name="local")
    plugins.get_plugin_manager().register(EvilPlugin(), name="evil")
    registry.reset()
    tmp = tmp_path_factory.mktemp("hostile")
    suite = write(tmp / "s.yaml", EVIL_SUITE)
    err = io.StringIO()
    sys.stderr, saved = err, sys.stderr
    try:
        status = main(["run", str(suite), "--out", str(tmp / "runs" / "plain")])
    finally:
        sys.stderr = saved
    out = (tmp / "runs" / "plain").rename(tmp / "runs" / f"folder{ESC}")   # a folder name is text too
    db = sqlite3.connect(out / "results.sqlite")
    db.execute("UPDATE cells SET classifier = classifier || ?, defense = ? || defense", (ESC, BIDI))
    db.execute("UPDATE checks SET status = 'fail', reason = ?", (f"reason{ESC}\nmore{BIDI}",))
    run_id, suite_json, prov = db.execute("SELECT id, suite_json, provenance_json FROM runs").fetchone()
    s = json.loads(suite_json)
    s["suite"] += ESC
    s["eval"]["repeats"] = f"3{ESC}"
    s["references"][0]["source"] = f"Made up{BIDI} et al.{ESC}"
    s["references"][1]["label"] = f"plain{ESC}"
    p = json.loads(prov)
    p["limit"] = f"5{ESC}"
    p["dataset_n"] = {k: 10**6 for k in p["cell_n"]}   # the limit "cut" every cell: its line is shown
    db.execute("UPDATE runs SET suite_json = ?, suite_name = ?, provenance_json = ?",
               (json.dumps(s), s["suite"], json.dumps(p)))
    db.commit()
    db.close()
    yield {"tmp": tmp, "out": out, "status": status, "stderr": err.getvalue()}
    plugins.reset_plugin_manager()
    registry.reset()


def test_a_plugins_escape_sequence_is_escaped_in_the_cell_failed_line(hostile):
    assert hostile["status"] == 1
    failed = [line for line in hostile["stderr"].splitlines() if line.startswith("benchkit: cell failed:")]
    assert len(failed) == 1
    assert r"\x1b]0;pwned\x07\x1b[2J\x1b[31mboom\u202e\u2066 second line" in failed[0]
    assert not RAW_CONTROL.search(hostile["stderr"])


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_report_of_a_hostile_store_prints_no_raw_control(hostile, fmt, capsys):
    assert main(["report", str(hostile["out"]), "--format", fmt]) == 0
    out, err = capsys.readouterr()
    assert not RAW_CONTROL.search(out) and not RAW_CONTROL.search(err)
    if fmt == "table":
        assert r"near\x1b]0;pwned\x07\x1b[2J\x1b[31m" in out and r"\u202e\u2066none" in out
        assert r"FAILED: attack evil on images" in out and r"\u202e\u2066 second line" in out
        assert r"Made up\u202e\u2066 et al.\x1b]0;" in out and r"plain\x1b]0;" in out
        assert out.splitlines()[0].startswith(r"--limit 5\x1b]0;pwned")
        assert r"std over 3\x1b]0;" in out
        advice = err.splitlines()   # one line per failing check, its reason escaped
        assert advice and all(line.startswith("benchkit: cell ") for line in advice)
        assert all(r"failed: reason\x1b]0;pwned\x07\x1b[2J\x1b[31m more\u202e\u2066. What to do:" in line for line in advice)
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {r["classifier"] for r in rows if r["row"] == "cell"} == {r"near\x1b]0;pwned\x07\x1b[2J\x1b[31m"}
        assert any(r["failure"].endswith(r"boom\u202e\u2066 second line") for r in rows)
    if fmt == "json":   # JSON escapes them itself: the values come back exactly
        cells = json.loads(out)["cells"]
        assert {c["classifier"] for c in cells} == {f"near{ESC}"}


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_index_of_a_hostile_store_prints_no_raw_control(hostile, fmt, capsys):
    assert main(["report", "--index", str(hostile["tmp"] / "runs"), "--format", fmt]) == 0
    out, err = capsys.readouterr()
    assert not RAW_CONTROL.search(out) and not RAW_CONTROL.search(err)
    assert r"folder\x1b]0;pwned" in out and r"blobs\x1b]0;" in out and r"near\x1b]0;" in out


def test_bad_input_lines_are_escaped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = main(["report", f"run{ESC}"])
    assert_one_line_errors(status, capsys.readouterr().err, [r"^run\\x1b\]0;pwned\\x07\\x1b\[2J\\x1b\[31m: no results"])


# ------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_run_with_a_device_flag_this_machine_lacks_is_one_line(tmp_path, capsys):
    suite = write(tmp_path / "s.yaml", TINY_SUITE)
    status = main(["run", str(suite), "--device", "cuda", "--out", str(tmp_path / "out")])
    assert_one_line_errors(status, capsys.readouterr().err, [r"^--device cuda: no CUDA device is available on this machine$"])
    assert not (tmp_path / "out" / "results.sqlite").exists()


# ------------------------------------------------------------------ Ctrl-C

def test_import_path_of_the_console_script_stays_small():
    code = ("import sys, benchkit.cli; heavy = {'torch', 'numpy', 'pydantic', 'yaml', 'pluggy', 'jinja2', 'tabulate'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_interrupt_while_loading_plugins_is_one_line(monkeypatch, capsys):
    from benchkit import plugins

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(plugins, "get_plugin_manager", interrupted)
    assert main(["ls"]) == 130
    assert capsys.readouterr().err == "benchkit: interrupted\n"


def test_interrupt_in_a_commands_import_is_one_line(monkeypatch, capsys):
    import benchkit

    class Finder:   # `from benchkit import resolve` inside cmd_validate meets Ctrl-C
        def find_spec(self, name, path=None, target=None):
            if name == "benchkit.resolve":
                raise KeyboardInterrupt
    monkeypatch.delitem(sys.modules, "benchkit.resolve")
    monkeypatch.delattr(benchkit, "resolve")
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert main(["validate", str(ROOT / "suites" / "digits_quick.yaml")]) == 130
    out, err = capsys.readouterr()
    assert err == "benchkit: interrupted\n" and out == ""


needs_default_sigint = pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                                          reason="SIGINT has another handler in this process")


def _module(tmp_path, monkeypatch, name: str, body: str) -> str:
    write(tmp_path / f"{name}.py", "import os, signal\nSELF = os.getpid()\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _wait_for_interrupt():
    for _ in range(1000):   # the deferred Ctrl-C comes within a poll (benchkit.interrupt.POLL_S)
        time.sleep(0.01)
    raise AssertionError("the deferred Ctrl-C never came")


@needs_default_sigint
def test_ctrl_c_inside_an_import_waits_for_it_then_interrupts(tmp_path, monkeypatch):
    import importlib

    name = _module(tmp_path, monkeypatch, "ctrl_c_once", "os.kill(SELF, signal.SIGINT)\nlen('x')\nDONE = True\n")
    with SigintWatch() as watch:
        with pytest.raises(Interrupted):
            importlib.import_module(name)
            _wait_for_interrupt()
    assert sys.modules[name].DONE and watch.seen            # the import ran to its end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@needs_default_sigint
def test_a_second_ctrl_c_inside_an_import_interrupts_at_once(tmp_path, monkeypatch):
    import importlib

    body = "os.kill(SELF, signal.SIGINT)\nlen('x')\nos.kill(SELF, signal.SIGINT)\nlen('x')\nDONE = True\n"
    name = _module(tmp_path, monkeypatch, "ctrl_c_twice", body)
    with SigintWatch():
        with pytest.raises(Interrupted):
            importlib.import_module(name)
    assert name not in sys.modules


@needs_default_sigint
def test_an_import_that_turns_ctrl_c_into_another_exception_is_still_an_interrupt(tmp_path, monkeypatch, capsys):
    """pydantic_core turns an interrupted import into a PanicException (a BaseException)."""
    from benchkit import cli

    body = ("class PanicException(BaseException):\n    pass\n"
            "try:\n    os.kill(SELF, signal.SIGINT)\n    len('x')\n    os.kill(SELF, signal.SIGINT)\n    len('x')\n"
            "except KeyboardInterrupt:\n    raise PanicException('failed to import the datetime C API')\n")
    name = _module(tmp_path, monkeypatch, "panics", body)
    monkeypatch.setattr(cli, "cmd_ls", lambda args: __import__(name))
    assert main(["ls"]) == 130
    assert capsys.readouterr().err == "benchkit: interrupted\n"


def _in_main(pid: int) -> bool:
    """Whether the child runs benchkit's main yet: the first extension main loads is pydantic's."""
    try:
        return "_pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the child's progress")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_sigint_to_a_real_process_is_one_line_and_130(delay):
    """SIGINT `delay` seconds into main (plugin loading, `import torch`, validation). Python itself
    prints a traceback for a SIGINT during its own startup (site, before benchkit's code runs):
    out of benchkit's hands, so the clock starts once main runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "validate", "suites/digits_quick.yaml"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not _in_main(proc.pid):
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err and "terminate called" not in err, err
    finished = out == "suites/digits_quick.yaml: ok (3 cells)\n"
    if proc.returncode == 130:
        assert (out, err) == ("", "benchkit: interrupted\n")
    else:   # it finished first; a SIGINT during the interpreter's exit ends it with the signal
        assert proc.returncode in (0, -signal.SIGINT) and finished and err == "", (proc.returncode, err)
