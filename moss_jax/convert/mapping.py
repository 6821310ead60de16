"""Name and layout mapping between HF CodeGen/MOSS state dicts and MossLM parameters.

HF stores the fused qkv projection as 4 model-parallel shards ("mp_num = 4"), each
holding query, VALUE, key (in that order) for heads shard*(H/4) .. shard*(H/4)+H/4-1.
We keep q, k, v as separate [D, H, K] kernels. All other tensors are transposes
(torch Linear stores [out, in]) or identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" name: safetensors and --dtype use it)
import numpy as np

from moss_jax.config import DTYPES, MossConfig

MP_NUM = 4
# Buffers some CodeGen/MOSS checkpoints carry that are not parameters.
IGNORED_HF_TENSORS = re.compile(r"^transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|bias)$")


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, unexpected or has the wrong shape."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more of our (unstacked) parameters."""

    hf_name: str
    hf_shape: tuple[int, ...]
    layer: int | None  # layer index, None for non-layer tensors
    paths: tuple[tuple[str, ...], ...]  # our paths (within a layer for layer tensors)
    shapes: tuple[tuple[int, ...], ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF -> ours
    join: Callable[..., np.ndarray]  # ours -> HF


def _transpose(x: np.ndarray) -> tuple[np.ndarray]:
    return (x.T,)


def _identity(x: np.ndarray) -> tuple[np.ndarray]:
    return (x,)


def tensor_rules(config: MossConfig) -> list[TensorRule]:
    """The full mapping for `config`, in HF state-dict order."""
    d, h, k, f, v = config.d_model, config.n_heads, config.head_dim, config.mlp_dim, config.vocab_size
    if h % MP_NUM:
        raise CheckpointError(
            f"n_heads={h} is not divisible by {MP_NUM}: the HF CodeGen/MOSS qkv layout cannot hold this model"
        )

    def split_qkv(w):
        w4 = w.reshape(MP_NUM, 3, d // MP_NUM, d)  # (shard, [q, v, k], local out, in)
        q, val, key = (w4[:, i].reshape(d, d).T.reshape(d, h, k) for i in range(3))
        return q, key, val

    def join_qkv(q, key, val):
        parts = [x.reshape(d, d).T.reshape(MP_NUM, d // MP_NUM, d) for x in (q, val, key)]
        return np.stack(parts, axis=1).reshape(3 * d, d)

    rules = [
        TensorRule("transformer.wte.weight", (v, d), None, (("embedding",),), ((v, d),), _identity, lambda x: x),
    ]
    for i in range(config.n_layers):
        p = f"transformer.h.{i}."
        rules += [
            TensorRule(p + "ln_1.weight", (d,), i, (("ln", "scale"),), ((d,),), _identity, lambda x: x),
            TensorRule(p + "ln_1.bias", (d,), i, (("ln", "bias"),), ((d,),), _identity, lambda x: x),
            TensorRule(
                p + "attn.qkv_proj.weight",
                (3 * d, d),
                i,
                (("attn", "query"), ("attn", "key"), ("attn", "value")),
                ((d, h, k),) * 3,
                split_qkv,
                join_qkv,
            ),
            TensorRule(
                p + "attn.out_proj.weight",
                (d, d),
                i,
                (("attn", "out"),),
                ((h, k, d),),
                lambda w: (w.T.reshape(h, k, d),),
                lambda o: o.reshape(d, d).T,
            ),
            TensorRule(
                p + "mlp.fc_in.weight", (f, d), i, (("mlp", "fc_in_kernel"),), ((d, f),), _transpose, np.transpose
            ),
            TensorRule(p + "mlp.fc_in.bias", (f,), i, (("mlp", "fc_in_bias"),), ((f,),), _identity, lambda x: x),
            TensorRule(
                p + "mlp.fc_out.weight", (d, f), i, (("mlp", "fc_out_kernel"),), ((f, d),), _transpose, np.transpose
            ),
            TensorRule(p + "mlp.fc_out.bias", (d,), i, (("mlp", "fc_out_bias"),), ((d,),), _identity, lambda x: x),
        ]
    rules += [
        TensorRule("transformer.ln_f.weight", (d,), None, (("ln_f", "scale"),), ((d,),), _identity, lambda x: x),
        TensorRule("transformer.ln_f.bias", (d,), None, (("ln_f", "bias"),), ((d,),), _identity, lambda x: x),
        # A tied model (MossConfig.tie_embeddings) exports a copy of its embedding as the head.
        TensorRule("lm_head.weight", (v, d), None, (("embedding",),), ((v, d),), _identity, lambda x: x)
        if config.tie_embeddings
        else TensorRule("lm_head.weight", (v, d), None, (("lm_head_kernel",),), ((d, v),), _transpose, np.transpose),
        TensorRule("lm_head.bias", (v,), None, (("lm_head_bias",),), ((v,),), _identity, lambda x: x),
    ]
    return rules


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...], where: str) -> Any:
    for key in path:
        if key not in tree:
            raise CheckpointError(f"params are missing {where}")
        tree = tree[key]
    return tree


def param_dtype(dtype: Any, source: str = "dtype") -> np.dtype:
    """`dtype` as a numpy dtype, if it is one MossLM parameters may have (config.DTYPES).

    Raises CheckpointError for anything else: casting to an integer type would truncate the
    weights (int8 is a load-time option: `--weights int8` of chat/serve), and a dtype the
    config cannot name would leave moss_config.json's `param_dtype` wrong.
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        hint = ""
        if resolved is not None and resolved.kind in "iu":
            hint = (
                "; int8 weights are a load-time option (--weights int8 of python -m moss_jax.chat / "
                "moss_jax.serve), not a checkpoint dtype"
            )
        raise CheckpointError(f"{source}: cannot store parameters as dtype {dtype!r}; choose one of {DTYPES}{hint}")
    return resolved


class ParamsBuilder:
    """Fills MossLM parameters from HF tensors that arrive one at a time (e.g. shard by shard).

    Holds one copy of our parameters; each HF tensor can be dropped right after `add`.
    """

    def __init__(self, config: MossConfig, dtype: Any = None, source: str = "state_dict"):
        if config.tie_embeddings:
            raise CheckpointError(
                f"{source}: MossConfig.tie_embeddings=True, but HF CodeGen/MOSS checkpoints have an untied "
                "head; load them with tie_embeddings=False"
            )
        self.config = config
        self.dtype = None if dtype is None else param_dtype(dtype, source)
        self.source = source
        self.rules = {r.hf_name: r for r in tensor_rules(config)}
        self.seen: set[str] = set()
        self.ignored: list[str] = []
        self.params: dict = {}

    def add(self, name: str, array: np.ndarray, where: str | None = None) -> None:
        where = where or self.source
        rule = self.rules.get(name)
        if rule is None:
            if IGNORED_HF_TENSORS.match(name):
                self.ignored.append(name)
                return
            raise CheckpointError(f"{where}: unexpected tensor {name!r} (shape {tuple(array.shape)}) for this config")
        if tuple(array.shape) != rule.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(array.shape)}, expected {rule.hf_shape} "
                f"for the config (d_model={self.config.d_model}, n_heads={self.config.n_heads}, "
                f"mlp_dim={self.config.mlp_dim}, vocab_size={self.config.vocab_size})"
            )
        if name in self.seen:
            raise CheckpointError(f"{where}: tensor {name!r} appears twice")
        self.seen.add(name)
        array = np.asarray(array)
        dtype = self.dtype or array.dtype
        for path, value in zip(rule.paths, rule.split(array), strict=True):
            if rule.layer is None:
                _set(self.params, path, np.ascontiguousarray(value, dtype=dtype))
                continue
            full = ("layers",) + path
            stacked = self._lookup(full)
            if stacked is None:
                stacked = np.zeros((self.config.n_layers,) + value.shape, dtype)
                _set(self.params, full, stacked)
            stacked[rule.layer] = value

    def _lookup(self, path):
        tree = self.params
        for key in path:
            if not isinstance(tree, dict) or key not in tree:
                return None
            tree = tree[key]
        return tree

    def finish(self) -> dict:
        """Checks every expected tensor arrived; returns params in the config's layer layout."""
        missing = [n for n in self.rules if n not in self.seen]
        if missing:
            shown = ", ".join(f"{n} {self.rules[n].hf_shape}" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.source}: missing tensor(s) {shown}{more}")
        return self.params if self.config.scan_layers else unstack_layers(self.params, self.config.n_layers)


def unstack_layers(params: Mapping, n_layers: int) -> dict:
    """{'layers': stacked} -> {'layers_0': ..., 'layers_1': ...} (scan_layers=False layout)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = _map_tree(params["layers"], lambda x, i=i: x[i])
    return out


def stack_layers(params: Mapping, n_layers: int) -> dict:
    """Inverse of `unstack_layers`; returns params unchanged if already stacked."""
    if "layers" in params:
        return dict(params)
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(n_layers)]
    out["layers"] = _stack_trees(per_layer)
    return out


def _map_tree(tree, fn):
    return {k: _map_tree(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _stack_trees(trees):
    first = trees[0]
    return {
        k: _stack_trees([t[k] for t in trees])
        if isinstance(first[k], Mapping)
        else np.stack([np.asarray(t[k]) for t in trees])
        for k in first
    }


def params_from_hf(state_dict: Mapping[str, Any], config: MossConfig, dtype: Any = None) -> dict:
    """Converts a HF CodeGen/MOSS state dict (name -> numpy array) to MossLM params."""
    builder = ParamsBuilder(config, dtype=dtype)
    for name, array in state_dict.items():
        builder.add(name, np.asarray(array))
    return builder.finish()


def iter_hf_tensors(params: Mapping, config: MossConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) one tensor at a time, from params in either layer layout."""
    stacked = "layers" in params
    for rule in tensor_rules(config):
        parts = []
        for path in rule.paths:
            if rule.layer is None:
                value = _get(params, path, "/".join(path))
            elif stacked:
                value = _get(params, ("layers",) + path, "layers/" + "/".join(path))[rule.layer]
            else:
                name = f"layers_{rule.layer}"
                value = _get(params, (name,) + path, name + "/" + "/".join(path))
            value = np.asarray(value)
            expected = rule.shapes[len(parts)]
            if value.shape != expected:
                raise CheckpointError(
                    f"param {'/'.join(path)} (layer {rule.layer}) has shape {value.shape}, expected {expected}"
                )
            parts.append(value)
        yield rule.hf_name, np.ascontiguousarray(rule.join(*parts))


def params_to_hf(params: Mapping, config: MossConfig) -> dict[str, np.ndarray]:
    """Converts MossLM params to a HF CodeGen/MOSS state dict (name -> numpy array)."""
    return dict(iter_hf_tensors(params, config))
