"""An independent PyTorch DFlash decoder for the tests: greedy speculative decoding of a
`transformers` target with an exported DFlash drafter, written from the decoding rules (features
are `output_hidden_states[j + 1]` of the target; the drafter's layers are HF Qwen3 modules).

Deliberately simple rather than fast: no KV caches. Every verify step runs the target afresh over
the whole sequence and the drafter afresh over the whole context, so a cache or rollback mistake
in the code under test cannot be mirrored here.

Rules (greedy): the prompt's last logits give the first token. At each step, with the last
emitted token at position a, the drafter reads the target features of positions < a and the block
[last, MASK, ...] at positions a..a+K-1 and proposes the argmax at block positions 1..K-1; the
target scores [sequence < a; block] and takes its argmax at each block position; acc is the
number of leading proposals equal to the target's choice one position earlier; the step emits
those acc tokens and the target's token after them, acceptance length acc + 1. Generation stops
after a stop token (kept) or max_new_tokens tokens (the last step's tokens are cut there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        h, g, e, d = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.hidden_size)
        self.q_proj = nn.Linear(d, h * e, bias=False)
        self.k_proj = nn.Linear(d, g * e, bias=False)
        self.v_proj = nn.Linear(d, g * e, bias=False)
        self.o_proj = nn.Linear(h * e, d, bias=False)
        self.q_norm = Qwen3RMSNorm(e, eps=cfg.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(e, eps=cfg.rms_norm_eps)


class DrafterLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_type: str, is_causal: bool | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        self.self_attn = Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.window = cfg.sliding_window if layer_type == "sliding_attention" else None
        # z-lab's rule: is_causal absent -> sliding layers causal; given -> every layer or none
        self.causal = layer_type == "sliding_attention" if is_causal is None else is_causal

    def mask(self, ctx_len: int, anchor: int, k: int) -> torch.Tensor:
        """[K, ctx_len + K] bool: what block position i (absolute anchor + i) sees."""
        query = anchor + torch.arange(k)[:, None]
        ctx = torch.arange(ctx_len)[None, :].expand(k, ctx_len)
        seen_ctx = ctx < anchor
        if self.window is not None:
            seen_ctx = seen_ctx & (ctx > query - self.window)
        block = anchor + torch.arange(k)[None, :]
        seen_block = (block <= query) if self.causal else torch.ones(k, k, dtype=torch.bool)
        if self.window is not None:  # the window holds inside the block too, both ways
            seen_block = seen_block & ((query - block).abs() < self.window)
        return torch.cat([seen_ctx, seen_block], dim=1)

    def forward(self, x, context, cos_sin_block, cos_sin_all, anchor):
        k, ctx_len, a = x.shape[0], context.shape[0], self.self_attn
        h = self.input_layernorm(x)
        kv_in = torch.cat([context, h])
        q = a.q_norm(a.q_proj(h).view(k, self.heads, self.head_dim)).transpose(0, 1)
        keys = a.k_norm(a.k_proj(kv_in).view(-1, self.kv_heads, self.head_dim)).transpose(0, 1)
        vals = a.v_proj(kv_in).view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
        q, _ = apply_rotary_pos_emb(q, q, *cos_sin_block, unsqueeze_dim=0)
        keys, _ = apply_rotary_pos_emb(keys, keys, *cos_sin_all, unsqueeze_dim=0)
        rep = self.heads // self.kv_heads
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
        scores = q @ keys.transpose(1, 2) / self.head_dim ** 0.5
        scores = scores.masked_fill(~self.mask(ctx_len, anchor, k), float("-inf"))
        attn = (scores.softmax(-1) @ vals).transpose(0, 1).reshape(k, -1)
        x = x + a.o_proj(attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    """A DFlash HF directory (config.json + model.safetensors) as a PyTorch module."""

    def __init__(self, path):
        super().__init__()
        hf = json.loads((Path(path) / "config.json").read_text())
        self.block_size = hf["block_size"]
        self.mask_token_id = hf["dflash_config"]["mask_token_id"]
        self.layer_ids = hf["dflash_config"]["target_layer_ids"]
        cfg = Qwen3Config(**{k: v for k, v in hf.items() if k not in ("architectures",)})
        types = cfg.layer_types
        self.layers = nn.ModuleList(DrafterLayer(cfg, t, hf.get("is_causal"))
                                    for t in types)
        d = cfg.hidden_size
        self.fc = nn.Linear(len(self.layer_ids) * d, d, bias=False)
        self.hidden_norm = Qwen3RMSNorm(d, eps=cfg.rms_norm_eps)
        self.norm = Qwen3RMSNorm(d, eps=cfg.rms_norm_eps)
        self.rotary = Qwen3RotaryEmbedding(cfg)
        missing, unexpected = self.load_state_dict(
            load_file(str(Path(path) / "model.safetensors")), strict=False)
        assert not unexpected and all(k.startswith("rotary") for k in missing), (missing,
                                                                                 unexpected)
        self.eval()

    def forward(self, features, block_embeds, anchor):
        """features [S, n*D] (positions 0..S-1), block embeddings [K, D] at anchor.. ->
        hidden [K, D]."""
        k = block_embeds.shape[0]
        context = self.hidden_norm(self.fc(features))
        positions = torch.cat([torch.arange(features.shape[0]), anchor + torch.arange(k)])
        cos, sin = self.rotary(block_embeds[None], positions[None])
        cos_all, sin_all = cos[0], sin[0]
        block = (cos_all[-k:], sin_all[-k:])
        x = block_embeds
        for layer in self.layers:
            x = layer(x, context, block, (cos_all, sin_all), anchor)
        return self.norm(x)


def load_target(path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def greedy_decode(target, drafter: Drafter, prompt, *, max_new_tokens, stop_token_ids):
    """-> (generated token ids, acceptance length of every verify step)."""
    stops = set(stop_token_ids)
    seq = list(prompt)
    k = drafter.block_size

    def run_target(tokens):
        out = target(torch.tensor([tokens]), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[j + 1][0] for j in drafter.layer_ids], dim=-1)
        return out.logits[0], feats

    logits, _ = run_target(seq)
    out = [int(logits[-1].argmax())]
    seq.append(out[-1])
    accepted = []
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    while out[-1] not in stops and len(out) < max_new_tokens:
        anchor = len(seq) - 1
        _, feats = run_target(seq[:anchor])
        block = [seq[-1]] + [drafter.mask_token_id] * (k - 1)
        hidden = drafter(feats, embed(torch.tensor(block)), anchor)
        block[1:] = head(hidden[1:]).argmax(-1).tolist()
        logits, _ = run_target(seq[:anchor] + block)
        choice = logits[anchor:].argmax(-1).tolist()
        acc = 0
        while acc < k - 1 and block[acc + 1] == choice[acc]:
            acc += 1
        accepted.append(acc + 1)
        for token in block[1: acc + 1] + [choice[acc]]:
            out.append(token)
            seq.append(token)
            if token in stops or len(out) >= max_new_tokens:
                break
    return out, accepted
