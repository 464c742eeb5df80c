"""Qwen3 and Llama-3.1 targets: the plain pre-norm decoder of dpace_jax.targets.base (Qwen3 with
an RMSNorm on q and k per head, Llama without, and with its "llama3" RoPE scaling)."""

from __future__ import annotations

from dpace_jax.targets.base import Family


class Qwen3(Family):
    pass


class Llama(Family):
    arch = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    export = ("LlamaForCausalLM", "llama")
    qk_norm = False

    def hf_config(self, cfg, out: dict) -> None:
        out.update(mlp_bias=False, pretraining_tp=1)


QWEN3 = Qwen3()
LLAMA = Llama()
