"""Files for the cli- cases (tests/malformed/cli.yaml): hostile PNGs for `benchkit purify`."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def grey_png(w: int, h: int, raw: bytes) -> bytes:
    """An 8-bit grey PNG whose IHDR says w x h, whatever `raw` (the filtered rows) holds."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def zeros_zlib(n: int, block: int = 2**20) -> bytes:
    """A zlib stream of n zero bytes, built in milliseconds: after a full flush the compressor
    starts afresh, so every further megabyte of zeros compresses to the same bytes."""
    assert n % block == 0
    z = zlib.compressobj(9)
    first = z.compress(b"\0" * block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(b"\0" * block) + z.flush(zlib.Z_FULL_FLUSH)
    final = z.flush()[:-4]                              # the last, empty block; then the checksum:
    adler = ((n % 65521) << 16) | 1                     # Adler-32 of n zeros (a = 1, b = n mod 65521)
    return first + again * (n // block - 1) + final + struct.pack(">I", adler)


def bomb(folder: Path) -> None:
    """big.png: 20000x20000 grey (400 MB of pixels) in under 400 KB: filter byte 0 and zero
    pixels on every row, all zeros."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    body = zeros_zlib(20000 * 20001, block=20001 * 50)
    (folder / "big.png").write_bytes(SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def damaged(folder: Path) -> None:
    """crc.png: an 8x8 digit-sized image whose IDAT's CRC is wrong; cut.png: the same without IEND;
    liar.png: an IHDR of 8x8 over 1 MB of pixel data (a zip bomb the IHDR does not own up to)."""
    good = grey_png(8, 8, b"\0" * (8 * 9))
    idat_crc_at = good.index(b"IEND") - 8      # the 4 bytes before IEND's length are IDAT's CRC
    (folder / "crc.png").write_bytes(good[:idat_crc_at] + bytes([good[idat_crc_at] ^ 0xFF]) + good[idat_crc_at + 1:])
    (folder / "cut.png").write_bytes(good[:good.index(b"IEND") - 4])
    (folder / "liar.png").write_bytes(grey_png(8, 8, b"\0" * 2**20))
