"""A small chat tokenizer for tests, built offline with the `tokenizers` library.

`build_chat_tokenizer()` trains a byte-level BPE (any text encodes; offsets work) on a few strings
and wraps it in `transformers.PreTrainedTokenizerFast` with ChatML special tokens and a chat
template:

- "qwen3" (default) mimics Qwen3's template: an assistant turn after the last user message is
  rendered with an empty `<think>\\n\\n</think>\\n\\n` block, earlier ones without it, and the
  generation prompt carries the empty think block when `enable_thinking=False`. So the rendered
  history is NOT a prefix-stable concatenation of the per-turn renders (like the real one).
- "chatml": plain prefix-stable ChatML (Qwen2.5-style, no thinking switch).

Special tokens: `<|endoftext|>` (pad, id 0), `<|im_start|>`, `<|im_end|>` (eos), `<|MASK|>`;
`<think>`/`</think>` are added (non-special) tokens as in Qwen3. `save_pretrained` works.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
THINK_TOKENS = ["<think>", "</think>"]

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEMPLATES = {"qwen3": QWEN3_TEMPLATE, "chatml": CHATML_TEMPLATE}

_CORPUS = [
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the sky.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 10",
    "system user assistant think answer question number",
]


def build_chat_tokenizer(template: str = "qwen3", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE chat tokenizer with ChatML special tokens and the named template."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {sorted(TEMPLATES)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|MASK|>"],
    )
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = TEMPLATES[template]
    return fast
