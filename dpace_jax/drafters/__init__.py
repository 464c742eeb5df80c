"""Drafters: one family per published drafter architecture, each a registry entry (a
dpace_jax.drafters.family.DrafterFamily) in DRAFTERS, selected by `DrafterConfig.arch` (the
`drafter.arch` setting) or, in a checkpoint, by its `architectures`."""

from __future__ import annotations

from dpace_jax.drafters.family import DrafterFamily

DRAFTERS: dict[str, DrafterFamily] = {}


def register(family: DrafterFamily) -> DrafterFamily:
    DRAFTERS[family.arch] = family
    return family


def drafter_family(arch: str) -> DrafterFamily:
    """The family of DrafterConfig.arch `arch` (ValueError naming the known ones)."""
    _load()
    if arch not in DRAFTERS:
        raise ValueError(f"drafter.arch={arch!r}; expected one of {sorted(DRAFTERS)}")
    return DRAFTERS[arch]


def family_of_architectures(archs, source: str) -> DrafterFamily:
    """The family whose config.json `architectures` name is among `archs`."""
    _load()
    for f in DRAFTERS.values():
        if f.architecture in (archs or []):
            return f
    raise ValueError(f"{source}: field 'architectures' is {archs!r}, expected one of "
                     f"{[[f.architecture] for f in DRAFTERS.values()]} (not a drafter)")


def _load() -> None:
    """Import the family modules (each registers itself) on first use: they import the
    drafter config, which checks through this registry."""
    from dpace_jax.drafters import dflash, dflash2  # noqa: F401
