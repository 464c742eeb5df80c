"""The stages of SPD's pipeline (dpace_jax.infer.spd.pipeline): how a target is split over the
`stage` mesh axis and what one stage computes. Stage s of n holds the target's layers [s*L/n,
(s+1)*L/n) and their KV cache; its output is the boundary state b_{s+1}."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpace_jax.nn import layers
from dpace_jax.targets.model import KVCache, ModelConfig, decoder_layer, write_at

AXIS = "stage"


def stage_layer_ids(cfg: ModelConfig, num_stages: int) -> tuple[int, ...]:
    """The boundary layers: stage s's last layer id (s + 1) * L / n - 1, for s < n."""
    check_stages(cfg, num_stages)
    per = cfg.num_layers // num_stages
    return tuple((s + 1) * per - 1 for s in range(num_stages))


def check_stages(cfg: ModelConfig, num_stages: int) -> None:
    """ValueError unless the target splits into num_stages equal stages of a dense model."""
    if int(num_stages) != num_stages or num_stages < 2:
        raise ValueError(f"num_stages must be an integer >= 2 (one stage is autoregressive "
                         f"decoding: dpace_jax.infer.decode), got {num_stages}")
    if cfg.num_layers % num_stages:
        raise ValueError(f"num_stages={num_stages} does not divide the target's "
                         f"num_layers={cfg.num_layers}")
    if cfg.arch not in ("qwen3", "llama"):
        raise ValueError(f"SPD supports dense qwen3 / llama targets, not arch={cfg.arch!r}")


def rope(cfg: ModelConfig, positions: jax.Array):
    """RoPE cos, sin [..., E] at positions [...] (with YaRN's attention factor)."""
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.scaling_dict)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    factor = layers.rope_attention_factor(cfg.scaling_dict)
    return (cos * factor, sin * factor) if factor != 1.0 else (cos, sin)


def stage_forward(stage_layers, cfg: ModelConfig, x: jax.Array, cache: KVCache,
                  start: jax.Array):
    """One stage: its decoder layers (stacked [L/n, ...]) on x [B, T, D] at positions
    start[b] + 0..T-1, writing keys / values there into its cache [L/n, B, S, G, E]; queries see
    slots up to their own position -> (x [B, T, D], cache)."""
    positions = start[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    cos, sin = rope(cfg, positions)
    slots = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
    mask = (slots[None, None, :] <= positions[:, :, None])[:, None, None]  # [B, 1, 1, T, S]

    def step(x, inputs):
        p, ck, cv = inputs

        def attend(q, k, v):
            ck2, cv2 = write_at(ck, k, start), write_at(cv, v, start)
            probs = layers.masked_softmax(layers.attention_logits(q, ck2), mask)
            return layers.attention_output(probs, cv2), (ck2, cv2)

        x, (ck2, cv2) = decoder_layer(x, p, cos, sin, cfg, attend)
        return x, (ck2, cv2)

    x, (ks, vs) = jax.lax.scan(step, x, (stage_layers, cache.k, cache.v))
    return x, KVCache(ks, vs)


def target_specs(target_params):
    """PartitionSpecs: the stacked layers split over `stage`, everything else replicated."""
    specs = jax.tree.map(lambda _: P(), target_params)
    return dataclasses.replace(specs, layers=jax.tree.map(lambda _: P(AXIS),
                                                          target_params.layers))


def stage_mesh(num_stages: int, devices=None) -> Mesh:
    """A 1-D mesh of the first num_stages devices on the `stage` axis."""
    devices = list(jax.devices() if devices is None else devices)
    if num_stages > len(devices):
        raise ValueError(f"num_stages={num_stages} needs as many devices; only {len(devices)} "
                         "available (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.asarray(devices[:num_stages]), (AXIS,))
