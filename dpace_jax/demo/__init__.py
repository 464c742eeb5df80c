"""The embedded demo: a small real target built here, from the running interpreter's stdlib.

  corpus     the stdlib .py files and the "complete this function" tasks drawn from them
  tokenizer  a byte-level BPE with Qwen3-style chat tokens, a chat template and `<|MASK|>`
  target     build_demo_target / build_random_target: cached HF-format Qwen3 checkpoints
"""

from __future__ import annotations

_LAZY = {"DEMO_SIZES": "target", "DemoSize": "target", "build_demo_target": "target",
         "build_random_target": "target", "build_tokenizer": "tokenizer"}


def __getattr__(name: str):
    # Lazy, so that `dpace_jax.demo.corpus` alone does not import JAX and transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
