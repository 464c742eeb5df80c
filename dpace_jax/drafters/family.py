"""The base class of a drafter family's registry entry (dpace_jax.drafters.DRAFTERS): its HF
architecture name, parameter schema, checks and the fields it adds to config.json. The DFlash
drafter (dpace_jax.drafters.dflash) is the base; a variant overrides what differs."""

from __future__ import annotations

from typing import Any


class DrafterFamily:
    arch = "dflash"  # DrafterConfig.arch
    architecture = "DFlashDraftModel"  # config.json `architectures`
    config_type: type | None = None  # the family's nested config (DrafterConfig.family_cfg)
    schema: Any = None  # dpace_jax.nn.schema.Schema

    def check(self, cfg) -> None:
        """ValueError naming the field when cfg is not a consistent drafter of this family."""
        want = self.config_type
        if want is None and cfg.family_cfg is not None:
            raise ValueError(f"drafter config: arch={cfg.arch!r} has no family settings, got "
                             f"{type(cfg.family_cfg).__name__}")
        if want is not None and not isinstance(cfg.family_cfg, want):
            raise ValueError(f"drafter config: arch={cfg.arch!r} needs family_cfg="
                             f"{want.__name__}(...), got {type(cfg.family_cfg).__name__}")

    def config_from_hf(self, hf: dict, dflash_config: dict, source: str):
        """The nested config from config.json (ValueError naming a bad field)."""
        return None

    def config_to_hf(self, cfg, out: dict) -> None:
        """Add this family's fields to the config.json dict `out`."""
