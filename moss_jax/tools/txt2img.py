"""Text2Image("..."): a client for an AUTOMATIC1111-compatible `POST /sdapi/v1/txt2img` server.

The model sees only `Image generated successfully.` (or `No result.`); the saved PNG's path goes
to the chat loop. With no server configured this is an error, never a placeholder image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path

from moss_jax.tools.config import ToolsConfig, check_text_argument
from moss_jax.tools.errors import ToolError
from moss_jax.tools.http_util import request_json
from moss_jax.tools.png import check_png

ENDPOINT = "/sdapi/v1/txt2img"


def endpoint_url(base_url: str) -> str:
    """`base_url` + ENDPOINT, unless the configured URL already is the endpoint."""
    base = base_url.rstrip("/")
    return base if base.endswith(ENDPOINT) else base + ENDPOINT


def text2image(description: str, *, config: ToolsConfig | None = None) -> Path:
    """Generates an image for `description` and saves it as a PNG under `config.image_dir`.

    Args:
      description: the model's image prompt.
      config: `txt2img_url` (required), image size/steps, image_dir, timeout and size cap.

    Returns:
      Path of the written PNG (named by its content hash, so a repeat overwrites nothing else).

    Raises:
      ToolError: invalid description, no server configured, server error or timeout, or an
        answer without a valid PNG.
    """
    config = config or ToolsConfig()
    description = check_text_argument("image description", description, config.max_argument_chars)
    if config.txt2img_url is None:
        raise ToolError("no text-to-image server configured (set ToolsConfig.txt2img_url)")
    answer = request_json(
        endpoint_url(config.txt2img_url),
        method="POST",
        body={
            "prompt": description,
            "negative_prompt": config.txt2img_negative_prompt,
            "steps": config.txt2img_steps,
            "width": config.txt2img_width,
            "height": config.txt2img_height,
            "batch_size": 1,
            "n_iter": 1,
        },
        timeout_s=config.text2image_timeout_s,
        # base64 inflates by 4/3; leave room for the "parameters"/"info" fields A1111 adds.
        max_bytes=config.max_image_bytes * 4 // 3 + 1024 * 1024,
    )
    png = decode_first_image(answer, config.max_image_bytes)
    return save_png(png, Path(config.image_dir))


def decode_first_image(answer: object, max_bytes: int) -> bytes:
    """The first image of a `{"images": [base64 PNG, ...]}` answer, decoded and checked."""
    images = answer.get("images") if isinstance(answer, dict) else None
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise ToolError('text-to-image answer has no "images" list of base64 strings')
    encoded = images[0]
    if encoded.startswith("data:"):  # some servers send a data URI
        encoded = encoded.partition(",")[2]
    try:
        png = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ToolError("text-to-image answer's image is not valid base64") from None
    if len(png) > max_bytes:
        raise ToolError(f"image is {len(png)} bytes; the limit is {max_bytes}")
    check_png(png)
    return png


def save_png(png: bytes, image_dir: Path) -> Path:
    """Writes the PNG atomically (temp file + rename) so a reader never sees half an image."""
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{hashlib.sha256(png).hexdigest()[:16]}.png"
    fd, tmp = tempfile.mkstemp(dir=image_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
