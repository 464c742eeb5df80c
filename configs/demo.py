"""The embedded demo (see dpace_jax/demo/config.py): `python train.py --config configs/demo.py`
then `python evaluate.py --config configs/demo.py`; `python -m dpace_jax.demo` runs both.
Use `--config configs/demo.py:gpu` for the larger target."""

from dpace_jax.demo.config import get_config as _demo_config


def get_config(size: str = "cpu"):
    return _demo_config(size or "cpu")
