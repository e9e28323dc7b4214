"""`lorec eval` on a small slice: through the running gateway, offline with transformers + peft, agreeing."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import LOREC, ML100K


def test_lorec_eval_small_slice_agrees_with_offline(http_gateway, tmp_path):
    base, env, _ = http_gateway
    out = tmp_path / "quality.json"
    command = [LOREC, "eval", "--dir", str(ML100K), "--gateway", base, "--adapter", "tiny-random-v1", "--n", "24",
               "--k", "5", "--method", "reit-test", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n_test"] == 24 and result["kind"] == "llm" and 0 <= result["auc"] <= 1
    assert result["offline"]["prompt_mismatches"] == 0
    assert result["offline"]["mean_abs_delta_p"] < 0.01
    recorded = json.loads(out.read_text())["ml-100k"]["reit-test"]
    assert recorded["auc"] == result["auc"] and recorded["command"].startswith("lorec eval --dir")
