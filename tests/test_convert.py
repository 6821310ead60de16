import json

import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import ConfigError, MossConfig
from moss_jax.convert import CheckpointError, params_from_hf, params_to_hf, tensor_rules
from moss_jax.convert.__main__ import main as convert_main
from moss_jax.convert.checkpoint_io import load_hf_checkpoint, load_params, save_hf_checkpoint
from moss_jax.model import MossLM
from tests.hf_utils import make_hf_model, state_dict_numpy


@pytest.fixture(scope="module")
def hf_model(hf_reference):
    transformers, torch = hf_reference
    return make_hf_model(transformers, torch, vocab=301, d=64, layers=3, heads=8, rotary=4)


@pytest.fixture(scope="module")
def config(hf_model):
    return MossConfig.from_hf(hf_model.config.to_dict())


def test_round_trip_is_bit_exact(hf_model, config):
    sd = state_dict_numpy(hf_model)
    for scan in (True, False):
        back = params_to_hf(params_from_hf(sd, config.replace(scan_layers=scan)), config)
        assert set(back) == set(sd)
        for name, array in sd.items():
            assert back[name].dtype == array.dtype
            np.testing.assert_array_equal(back[name], array, err_msg=name)


def test_round_trip_keeps_half_precision(hf_model, config):
    import ml_dtypes

    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict_numpy(hf_model).items()}
    back = params_to_hf(params_from_hf(sd, config), config)
    for name, array in sd.items():
        assert back[name].dtype == array.dtype
        assert back[name].tobytes() == array.tobytes(), name


def test_qkv_layout_trap(config):
    """Shard s of the fused qkv holds (query, VALUE, key) for heads s*H/4 ... (MOSS_SPEC section 1)."""
    d, h, k = config.d_model, config.n_heads, config.head_dim
    qkv = np.arange(3 * d * d, dtype=np.float32).reshape(3 * d, d)
    rule = next(r for r in tensor_rules(config) if r.hf_name.endswith("h.0.attn.qkv_proj.weight"))
    q, key, v = rule.split(qkv)
    local = d // 4
    # Output feature j of head 3 lives in shard 3 // (h/4) at local row (3 % (h/4)) * k + j.
    head, j = 3, 1
    shard, local_head = divmod(head, h // 4)
    base = shard * 3 * local + local_head * k + j
    np.testing.assert_array_equal(q[:, head, j], qkv[base])
    np.testing.assert_array_equal(v[:, head, j], qkv[base + local])
    np.testing.assert_array_equal(key[:, head, j], qkv[base + 2 * local])


def test_missing_and_misshaped_tensors_are_named(hf_model, config):
    sd = state_dict_numpy(hf_model)
    missing = dict(sd)
    del missing["transformer.h.1.mlp.fc_in.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer\.h\.1\.mlp\.fc_in\.bias \(256,\)"):
        params_from_hf(missing, config)
    bad = dict(sd)
    bad["transformer.h.2.attn.out_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        CheckpointError, match=r"'transformer\.h\.2\.attn\.out_proj\.weight' has shape \(64, 32\), expected \(64, 64\)"
    ):
        params_from_hf(bad, config)
    extra = dict(sd, **{"transformer.h.0.attn.rogue": np.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.0.attn.rogue'"):
        params_from_hf(extra, config)
    # Known buffers of older CodeGen/MOSS checkpoints are skipped.
    buffers = dict(sd, **{"transformer.h.0.attn.causal_mask": np.ones((1, 1, 4, 4), bool)})
    params_from_hf(buffers, config)
    with pytest.raises(CheckpointError, match="not divisible by 4"):
        tensor_rules(config.replace(n_heads=2))


def _write_sharded_safetensors(directory, sd, hf_config, n_shards=3):
    from safetensors.numpy import save_file

    directory.mkdir()
    names = list(sd)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: sd[n] for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config))


def test_cli_round_trips_sharded_safetensors(tmp_path, hf_model, config, hf_reference):
    transformers, torch = hf_reference
    sd = state_dict_numpy(hf_model)
    src = tmp_path / "hf"
    _write_sharded_safetensors(src, sd, hf_model.config.to_dict())
    assert convert_main(["hf2orbax", "--hf_dir", str(src), "--out_dir", str(tmp_path / "ours")]) == 0
    cfg, params = load_params(tmp_path / "ours")
    assert cfg == config
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(MossLM(cfg).apply({"params": params}, jnp.asarray(ids)), ref, atol=1e-4, rtol=0)

    out = tmp_path / "hf_back"
    assert (
        convert_main(
            ["orbax2hf", "--ckpt_dir", str(tmp_path / "ours"), "--out_dir", str(out), "--max_shard_size", "40KB"]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, back = load_hf_checkpoint(out, progress=False)
    for name, array in params_to_hf(back, cfg).items():
        np.testing.assert_array_equal(array, sd[name], err_msg=name)
    # transformers itself loads what we wrote.
    reloaded = transformers.CodeGenForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(torch.tensor(ids)).logits.numpy(), hf_model(torch.tensor(ids)).logits.numpy()
        )
    # Refuses to overwrite without --overwrite, and leaves nothing half-written.
    assert convert_main(["orbax2hf", "--ckpt_dir", str(tmp_path / "ours"), "--out_dir", str(out)]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("source_dtype", ["bfloat16", "float16"])
def test_cli_converts_half_precision_in_a_fresh_process(tmp_path, hf_model, source_dtype):
    """A bf16 safetensors export, and --dtype bfloat16, need numpy to know "bfloat16" before jax is
    imported (a fresh `python -m moss_jax.convert` process, not this test process)."""
    import subprocess
    import sys

    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if source_dtype == "bfloat16" else np.float16
    sd = {k: v.astype(dtype) for k, v in state_dict_numpy(hf_model).items()}
    src = tmp_path / "hf"
    _write_sharded_safetensors(src, sd, hf_model.config.to_dict())
    for out, extra in (("keep", []), ("bf16", ["--dtype", "bfloat16"])):
        cmd = [
            sys.executable,
            "-m",
            "moss_jax.convert",
            "hf2orbax",
            "--hf_dir",
            str(src),
            "--out_dir",
            str(tmp_path / out),
        ]
        run = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        cfg, params = load_params(tmp_path / out)
        want = jnp.bfloat16 if extra else dtype
        assert params["embedding"].dtype == want
        assert cfg.param_dtype == np.dtype(want).name  # the config says what the checkpoint holds
        np.testing.assert_array_equal(
            np.asarray(params["embedding"], np.float32), sd["transformer.wte.weight"].astype(want).astype(np.float32)
        )


def test_pytorch_bin_checkpoint(tmp_path, hf_model, config):
    _save_bin(tmp_path / "bin", hf_model)
    cfg, params = load_hf_checkpoint(tmp_path / "bin", progress=False)
    back = params_to_hf(params, cfg)
    for name, array in state_dict_numpy(hf_model).items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)


def _save_bin(directory, model):
    import torch

    directory.mkdir()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_missing_weights_dir_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        from moss_jax.convert.checkpoint_io import hf_weight_files

        hf_weight_files(tmp_path)


def test_hf_export_refuses_a_non_default_rotary_base(tmp_path, hf_model, config):
    """HF CodeGen hard-codes base 10000: the export would load as a different model."""
    params = params_from_hf(state_dict_numpy(hf_model), config)
    with pytest.raises(ConfigError, match="rotary_base=500000.0 cannot be exported"):
        save_hf_checkpoint(tmp_path / "hf", params, config.replace(rotary_base=500000.0), progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_gptq_checkpoint_is_refused_up_front(tmp_path, hf_model, capsys):
    """The MOSS int4/int8 GPTQ releases mark config.json with wbits/groupsize."""
    src = tmp_path / "moss-int4"
    _write_sharded_safetensors(src, state_dict_numpy(hf_model), dict(hf_model.config.to_dict(), wbits=4, groupsize=128))
    with pytest.raises(ConfigError, match="GPTQ-quantized checkpoints are not supported"):
        load_hf_checkpoint(src, progress=False)
    assert convert_main(["hf2orbax", "--hf_dir", str(src), "--out_dir", str(tmp_path / "ours")]) == 2
    assert "GPTQ-quantized" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dtype,int_hint", [("int8", True), (np.int8, True), ("uint8", True), ("float64", False), ("foo", False)]
)
def test_dtypes_params_cannot_have_are_refused(hf_model, config, dtype, int_hint):
    """Casting to int8 would truncate the weights; float64 would leave param_dtype wrong."""
    with pytest.raises(CheckpointError, match="cannot store parameters as dtype .*; choose one of") as e:
        params_from_hf(state_dict_numpy(hf_model), config, dtype=dtype)
    assert ("a load-time option (--weights int8" in str(e.value)) == int_hint


def test_cli_dtype_choices_and_a_float64_file(tmp_path, hf_model, capsys):
    src = tmp_path / "hf"
    sd64 = {k: v.astype(np.float64) for k, v in state_dict_numpy(hf_model).items()}
    _write_sharded_safetensors(src, sd64, hf_model.config.to_dict())
    for dtype in ("int8", "float64", "bf16"):
        with pytest.raises(SystemExit) as e:
            convert_main(["hf2orbax", "--hf_dir", str(src), "--out_dir", str(tmp_path / "out"), "--dtype", dtype])
        assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # A float64 file must be cast: kept as it is, moss_config.json could not say what it holds.
    assert convert_main(["hf2orbax", "--hf_dir", str(src), "--out_dir", str(tmp_path / "out")]) == 2
    assert "stored as float64" in capsys.readouterr().err and not (tmp_path / "out").exists()
    cfg, params = load_hf_checkpoint(src, dtype="float32", progress=False)
    assert cfg.param_dtype == "float32" and params["embedding"].dtype == np.float32


def test_legacy_pytorch_bin_checkpoint(tmp_path, hf_model, caplog):
    """torch.save(..., _use_new_zipfile_serialization=False) files cannot be memory-mapped."""
    import logging

    import torch

    src = tmp_path / "legacy"
    src.mkdir()
    torch.save(hf_model.state_dict(), src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (src / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    with caplog.at_level(logging.WARNING, logger="moss_jax.convert.checkpoint_io"):
        cfg, params = load_hf_checkpoint(src, progress=False)
    assert "legacy (pre-zip) PyTorch file cannot be memory-mapped" in caplog.text
    back = params_to_hf(params, cfg)
    for name, array in state_dict_numpy(hf_model).items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    # A file torch cannot read at all is a CheckpointError naming it.
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch state dict"):
        load_hf_checkpoint(src, progress=False)
