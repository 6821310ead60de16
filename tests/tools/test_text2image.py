"""Text2Image against a loopback AUTOMATIC1111-style server, and the PNG check behind it."""

import base64
import dataclasses
import io
import json
import struct
import time
import zlib

import pytest
from PIL import Image

from moss_jax.tools import ToolError, ToolRegistry, text2image
from moss_jax.tools.config import ToolConfigError, ToolsConfig
from moss_jax.tools.png import check_png
from moss_jax.tools.txt2img import endpoint_url
from tests.tools.conftest import png_bytes


def _server_answer(png: bytes) -> bytes:
    return json.dumps({"images": [base64.b64encode(png).decode()], "parameters": {}, "info": "{}"}).encode()


def _config(url: str, tmp_path, **kwargs) -> ToolsConfig:
    return ToolsConfig(
        enable_text2image=True, txt2img_url=url, image_dir=str(tmp_path / "images"), text2image_timeout_s=2.0, **kwargs
    )


def test_writes_a_valid_png(http_server, tmp_path):
    png = png_bytes((12, 7))
    url, requests = http_server(lambda req: (200, "application/json", _server_answer(png)))
    path = text2image("一只可爱的熊猫在竹林里，水彩画", config=_config(url, tmp_path, txt2img_width=768))
    assert path.parent == tmp_path / "images" and path.suffix == ".png"
    assert path.read_bytes() == png
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (12, 7)
    (request,) = requests
    assert request["method"] == "POST" and request["path"] == "/sdapi/v1/txt2img"
    body = json.loads(request["body"])
    assert body["prompt"] == "一只可爱的熊猫在竹林里，水彩画"
    assert body["width"] == 768 and body["height"] == 512 and body["steps"] == 20
    assert list((tmp_path / "images").iterdir()) == [path]  # no temporary file left


def test_registry_reports_success_and_the_path(http_server, tmp_path):
    url, _ = http_server(lambda req: (200, "application/json", _server_answer(png_bytes())))
    turn = ToolRegistry(_config(url, tmp_path)).execute('Text2Image("a red panda")')
    assert turn.text == "Image generated successfully."
    assert turn.calls[0].image_path.is_file()


@pytest.mark.parametrize(
    "status, body, reason",
    [
        (500, b'{"error": "CUDA out of memory"}', "HTTP 500"),
        (200, b'{"images": []}', '"images"'),
        (200, b'{"images": ["not base64!"]}', "base64"),
        (200, _server_answer(b"GIF89a not a png"), "not a PNG"),
        (200, _server_answer(png_bytes()[:-20]), "truncated|IEND"),
        (200, b"not json", "not JSON"),
    ],
)
def test_server_failures_give_no_result_and_a_logged_reason(http_server, tmp_path, caplog, status, body, reason):
    url, _ = http_server(lambda req: (status, "application/json", body))
    config = _config(url, tmp_path)
    with pytest.raises(ToolError, match=reason):
        text2image("a cat", config=config)
    assert ToolRegistry(config).run_commands('Text2Image("a cat")') == "No result."
    assert any("Text2Image" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


def test_timeout_gives_no_result(http_server, tmp_path, caplog):
    url, _ = http_server(lambda req: (req["stop"].wait(10), (200, "application/json", b"{}"))[1])
    config = dataclasses.replace(_config(url, tmp_path), text2image_timeout_s=0.5)
    start = time.perf_counter()
    assert ToolRegistry(config).run_commands('Text2Image("a cat")') == "No result."
    assert time.perf_counter() - start < 2.0
    assert any("127.0.0.1" in r.getMessage() for r in caplog.records)


def test_no_server_configured_is_an_error_not_an_image(tmp_path):
    with pytest.raises(ToolError, match="no text-to-image server"):
        text2image("a cat", config=ToolsConfig(image_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ToolConfigError, match="txt2img_url"):
        ToolsConfig(enable_text2image=True)


def test_endpoint_url():
    assert endpoint_url("http://sd:7860") == "http://sd:7860/sdapi/v1/txt2img"
    assert endpoint_url("http://sd:7860/") == "http://sd:7860/sdapi/v1/txt2img"
    assert endpoint_url("http://sd/sdapi/v1/txt2img") == "http://sd/sdapi/v1/txt2img"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_check_png_accepts_real_images():
    assert check_png(png_bytes((3, 5))) == (3, 5)
    gray = Image.new("L", (4, 4), 128)
    out = io.BytesIO()
    gray.save(out, format="PNG")
    assert check_png(out.getvalue()) == (4, 4)


def test_check_png_rejects_corruption():
    png = png_bytes((4, 4))
    flipped = bytearray(png)
    flipped[20] ^= 0xFF  # inside IHDR: CRC no longer matches
    with pytest.raises(ToolError, match="CRC"):
        check_png(bytes(flipped))
    header = png[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
    wrong_size = header + _chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + _chunk(b"IEND", b"")
    with pytest.raises(ToolError, match="expected 52"):
        check_png(wrong_size)
    bomb_header = png[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    with pytest.raises(ToolError, match="too large"):
        check_png(bomb_header + _chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _chunk(b"IEND", b""))
    with pytest.raises(ToolError, match="IHDR"):
        check_png(png[:8] + _chunk(b"IEND", b""))


def _png(width: int, height: int, bit_depth: int, colour: int, *, methods=(0, 0, 0)) -> bytes:
    """A PNG whose IDAT holds exactly the bytes its header implies (consistent, whatever the depth)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    raw = b"\x00" * (height * (1 + (width * channels * bit_depth + 7) // 8))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, *methods)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


VALID_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@pytest.mark.parametrize("colour, bit_depth", [(c, d) for c, depths in VALID_DEPTHS.items() for d in depths])
def test_check_png_accepts_every_bit_depth_the_spec_allows(colour, bit_depth):
    assert check_png(_png(3, 2, bit_depth, colour)) == (3, 2)


@pytest.mark.parametrize(
    "colour, bit_depth",
    [(6, 200), (2, 200), (0, 3), (0, 32), (2, 4), (3, 16), (4, 1), (6, 0), (0, 0)],
)
def test_check_png_rejects_bit_depths_the_spec_does_not_allow(colour, bit_depth):
    # Depth 200 with data to match would have passed: the depth sizes the inflate allowance.
    with pytest.raises(ToolError, match=f"bit depth {bit_depth} is invalid for colour type {colour}"):
        check_png(_png(2, 2, bit_depth, colour))


@pytest.mark.parametrize("methods", [(1, 0, 0), (0, 1, 0), (0, 0, 2)])
def test_check_png_rejects_unknown_methods(methods):
    with pytest.raises(ToolError, match="compression method .* filter method .* interlace method"):
        check_png(_png(2, 2, 8, 2, methods=methods))


def test_text2image_refuses_an_invalid_bit_depth(http_server, tmp_path, caplog):
    url, _ = http_server(lambda req: (200, "application/json", _server_answer(_png(4, 4, 200, 6))))
    registry = ToolRegistry(_config(url, tmp_path))
    assert registry.run_commands('Text2Image("cat")') == "No result."
    assert "bit depth 200" in caplog.text
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())
