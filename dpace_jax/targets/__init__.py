"""Target models: one family per HF architecture, each a registry entry (a
dpace_jax.targets.base.Family) in FAMILIES; dpace_jax.targets.model runs any of them.

A new family is one module (or folder) with its Family subclass, and one line below.
"""

from __future__ import annotations

from dpace_jax.targets import dense, gpt_oss, qwen3_5, qwen3_moe
from dpace_jax.targets.base import Family

FAMILIES: dict[str, Family] = {f.arch: f for f in (
    dense.QWEN3, dense.LLAMA, qwen3_moe.FAMILY, gpt_oss.FAMILY, qwen3_5.DENSE, qwen3_5.MOE)}


def family(arch: str) -> Family:
    """The family of ModelConfig.arch `arch` (ValueError naming the known ones)."""
    if arch not in FAMILIES:
        raise ValueError(f"arch={arch!r} is not a supported target family; expected one of "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[arch]


def family_of_hf(hf: dict, source: str) -> Family:
    """The family of an HF config dict: by its `architectures`, else its `model_type`."""
    archs = hf.get("architectures") or []
    for name in archs:
        for f in FAMILIES.values():
            if name in f.hf_architectures:
                return f
    if not archs:
        for f in FAMILIES.values():
            if hf.get("model_type") in f.model_types:
                return f
    supported = sorted(f.hf_architectures[0] for f in FAMILIES.values())
    raise ValueError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                     f"supported: {supported}")
