import json

from moss_jax.demo import main


def test_demo_runs_and_checks_itself(capsys):
    assert main(["--preset", "debug", "--batch", "4", "--seq_len", "16", "--new_tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["params"] == 165376
    assert report["moss_moon_003_params"] == 16717980160
    assert report["kv_cache_max_abs_diff"] <= 1e-4
    assert report["sharded_max_abs_diff"] <= 1e-5  # conftest gives 8 CPU devices
