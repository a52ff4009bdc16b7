"""Minimal PNG reading and writing (zlib + struct): 8-bit grey, grey+alpha, RGB and RGBA,
non-interlaced. Enough for purification strips and `benchkit purify`, without an imaging library.

Arrays are uint8 numpy arrays [H, W, C] (C = 1, 2, 3 or 4).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}           # PNG colour type -> channels
COLOR_TYPE = {c: t for t, c in CHANNELS.items()}
# What decode accepts: 8192x8192 (256 MiB as RGBA), at most 16384 on a side; a larger file is
# refused from its IHDR before anything is decompressed.
MAX_PIXELS, MAX_SIDE = 8192 * 8192, 16384
MAX_CHUNK = 2**31 - 1   # the PNG spec's limit on a chunk's length


class PNGError(ValueError):
    """Not a PNG this module can read (the message says why)."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(img: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, C] -> PNG bytes (filter 0 on every row)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in COLOR_TYPE:
        raise ValueError(f"expected uint8 [H, W, 1|2|3|4], got {a.dtype} {a.shape}")
    h, w, c = a.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, w * c)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPE[c], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _name(kind: bytes) -> str:
    # A chunk type is four ASCII letters; anything else is shown escaped, never raw.
    return kind.decode("ascii") if len(kind) == 4 and kind.isalpha() else repr(kind)


def _chunks(data: bytes):
    """(type, body, stored CRC) of each chunk up to and including IEND; the caller checks the CRC."""
    pos = len(SIGNATURE)
    while True:
        if pos == len(data):
            raise PNGError("truncated PNG: no IEND chunk")
        if pos + 8 > len(data):
            raise PNGError("corrupt PNG: truncated file (a chunk header is cut short)")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if length > MAX_CHUNK:
            raise PNGError(f"corrupt PNG: {_name(kind)} chunk length {length} is over 2^31-1")
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(crc) != 4:
            raise PNGError(f"corrupt PNG: truncated file (the {_name(kind)} chunk is cut short)")
        yield kind, body, struct.unpack(">I", crc)[0]
        if kind == b"IEND":
            return          # whatever follows IEND is not part of the image
        pos += 12 + length


def _header(kind: bytes, body: bytes, max_pixels: int, max_side: int) -> tuple[int, int, int]:
    """(width, height, channels) from the first chunk, refused when unsupported or too large."""
    if kind != b"IHDR":
        raise PNGError(f"corrupt PNG: the first chunk is {_name(kind)}, not IHDR")
    if len(body) != 13:
        raise PNGError(f"corrupt PNG: IHDR chunk of {len(body)} bytes, not 13")
    w, h, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if depth != 8 or color not in CHANNELS or interlace or compression or filtering:
        raise PNGError(f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace}); "
                       "only 8-bit grey / grey+alpha / RGB / RGBA, non-interlaced")
    if w == 0 or h == 0:
        raise PNGError(f"corrupt PNG: IHDR declares {w}x{h} pixels")
    if w > max_side or h > max_side or w * h > max_pixels:
        raise PNGError(f"not decoded: {w}x{h} pixels is over the limit of {max_pixels} pixels "
                       f"and {max_side} per side; resize it first")
    return w, h, CHANNELS[color]


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C]. Raises PNGError for anything unsupported, corrupt or too large.

    A hostile file cannot make this allocate more than its IHDR's (capped) size: the pixel count
    is checked before anything is decompressed, and decompression stops one byte past what the
    IHDR declares (a zip bomb or a lying IHDR is then an error, not gigabytes)."""
    if not data.startswith(SIGNATURE):
        raise PNGError("not a PNG file")
    header, idat = None, []
    for kind, body, crc in _chunks(data):
        if header is None:   # the IHDR's verdict first: an unsupported or oversized image says so
            header = _header(kind, body, max_pixels, max_side)
        elif kind == b"IHDR":
            raise PNGError("corrupt PNG: a second IHDR chunk")
        if zlib.crc32(kind + body) != crc:
            raise PNGError(f"corrupt PNG: bad CRC in {_name(kind)} chunk")
        if kind == b"IDAT":
            idat.append(body)
    w, h, c = header
    if not idat:
        raise PNGError("corrupt PNG: no IDAT chunk")
    expected = h * (w * c + 1)
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        raise PNGError(f"corrupt PNG: {exc}") from None
    if len(raw) > expected:
        raise PNGError(f"corrupt PNG: more image data than the IHDR's {w}x{h} pixels")
    if len(raw) < expected or not inflate.eof:
        raise PNGError("corrupt PNG: wrong amount of image data")
    stride = w * c
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        f = rows[y, 0]
        if f == 0:
            line = rows[y, 1:].copy()
        elif f == 1:  # Sub: a running sum along each channel, modulo 256
            line = rows[y, 1:].reshape(w, c).cumsum(0, dtype=np.int64).astype(np.uint8).reshape(stride)
        elif f == 2:  # Up
            line = rows[y, 1:] + prev
        elif f in (3, 4):  # Average, Paeth depend on the reconstructed left pixel: sequential
            cur, up = rows[y, 1:].tolist(), prev.tolist()
            for x in range(stride):
                left, upleft = (cur[x - c], up[x - c]) if x >= c else (0, 0)
                pred = (left + up[x]) >> 1 if f == 3 else _paeth(left, up[x], upleft)
                cur[x] = (cur[x] + pred) & 0xFF
            line = np.array(cur, np.uint8)
        else:
            raise PNGError(f"corrupt PNG: unknown filter type {f}")
        out[y] = prev = line
    return out.reshape(h, w, c)


def from_tensor(x) -> bytes:
    """A [C, H, W] float tensor in [0, 1] (C = 1 to 4) -> PNG bytes."""
    a = (x.detach().float().cpu().clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    return encode(a.transpose(1, 2, 0))


def to_array(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 [C, H, W] in [0, 1]."""
    return decode(data).transpose(2, 0, 1).astype(np.float32) / 255.0
