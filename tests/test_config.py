import dataclasses

import pytest

from moss_jax.config import PRESETS, ConfigError, MossConfig, get_config


def test_moss_moon_003_numbers():
    c = PRESETS["moss-moon-003"]
    assert (c.n_layers, c.d_model, c.n_heads, c.head_dim, c.mlp_dim) == (34, 6144, 24, 256, 24576)
    assert (c.rotary_dim, c.max_len, c.vocab_size, c.layer_norm_eps) == (64, 2048, 107008, 1e-5)
    assert c.activation == "gelu_new"
    assert (c.bos_token_id, c.eos_token_id) == (106028, 106068)
    assert abs(c.num_params / 16.7e9 - 1) < 0.005


def test_presets_present():
    for name in ("moss-moon-003", "350m", "2b", "6b", "125m", "tiny", "debug"):
        assert isinstance(PRESETS[name], MossConfig)
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("nope")


def test_frozen_and_replace():
    c = PRESETS["debug"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3  # type: ignore[misc]
    assert c.replace(n_layers=3).n_layers == 3


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(d_model=65), "d_model"),
        (dict(rotary_dim=7), "rotary_dim"),
        (dict(rotary_dim=32), "rotary_dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(activation="swish9"), "activation"),
        (dict(dtype="int8"), "dtype"),
        (dict(remat_policy="most"), "remat_policy"),
        (dict(eos_token_id=512), "eos_token_id"),
        (dict(vocab_size=1.5), "vocab_size"),
        (dict(rotary_base="10000"), "rotary_base"),
        (dict(rotary_base=float("inf")), "rotary_base"),
        (dict(rotary_base=0.0), "rotary_base"),
        (dict(rotary_base=True), "rotary_base"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps"),
        (dict(dropout_rate="0.1"), "dropout_rate"),
        (dict(dropout_rate=float("nan")), "dropout_rate"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(initializer_range=0.0), "initializer_range"),
        (dict(initializer_range=-0.02), "initializer_range"),
        (dict(initializer_range=None), "initializer_range"),
        (dict(eos_token_id=True), "eos_token_id"),
        (dict(bos_token_id=3.7), "bos_token_id"),
        (dict(pad_token_id="1"), "pad_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(scan_layers="false"), "scan_layers"),
        (dict(scan_layers=0), "scan_layers"),
        (dict(tie_embeddings=1), "tie_embeddings"),
    ],
)
def test_inconsistent_config_names_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        PRESETS["debug"].replace(**changes)


def test_valid_numbers_are_accepted():
    c = PRESETS["debug"].replace(rotary_base=500000, initializer_range=1, dropout_rate=0, eos_token_id=0)
    assert c.rotary_base == 500000 and c.eos_token_id == 0


def test_hf_round_trip():
    for name in ("moss-moon-003", "350m", "2b", "6b"):
        c = PRESETS[name]
        assert MossConfig.from_hf(c.to_hf()) == c
    # Dropout and unset token ids survive too.
    c = PRESETS["debug"].replace(dropout_rate=0.1)
    hf = c.to_hf()
    assert hf["bos_token_id"] is None and hf["eos_token_id"] is None and hf["pad_token_id"] is None
    assert MossConfig.from_hf(hf) == c
    with pytest.raises(ConfigError, match="embd_pdrop=0.1 differs from resid_pdrop=0.0"):
        MossConfig.from_hf(dict(hf, resid_pdrop=0.0))
    assert MossConfig.from_hf(dict(hf, resid_pdrop=0.0), dropout_rate=0.0).dropout_rate == 0.0


def test_hf_export_refuses_a_rotary_base_hf_cannot_express():
    with pytest.raises(ConfigError, match="rotary_base=500000.*fix the rotary base at 10000"):
        PRESETS["debug"].replace(rotary_base=500000.0).to_hf()


@pytest.mark.parametrize("fields", [{"wbits": 4, "groupsize": 128}, {"quantization_config": {"quant_method": "gptq"}}])
def test_from_hf_rejects_gptq_checkpoints(fields):
    moss_int4 = dict(PRESETS["moss-moon-003"].to_hf("moss"), **fields)
    with pytest.raises(ConfigError, match="GPTQ-quantized checkpoints are not supported; use the fp16 release"):
        MossConfig.from_hf(moss_int4)
    moss = PRESETS["moss-moon-003"].to_hf("moss")
    assert moss["model_type"] == "moss" and moss["n_embd"] == 6144


def test_from_hf_defaults_and_errors():
    c = MossConfig.from_hf({"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": None})
    assert c.mlp_dim == 256 and c.rotary_dim == 16
    with pytest.raises(ConfigError, match="n_head"):
        MossConfig.from_hf({"vocab_size": 100, "n_embd": 64, "n_layer": 2})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        MossConfig.from_hf({"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="model_type"):
        MossConfig.from_hf({"model_type": "llama"})


def test_hf_config_matches_transformers(hf_reference):
    transformers, _ = hf_reference
    c = PRESETS["350m"]
    hf = transformers.CodeGenConfig(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert MossConfig.from_hf(hf.to_dict()) == c
    # Unset token ids are written as null, so transformers does not fill in CodeGen's 50256.
    debug = PRESETS["debug"]
    hf = transformers.CodeGenConfig(**debug.to_hf())
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, None, None)
    assert MossConfig.from_hf(hf.to_dict()) == debug
