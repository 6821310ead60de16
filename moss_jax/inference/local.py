"""Loading a model for inference, and a one-request `TextGenerator` on the local device(s)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from moss_jax.config import MossConfig
from moss_jax.inference.chat_session import Generation
from moss_jax.inference.decoder import bucket
from moss_jax.inference.generate import ChunkUpdate, decode_rows, get_decoder
from moss_jax.inference.sampling import SamplingParams
from moss_jax.inference.streaming import SequenceStream
from moss_jax.model import abstract_params, param_shardings
from moss_jax.quant import WEIGHT_MODES, quantize_params


def load_model(
    checkpoint: str | os.PathLike, mesh: Mesh | None = None, weights: str = "float32"
) -> tuple[MossConfig, Any]:
    """(config, params) from our checkpoint (save_params: params + moss_config.json) or a HF dir.

    `weights` = "int8", "int8_dynamic" or "bfloat16" stores the matmul kernels that way for decoding
    (moss_jax.quant; single device only).
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHT_MODES}")
    if weights != "float32" and mesh is not None:
        raise ValueError(f"weights={weights!r} is supported on one device only (no tensor parallelism yet)")
    config, params = _load(checkpoint, mesh)
    return config, quantize_params(params, weights)


def _load(checkpoint: str | os.PathLike, mesh: Mesh | None) -> tuple[MossConfig, Any]:
    from moss_jax.convert.checkpoint_io import CONFIG_NAME, load_config, load_hf_checkpoint, load_params

    path = Path(checkpoint)
    if (path / CONFIG_NAME).is_file():
        target = None
        if mesh is not None:
            config = load_config(path)
            shardings = param_shardings(config, mesh)
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                nn.unbox(abstract_params(config)),
                shardings,
            )
        return load_params(path, target)
    if (path / "config.json").is_file():
        config, params = load_hf_checkpoint(path)
        if mesh is not None:
            params = jax.device_put(params, param_shardings(config, mesh))
        return config, params
    raise FileNotFoundError(
        f"{path}: neither a moss_jax checkpoint (moss_config.json) nor a HF directory (config.json)"
    )


class LocalGenerator:
    """Runs one prompt at a time on this host's devices (the terminal chat's backend).

    Decoders are cached per (prompt, new-token) bucket, so a conversation compiles a handful
    of times (prompt lengths 16, 32, 64, ...) and never again.
    """

    def __init__(self, params: Any, config: MossConfig, decode: Callable[[list[int]], str], *, mesh=None, chunk_size=8):
        self.params = params
        self.config = config
        self.decode = decode
        self.mesh = mesh
        self.chunk_size = chunk_size

    def generate_text(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str],
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        if max_new_tokens < 1:
            raise ValueError(f"no room to generate: max_new_tokens={max_new_tokens}")
        cache_len = bucket(len(prompt_ids), 16) + bucket(max_new_tokens, 16)
        decoder = get_decoder(self.config, 1, cache_len, self.mesh, self.chunk_size)
        stream = SequenceStream(max_new_tokens, stop_ids, stop_strings, self.decode)

        def callback(update: ChunkUpdate) -> None:
            if on_text is not None and update.texts and update.texts[0]:
                on_text(update.texts[0])

        decode_rows(decoder, self.params, [prompt_ids], [stream], [sampling], callback)
        return Generation(stream.text, stream.tokens, stream.finish_reason or "length")
