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


def decode(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C]. Raises PNGError for anything unsupported or corrupt."""
    if not data.startswith(SIGNATURE):
        raise PNGError("not a PNG file")
    pos, header, idat = len(SIGNATURE), None, []
    try:
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
            if len(body) != length:
                raise PNGError("truncated file")
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
        if header is None:
            raise PNGError("no IHDR chunk")
        w, h, depth, color, _, _, interlace = header
        if depth != 8 or color not in CHANNELS or interlace:
            raise PNGError(f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace}); "
                           "only 8-bit grey / grey+alpha / RGB / RGBA, non-interlaced")
        raw = zlib.decompress(b"".join(idat))
    except (struct.error, zlib.error) as exc:
        raise PNGError(f"corrupt PNG: {exc}") from None
    c = CHANNELS[color]
    stride = w * c
    if len(raw) != h * (stride + 1):
        raise PNGError("corrupt PNG: wrong amount of image data")
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
