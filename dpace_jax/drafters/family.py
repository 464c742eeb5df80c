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
    # tensor names other writers use -> the published name they stand for (read, never written)
    hf_aliases: dict[str, str] = {}

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

    # Hooks of the DFlash forwards (dpace_jax.drafters.dflash): DFlash's are the identity.

    def around(self, p, cfg):
        """decoder_layer's `around` wrappers of one layer (p: its parameter slice), or None."""
        return None

    def embedding_scale(self, cfg) -> float:
        """What the block's token embeddings are multiplied by."""
        return 1.0

    def logit_transform(self, cfg) -> tuple[float, float | None]:
        """(output multiplier, softcap or None) of the draft logits from the target LM head."""
        return 1.0, None

    # Training (dpace_jax.train.step.loss_fn): terms beyond the objective on the logits.

    def train_top_k(self, cfg) -> int:
        """How many of each position's largest logits `train_terms` needs (0: no terms)."""
        return 0

    def train_terms(self, params, cfg, hidden, labels, mask, top_scores, top_ids, weights,
                    denominator, step, step_cfg):
        """(extra loss, extra metrics) of a batch: hidden [B, N, K, D], labels / mask
        [B, N, K], each position's top logits and their ids [B, N, K, Z], the objective's
        position weights [B, N, K] and denominator (its loss = sum(m w ce) / denominator)."""
        raise NotImplementedError
