"""`benchkit purify` and the PNG reader/writer it uses."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from benchkit import png
from benchkit.cli import main
from conftest import ROOT

SUITE = str(ROOT / "suites" / "digits_quick.yaml")   # defenses: none (identity), diffpure (t* 0.1, dt 0.01)


def filtered_png(a: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit PNG whose row y uses filter filters[y] (the reference filters of the PNG spec)."""
    h, w, c = a.shape
    rows, prev = [], np.zeros(w * c, int)
    for y in range(h):
        cur = a[y].reshape(-1).astype(int)
        left = np.concatenate([np.zeros(c, int), cur[:-c]])
        upleft = np.concatenate([np.zeros(c, int), prev[:-c]])
        p = left + prev - upleft
        pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        pred = [0 * cur, left, prev, (left + prev) // 2, paeth][filters[y]]
        rows.append(bytes([filters[y]]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
        prev = cur
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return png.SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_round_trip_and_every_filter(channels):
    a = np.random.default_rng(channels).integers(0, 256, (10, 7, channels), dtype=np.uint8)
    assert np.array_equal(png.decode(png.encode(a)), a)
    assert np.array_equal(png.decode(filtered_png(a, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0])), a)


@pytest.mark.parametrize("data, message", [(b"GIF89a", "not a PNG file"), (png.SIGNATURE + b"\0\0", "corrupt PNG"),
                                           (png.SIGNATURE + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0) + b"\0" * 4,
                                            "unsupported PNG (bit depth 16")])
def test_png_errors_say_why(data, message):
    with pytest.raises(png.PNGError, match=message.replace("(", r"\(")):
        png.decode(data)


@pytest.fixture
def digits_pngs(tmp_path):
    from benchkit_data.digits import load_digits_split

    x, _ = load_digits_split("test")
    grey = (x[:2, 0] * 255).round().numpy().astype(np.uint8)        # two 8x8 digits
    (tmp_path / "a.png").write_bytes(png.encode(grey[0]))
    alpha = np.stack([grey[1], np.full_like(grey[1], 255)], -1)      # grey + alpha: alpha is dropped
    (tmp_path / "b.png").write_bytes(png.encode(alpha))
    return tmp_path, grey


def test_purify_writes_one_png_per_input(digits_pngs, plugin_manager, capsys):
    tmp, grey = digits_pngs
    ins = [str(tmp / "a.png"), str(tmp / "b.png")]
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", *ins, "--out", str(tmp / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp / "out" / "a.png"), str(tmp / "out" / "b.png")]
    a, b = (png.decode((tmp / "out" / n).read_bytes()) for n in ("a.png", "b.png"))
    assert a.shape == b.shape == (8, 8, 1)
    assert not np.array_equal(a[..., 0], grey[0])                     # purified, not copied
    assert np.abs(a[..., 0].astype(int) - grey[0]).mean() < 64        # ... and still the digit
    # seeded per image (seed, file name): a.png alone purifies as it did beside b.png; another
    # --seed gives another draw; the identity defense returns the input exactly
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", ins[0], "--out", str(tmp / "again")]) == 0
    assert (tmp / "again" / "a.png").read_bytes() == (tmp / "out" / "a.png").read_bytes()
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", ins[0], "--out", str(tmp / "seed1"),
                 "--seed", "1"]) == 0
    assert (tmp / "seed1" / "a.png").read_bytes() != (tmp / "out" / "a.png").read_bytes()
    assert main(["purify", "--suite", SUITE, "--defense", "none", ins[1], "--out", str(tmp / "id")]) == 0
    assert np.array_equal(png.decode((tmp / "id" / "b.png").read_bytes())[..., 0], grey[1])


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_purify_errors_are_one_clear_line_each(digits_pngs, plugin_manager, capsys):
    tmp, _ = digits_pngs
    out = str(tmp / "out")
    assert main(["purify", "--suite", SUITE, "--defense", "difpure", str(tmp / "a.png"), "--out", out]) == 2
    assert error_lines(capsys) == [f"benchkit: error: {SUITE}: --defense: no defense 'difpure' in this suite; did you mean 'diffpure'?"]
    assert main(["purify", "--suite", SUITE, "--defense", "zzz", str(tmp / "a.png"), "--out", out]) == 2
    assert error_lines(capsys)[0].endswith("no defense 'zzz' in this suite (defined: none, diffpure)")
    (tmp / "text.png").write_text("hello")
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", str(tmp / "text.png"), str(tmp / "gone.png"),
                 "--out", out]) == 2
    assert error_lines(capsys) == [f"benchkit: error: {tmp / 'text.png'}: cannot read image: not a PNG file",
                                   f"benchkit: error: {tmp / 'gone.png'}: cannot read image: No such file or directory"]
    (tmp / "rgb.png").write_bytes(png.encode(np.zeros((8, 8, 3), np.uint8)))
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", str(tmp / "rgb.png"), "--out", out]) == 2
    (line,) = error_lines(capsys)
    assert line == (f"benchkit: error: {tmp / 'rgb.png'}: the image is RGB 8x8, but defense 'diffpure' of {SUITE} "
                    "works on grey 8x8 images (the suite's digits data): convert and resize it first")
    # the grey model never silently purifies another size (a 28x28 digit is not an 8x8 one)
    (tmp / "big.png").write_bytes(png.encode(np.zeros((28, 28, 1), np.uint8)))
    assert main(["purify", "--suite", SUITE, "--defense", "diffpure", str(tmp / "big.png"), "--out", out]) == 2
    (line,) = error_lines(capsys)
    assert "the image is grey 28x28, but defense 'diffpure'" in line and "works on grey 8x8 images" in line
    assert not (tmp / "out" / "rgb.png").exists() and not (tmp / "out" / "big.png").exists()
