"""The embedded demo (see dpace_jax/demo/config.py): `python train.py --config configs/demo.py`
then `python evaluate.py --config configs/demo.py`; `python -m dpace_jax.demo` runs both.
A DFlash 2 drafter trained with D-PACE. Other recipes: `--config configs/demo.py:gpu` (the larger
target), `:cpu-dflash` (a DFlash drafter), `:cpu-qwen3.5` (a Qwen3.5 hybrid target)."""

from dpace_jax.demo.config import get_config as _demo_config


def get_config(size: str = "cpu"):
    return _demo_config(size or "cpu")
