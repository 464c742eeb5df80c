"""A small byte-level BPE tokenizer for the demo target, with Qwen3-style chat tokens.

Trained by the `tokenizers` library on the demo corpus; deterministic for a given corpus and
vocabulary size. Token ids: the four special tokens first (`<|endoftext|>` 0 = pad,
`<|im_start|>` 1, `<|im_end|>` 2 = eos, `<|MASK|>` 3 = mask), then the BPE vocabulary, then the
two non-special added tokens `<think>` and `</think>` (kept when decoding, as in Qwen3).

The chat template is Qwen3's ChatML layout: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
message; assistant turns after the last user message carry a (here usually empty) think block
`<think>\\n...\\n</think>\\n\\n`; `add_generation_prompt` opens an assistant turn and, with
`enable_thinking=False`, pre-fills the empty think block. The assistant content and its
`<|im_end|>` sit in `{% generation %}` markers, so `return_assistant_tokens_mask=True` yields
the loss mask of the assistant tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END, MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, MASK)
ADDED_TOKENS = (THINK, END_THINK)

# GPT-4o/Qwen2-style pre-split: contractions, words with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace runs (so indentation becomes its own tokens).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + (m.get('reasoning_content') or '').strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train the demo tokenizer on `texts`; `vocab_size` counts every token (specials included).

    The vocabulary can come out smaller when the corpus is too small to fill it. With `out_dir`,
    the tokenizer files (tokenizer.json, tokenizer_config.json, ...) are written there.
    """
    n_fixed = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    if vocab_size < 256 + n_fixed:
        raise ValueError(f"vocab_size must be >= {256 + n_fixed} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        mask_token=MASK,
        additional_special_tokens=[IM_START],
        model_max_length=40960,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
