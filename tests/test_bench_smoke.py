"""Smoke runs of bench/train_step.py and bench/decode.py at --shape tiny on CPU: the JSON has
every field, finite where it must be, and the analytic FLOP count matches a hand count. No
timing assertions."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench import decode as bench_decode  # noqa: E402
from bench import train_step as bench_train  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_train_step_smoke(tmp_path):
    out_path = tmp_path / "train.json"
    # One loss keeps the test short (each loss is one compilation); both losses in one run are
    # the default of the script.
    out = bench_train.main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--losses",
                            "dpace", "--matmul-size", "64", "--output", str(out_path),
                            "--attention", "flash", "--attention-tile", "32", "--markdown"])
    saved = json.loads(out_path.read_text())
    assert saved["benchmark"] == "train_step"
    assert saved["config"]["attention"] == "flash" and saved["config"]["attention_tile"] == 32
    assert saved["device"]["platform"] == "cpu"
    assert [r["loss"] for r in saved["results"]] == ["dpace"]
    for r in saved["results"]:
        assert r["step"]["n"] == 2 and r["step"]["median_ms"] > 0
        for key in ("tokens_per_s", "model_tflops_per_s", "executed_tflops_per_s",
                    "mfu_measured_matmul", "compile_s"):
            assert _finite(r[key]) and r[key] > 0, key
        assert r["mfu_spec"] is None and r["peak_bytes_in_use"] is None  # CPU
        assert _finite(r["metrics"]["loss"]) and r["metrics"]["num_blocks"] == 16
        assert r["compiled_memory"] is None or r["compiled_memory"]["estimated_peak"] > 0
    assert saved["dpace_overhead_vs_dflash"] is None  # needs both losses
    assert all(_finite(v) and v > 0 for v in saved["flops"].values())
    assert out["flops"]["model_total"] == saved["flops"]["model_total"]


def test_train_flops_hand_count():
    """Qwen3-4B shapes: the terms against numbers worked out by hand (docs/performance.md)."""
    shape = common.shape_preset("qwen3-4b")
    tcfg = common.target_config(shape)
    dcfg = bench_train.drafter_lib.DrafterConfig.for_target(tcfg, num_layers=5, block_size=16,
                                                           mask_token_id=151669)
    assert dcfg.target_layer_ids == (1, 9, 17, 25, 33)
    p_layer = 2560 * 4096 * 2 + 2 * 2560 * 1024 + 3 * 2560 * 9728
    assert bench_train.layer_matmul_params(tcfg) == p_layer == 100_925_440
    f = bench_train.train_flops(tcfg, dcfg, 1, 3072, 512, mean_anchor=1528.0)
    r = 512 * 16
    # The step runs the target's layers 0..33 only (the deepest feature layer).
    assert f["target_projections"] == pytest.approx(2 * p_layer * 3072 * 34)
    assert f["target_attention_computed"] == pytest.approx(34 * 4 * 4096 * 3072**2)
    assert f["drafter_context_attention_computed_fwd"] == pytest.approx(5 * 4 * r * 4096 * 3072)
    assert f["lm_head_fwd"] == pytest.approx(2 * r * 2560 * 151936)
    assert f["drafter_fc_fwd"] == pytest.approx(2 * 3072 * 5 * 2560 * 2560)
    # ~21.1 TFLOP target projections, ~6.4 TFLOP per LM-head pass, ~65.3 TFLOP model total.
    assert f["target_projections"] / 1e12 == pytest.approx(21.08, abs=0.01)
    assert f["lm_head_fwd"] / 1e12 == pytest.approx(6.37, abs=0.01)
    assert f["model_total"] / 1e12 == pytest.approx(65.3, abs=0.1)
    parts = f["model_target"] + f["model_drafter"] + f["model_lm_head"]
    assert parts == pytest.approx(f["model_total"])
    assert bench_train.train_flops(tcfg, dcfg, 1, 3072, 512, 1528.0, remat=True)[
        "executed_total"] > f["executed_total"]
    # The fused target attention skips the upper triangle; the flash drafter attention skips
    # about the hidden half of the context and recomputes its scores once.
    cudnn = bench_train.train_flops(tcfg, dcfg, 1, 3072, 512, 1528.0, target_attention="cudnn")
    assert f["executed_total"] - cudnn["executed_total"] == pytest.approx(
        f["target_attention_computed"] - f["target_attention_visible"])
    flash = bench_train.train_flops(tcfg, dcfg, 1, 3072, 512, 1528.0, attention="flash")
    saved = 3 * (f["drafter_context_attention_computed_fwd"]
                 - f["drafter_context_attention_visible_fwd"])
    assert f["executed_total"] - flash["executed_total"] == pytest.approx(
        saved - 0.5 * f["drafter_context_attention_visible_fwd"])
    assert flash["model_total"] == cudnn["model_total"] == f["model_total"]


def test_dpace_overhead():
    rows = [{"loss": "dflash", "step": {"median_ms": 200.0}},
            {"loss": "dpace", "step": {"median_ms": 201.0}}]
    assert bench_train.dpace_overhead(rows) == pytest.approx(0.005)
    assert bench_train.dpace_overhead(rows[1:]) is None


def test_mean_anchor_all_positions():
    import numpy as np

    mask = np.ones((2, 100), np.int32)
    assert bench_train.mean_anchor_position(mask, 16) == pytest.approx(42.0)  # mean of 0..84


def test_decode_smoke(tmp_path):
    out_path = tmp_path / "decode.json"
    bench_decode.main(["--shape", "tiny", "--contexts", "16", "--batches", "2",
                       "--new-tokens", "3,7", "--repeats", "2", "--output", str(out_path),
                       "--markdown"])
    saved = json.loads(out_path.read_text())
    assert saved["benchmark"] == "decode"
    assert _finite(saved["bandwidth"]["bytes_per_s"]) and saved["bandwidth"]["bytes_per_s"] > 0
    assert [(r["mode"], r["context"], r["batch"]) for r in saved["results"]] == [
        ("dflash", 16, 2), ("autoregressive", 16, 2)]
    for r in saved["results"]:
        assert [run["max_new_tokens"] for run in r["runs"]] == [3, 7]
        assert r["runs"][1]["iterations"] > r["runs"][0]["iterations"] >= 1
        for key in ("ms_per_iteration", "floor_ms", "ratio_to_floor", "ms_per_token_at_tau",
                    "prefill_and_overhead_ms"):
            assert _finite(r[key]), key
        assert r["floor_ms"] > 0 and 1.0 <= r["runs"][1]["tau"] <= 8
        roof = r["roofline"]
        assert roof["dflash_bytes"] > roof["autoregressive_bytes"] > roof["target_weight_bytes"]
    ar = saved["results"][1]
    assert ar["runs"][1]["iterations"] == 6  # block size 1: one token per step after prefill


def test_bad_flags():
    with pytest.raises(ValueError, match="--shape"):
        bench_train.main(["--shape", "huge"])
    with pytest.raises(ValueError, match="--new-tokens"):
        bench_decode.main(["--shape", "tiny", "--new-tokens", "8,4"])
    with pytest.raises(ValueError, match="--contexts"):
        bench_decode.main(["--shape", "tiny", "--contexts", "a,b"])


def test_decode_smoke_on_a_qwen3_5_target(tmp_path):
    """bench/decode.py at --shape qwen3.5-tiny (Qwen3.5-4B's layer pattern and head ratios, tiny
    widths), in its autoregressive mode (the DFlash loop on these targets is tested in
    tests/test_qwen3_5_target.py): it runs, one token per step, and the roofline counts the
    full-attention layers' KV plus the linear layers' recurrent state and convolution history."""
    out_path = tmp_path / "decode.json"
    bench_decode.main(["--shape", "qwen3.5-tiny", "--contexts", "16", "--batches", "2",
                       "--modes", "autoregressive", "--new-tokens", "3,7", "--repeats", "1",
                       "--output", str(out_path)])
    (ar,) = json.loads(out_path.read_text())["results"]
    assert ar["mode"] == "autoregressive" and _finite(ar["ms_per_iteration"])
    assert ar["runs"][1]["iterations"] == 6
    shape = bench_decode.common.shape_preset("qwen3.5-tiny")["target"]
    kv = bench_decode.kv_bytes(2, 2, 16, 1, 32)  # 2 of the 8 layers attend over the context
    state = 6 * 2 * 2 * (4 * 4 * 16 * 16 + 2 * 3 * (2 * 2 * 16 + 4 * 16))  # 6 linear layers
    assert shape["layer_types"].count("full_attention") == 2
    assert ar["roofline"]["target_kv_bytes"] == kv + state
