"""Run set-up checks: drafter/target mismatches and mask-token choice fail with clear errors."""

import jax
import pytest
from hf_fixtures import make_tiny_tokenizer

from dpace_jax.config import default_config
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.targets import model as model_lib
from dpace_jax.train import drafter as drafter_setup
from dpace_jax.train import loop as trainer
from dpace_jax.train import sft
from dpace_jax.train.settings import DrafterSettings, LoopConfig

TARGET = model_lib.ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128,
                               num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16)


def _config(**drafter):
    c = default_config()
    c.drafter.num_layers = 2
    c.drafter.block_size = 4
    for k, v in drafter.items():
        setattr(c.drafter, k, v)
    return c


def build_drafter(c, target_cfg, tokenizer):
    return drafter_setup.build_drafter(DrafterSettings.from_config(c.drafter), target_cfg,
                                       tokenizer)


def test_default_drafter_follows_the_target():
    dcfg, _ = build_drafter(_config(), TARGET, make_tiny_tokenizer())
    assert dcfg.hidden_size == 64 and dcfg.num_target_layers == 6
    assert dcfg.target_layer_ids == (1, 3)  # round(1 + i * (6 - 4) / 1)
    assert dcfg.mask_token_id == make_tiny_tokenizer().convert_tokens_to_ids("<|MASK|>")


def test_layer_ids_beyond_the_target_are_refused():
    with pytest.raises(ValueError, match="target_layer_ids"):
        build_drafter(_config(target_layer_ids=(1, 6)), TARGET,
                                     make_tiny_tokenizer())


def test_mask_token_outside_vocab_is_refused():
    with pytest.raises(ValueError, match="mask_token_id=300"):
        build_drafter(_config(mask_token_id=300), TARGET, make_tiny_tokenizer())


@pytest.mark.parametrize("field,value", [("hidden_size", 32), ("num_layers", 8)])
def test_init_from_a_drafter_for_another_target_is_refused(tmp_path, field, value):
    import dataclasses

    other = dataclasses.replace(TARGET, **{field: value},
                                **({"head_dim": 8} if field == "hidden_size" else {}))
    dcfg = drafter_lib.DrafterConfig.for_target(other, num_layers=1, block_size=4,
                                                mask_token_id=259, target_layer_ids=(1,))
    drafter_hf.export_drafter(drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(0)),
                              dcfg, tmp_path)
    expect = "hidden_size" if field == "hidden_size" else "num_target_layers"
    with pytest.raises(ValueError, match=expect):
        build_drafter(_config(init_from=str(tmp_path)), TARGET,
                                     make_tiny_tokenizer())


def test_too_few_samples_for_one_batch():
    c = _config()
    c.train.batch_size = 8
    with pytest.raises(ValueError, match="batch_size=8"):
        sft.total_steps(LoopConfig.from_config(c.train), 5)
    c.train.epochs = 2
    assert sft.total_steps(LoopConfig.from_config(c.train), 20) == 4


def test_feature_layers_with_the_last_target_layer_warn_once():
    import warnings

    tok = make_tiny_tokenizer()
    with pytest.warns(UserWarning, match=r"drafter.target_layer_ids=\[1, 5\] includes the "
                                         r"target's last layer \(5\)"):
        build_drafter(_config(target_layer_ids=(1, 5)), TARGET, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_drafter(_config(target_layer_ids=(1, 5)), TARGET, tok)  # once
        build_drafter(_config(target_layer_ids=(1, 4)), TARGET, tok)  # no warning


def test_attention_layout_options():
    tok = make_tiny_tokenizer()
    dcfg, _ = build_drafter(_config(sliding_window=16), TARGET, tok)
    assert dcfg.layer_types == ("sliding_attention",) * 2 and dcfg.sliding_window == 16
    mixed = ("full_attention", "sliding_attention")
    dcfg, _ = build_drafter(
        _config(sliding_window=8, layer_types=mixed, is_causal=True), TARGET, tok)
    assert (dcfg.layer_types, dcfg.layer_windows, dcfg.layer_causal) == (mixed, (0, 8),
                                                                         (True, True))
    plain, _ = build_drafter(_config(), TARGET, tok)
    assert plain.layer_types == ("full_attention",) * 2 and plain.layer_causal == (False,) * 2
    cases = [(dict(sliding_window=-1), "drafter.sliding_window=-1 must be >= 0"),
             (dict(layer_types=("full_attention",)), "drafter.layer_types has 1 entries.*"
                                                     "drafter.num_layers=2"),
             (dict(layer_types=("full_attention", "swa"), sliding_window=4),
              r"drafter.layer_types: unknown \['swa'\]"),
             (dict(layer_types=mixed), "set drafter.sliding_window >= 1"),
             (dict(layer_types=("full_attention",) * 2, sliding_window=4),
              "no sliding_attention layer")]
    for fields, match in cases:
        with pytest.raises(ValueError, match=match):
            build_drafter(_config(**fields), TARGET, tok)


def test_the_drafter_attention_layout_can_differ_from_the_target():
    """drafter.num_heads / num_kv_heads / head_dim (0: the target's); the drafter trains and
    exports with its own layout (its attention reads only its projections of the features)."""
    import jax.numpy as jnp

    from dpace_jax.drafters.dflash import init_drafter_params, train_forward

    tok = make_tiny_tokenizer()
    dcfg, _ = build_drafter(_config(num_heads=8, num_kv_heads=4, head_dim=8), TARGET, tok)
    assert (dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim) == (8, 4, 8)
    assert (TARGET.num_heads, TARGET.num_kv_heads, TARGET.head_dim) == (4, 2, 16)
    hf = drafter_hf.config_to_hf(dcfg)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (8, 4, 8)
    assert drafter_hf.config_from_hf(hf) == dcfg
    params = init_drafter_params(dcfg, jax.random.PRNGKey(0))
    assert params.layers.q.shape == (2, 64, 8, 8)
    hidden = train_forward(params, dcfg, model_lib.init_params(TARGET, jax.random.PRNGKey(1)),
                           jnp.zeros((1, 12, 2 * 64)), jnp.zeros((1, 12), jnp.int32),
                           jnp.array([[2, 5]]))
    assert hidden.shape == (1, 2, 4, 64)
    only_heads, _ = build_drafter(_config(num_heads=8), TARGET, tok)
    assert (only_heads.num_heads, only_heads.num_kv_heads, only_heads.head_dim) == (8, 2, 16)
    for fields, match in [(dict(head_dim=-8), r"drafter.head_dim=-8 must be >= 0"),
                          (dict(num_heads=6, num_kv_heads=4),
                           "drafter.num_heads=6 must be a multiple of drafter.num_kv_heads=4")]:
        with pytest.raises(ValueError, match=match):
            build_drafter(_config(**fields), TARGET, tok)


def test_training_imports_neither_evaluation_nor_the_demo():
    import subprocess
    import sys

    code = ("import sys, dpace_jax.train.loop, dpace_jax.regenerate; "
            "print(sorted(m for m in sys.modules if m.startswith('dpace_jax.demo') "
            "or m == 'dpace_jax.infer.evaluation'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_demo_targets_need_the_demo_step(tmp_path):
    c = _config()
    c.target.path, c.workdir = "demo:cpu", str(tmp_path)
    with pytest.raises(ValueError, match="target.path='demo:cpu' names the embedded demo"):
        trainer.run(c)


def test_the_resume_fingerprint_keeps_older_runs_of_the_same_masks():
    """Runs before the optional is_causal recorded is_causal=false: a drafter without a causal
    layer still matches them; a sliding (causal) layout does not."""
    from dpace_jax.train import resume

    plain, _ = build_drafter(_config(), TARGET, make_tiny_tokenizer())
    assert plain.is_causal is None and "is_causal" not in drafter_hf.config_to_hf(plain)
    assert resume.drafter_fingerprint(plain)["is_causal"] is False
    mixed = ("sliding_attention", "full_attention")
    sliding, _ = build_drafter(_config(sliding_window=8, layer_types=mixed), TARGET,
                               make_tiny_tokenizer())
    assert any(sliding.layer_causal) and "is_causal" not in resume.drafter_fingerprint(sliding)
