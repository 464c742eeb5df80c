"""The demo's recipes (dpace_jax/demo/config.py): DFlash 2 is the default drafter, the DFlash
recipe is the former default unchanged, and the configs built on the demo pick the drafter they
need."""

import runpy
from pathlib import Path

import pytest

from dpace_jax.demo import __main__ as demo_cli
from dpace_jax.demo.config import RECIPES, get_config

ROOT = Path(__file__).resolve().parent.parent


def _flat(c):
    return {(s, k): v for s, section in c.to_dict().items() if isinstance(section, dict)
            for k, v in section.items()}


def test_default_is_dflash2_and_the_dflash_recipe_differs_only_in_the_drafter():
    default, dflash = get_config("cpu"), get_config("cpu-dflash")
    assert (default.drafter.arch, default.workdir) == ("dflash2", "runs/demo")
    assert (dflash.drafter.arch, dflash.workdir) == ("dflash", "runs/demo-dflash")
    diff = {k for k, v in _flat(default).items() if _flat(dflash)[k] != v}
    assert diff == {("drafter", "arch"), ("drafter", "selector_rank")}, diff
    assert get_config("cpu-dflash2").to_dict() == {**default.to_dict(),
                                                   "workdir": "runs/demo-dflash2"}
    assert get_config("gpu").drafter.arch == "dflash2"
    assert get_config("cpu-qwen3.5").target.path == "demo:cpu-qwen3.5"


def test_an_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="configs/demo.py: unknown demo recipe 'cpu-x'"):
        get_config("cpu-x")
    with pytest.raises(SystemExit):
        demo_cli.main(["--size", "cpu-x"])


def test_configs_built_on_the_demo():
    spd = runpy.run_path(str(ROOT / "configs" / "demo_spd.py"))["get_config"]("4")
    assert spd.drafter.arch == "dflash"  # train.mode=spd trains a DFlash-style module only
    opd = runpy.run_path(str(ROOT / "configs" / "demo_opd.py"))["get_config"]("runs/demo")
    assert opd.drafter.init_from == "runs/demo"  # the SFT run's drafter, whichever it is
    assert set(RECIPES) >= {"cpu", "gpu", "cpu-dflash", "cpu-dflash2"}
