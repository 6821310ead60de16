"""Structural PNG check (stdlib only): what a txt2img server sends is saved only if it is a PNG.

Checks the signature, that IHDR comes first with a colour type/bit depth pair the specification
allows and known compression, filter and interlace methods, every chunk's CRC, an IEND, and that
the IDAT data inflates to exactly the size the header implies (for non-interlaced images), with
the inflated size bounded so a compression bomb cannot exhaust memory.
"""

from __future__ import annotations

import struct
import zlib

from moss_jax.tools.errors import ToolError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 64 * 1024 * 1024
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# colour type -> the bit depths the PNG specification allows for it (section 11.2.2, IHDR).
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def check_png(data: bytes) -> tuple[int, int]:
    """Returns (width, height) of a well-formed PNG; raises ToolError otherwise."""
    if not data.startswith(SIGNATURE):
        raise ToolError("image is not a PNG (bad signature)")
    pos, header, idat = len(SIGNATURE), None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ToolError("PNG is truncated")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ToolError(f"PNG chunk {kind!r} has a bad CRC")
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ToolError("PNG does not start with an IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            return _check_pixels(header, b"".join(idat))
        pos += 12 + length
    raise ToolError("PNG has no IEND chunk")


def _check_pixels(header: tuple[int, ...], compressed: bytes) -> tuple[int, int]:
    width, height, bit_depth, colour, compression, filter_method, interlace = header
    if not width or not height or width * height > MAX_PIXELS or colour not in _CHANNELS:
        raise ToolError(f"PNG header is invalid or too large ({width}x{height}, colour type {colour})")
    # The bit depth sizes the inflated data below: only the spec's pairs, so no bogus depth can
    # stretch the decompression allowance (8000x8000 RGBA at "depth 200" would allow 6.4 GB).
    if bit_depth not in _BIT_DEPTHS[colour]:
        allowed = ", ".join(map(str, _BIT_DEPTHS[colour]))
        raise ToolError(f"PNG header bit depth {bit_depth} is invalid for colour type {colour} (allowed: {allowed})")
    if compression != 0 or filter_method != 0 or interlace not in (0, 1):
        raise ToolError(
            f"PNG header has an unknown compression method {compression}, filter method {filter_method} "
            f"or interlace method {interlace} (allowed: 0, 0, 0 or 1)"
        )
    if not compressed:
        raise ToolError("PNG has no image data")
    # One filter byte per row plus the packed samples.
    expected = height * (1 + (width * _CHANNELS[colour] * bit_depth + 7) // 8)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected + 1)
    except zlib.error as e:
        raise ToolError(f"PNG image data is corrupt: {e}") from None
    # Adam7 interlacing stores extra filter bytes per pass; only the non-interlaced size is exact.
    if interlace == 0 and (len(raw) != expected or not inflater.eof):
        raise ToolError(f"PNG image data has {len(raw)} bytes, expected {expected}")
    return width, height
