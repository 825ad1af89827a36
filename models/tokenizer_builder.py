"""Build a small, real, deterministic Llama 4-style tokenizer for random-weight checkpoints.

Byte-level BPE trained with the `tokenizers` library on a built-in corpus, then the Llama 4 special
tokens appended after the ordinary vocabulary (as in the released models, where they start at 200000).
Writes ``tokenizer.json``, ``tokenizer_config.json`` (with a Llama 4-style chat template) and
``special_tokens_map.json`` so that both ``models.tokenizer.Tokenizer`` and transformers' ``AutoTokenizer``
load the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Reserved tokens pad the special block to exactly 64 ids: with a BPE vocabulary that is a multiple of 64
# the model's padded vocab_size then equals the tokenizer's, so the image tokens are its last four ids
# (the checkpoint writer derives boi/eoi/image_token_index from that).
_NUM_RESERVED = 47
LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
    *(f"<|text_post_train_reserved_special_token_{i}|>" for i in range(_NUM_RESERVED)),
    "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
    "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
)
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>"
EOS_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")  # the released generation configs list all three

# The o200k-style split the released Llama 4 tokenizer applies before byte-level BPE: case-aware words
# with contractions, digits in groups of at most three, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Lowercase ids, digits, punctuation and some non-ASCII, so merges cover what tests and demos type.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few of many
feed-forward networks, so a model can hold far more parameters than it spends on any single token.
Each router scores the experts, keeps the best one, and adds the output of a shared expert that sees
everything. The attention layers are dense; only the feed-forward blocks are sparse.

Once upon a time, in a small village by the sea, there lived an old fisherman and his curious daughter.
Every morning they walked down to the harbour, counted the boats, and talked about the weather, the
price of bread, the stars, and the stories their neighbours told. "What is beyond the horizon?" she
asked. "More water," he said, smiling, "and more questions."

Serving large language models is a systems problem: memory, bandwidth and latency all matter. We
measure throughput in tokens per second, time to first token in milliseconds, and the cost of every
request in dollars. In 2024, a cluster of 8 GPUs with 80 GB each could hold 640 GB of weights; at 2 bytes
per parameter that is about 320,000,000,000 parameters. Prices rose 3.5% (from $1,299.99 to $1,345.49).

def add(a, b):
    return a + b  # returns the sum; see https://example.com/docs?id=42&lang=en

Call me at 555-0134 or email hello@example.org before 10:30 am on 2025-03-14. Version v1.2.3 fixed
bugs #101, #202 and #303. Temperatures ranged from -4 to +38 degrees; 1/3 of the runs were faster.

A café on the corner serves crème brûlée to naïve tourists, who say "très bon!" and "danke schön".
Über alles: jalapeño, piñata, façade, coöperate, smörgåsbord, Ærø, Øresund, Łódź, Dvořák.
日本語のテキストも少し含めます。東京は大きな都市です。中文也可以：你好，世界！한국어도 조금 있습니다.
Греческий и русский: привет, мир! Καλημέρα κόσμε. Emoji: 🙂 😀 🚀 ❤️ 👍 🎉 — and symbols: € £ ¥ © ® ™ ° ± × ÷.

Why do some questions remain unanswered? Because answering them would require knowing what we do not
know, and that, as philosophers have observed for centuries, is the hardest kind of knowledge to have.
Students, teachers, engineers, doctors, farmers, writers, musicians and painters all learn by doing,
failing, trying again, and slowly building intuition about their craft.
"""


def _training_text() -> list[str]:
    # The corpus alone runs out of pairs near 1,200 tokens. Pseudo-words ("bado", "kemi", ...) let larger
    # vocabularies train too; repeating the corpus keeps its (real English) merges first in line.
    cons, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in cons for v in vowels]
    words = [a + b for a in syllables for b in syllables]
    lines = [" ".join(words[i:i + 16]) + "\n" for i in range(0, len(words), 16)]
    return CORPUS.splitlines(keepends=True) * _CORPUS_WEIGHT + lines


_CORPUS_WEIGHT = 32


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int  # ordinary + special tokens (the model may pad its embedding beyond this)
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    special_tokens: dict[str, int] = field(hash=False)


# Llama 4-style template: system (if any) first, one header/body/<|eot|> block per message; content may
# be a string or a list of {"type": "text", "text": ...} parts as in OpenAI-style multimodal messages.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{- raise_exception('a system message must come first') }}"
    "{%- endif %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def build_tokenizer(out_dir: str | Path, bpe_vocab_size: int, model_max_length: int = 131072) -> TokenizerInfo:
    """Train the BPE (ids ``0..bpe_vocab_size-1``), append the specials, write the three files."""
    if bpe_vocab_size < 256 + 16:
        raise ValueError(f"bpe_vocab_size must be >= 272 (256 byte tokens plus merges), got {bpe_vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # The trainer breaks count ties by pair ids, so merges do not depend on thread scheduling (checked with
    # TOKENIZERS_PARALLELISM=true and 8 rayon threads across processes); the test pins the bytes.
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if tok.get_vocab_size() != bpe_vocab_size:  # the corpus ran out of pairs to merge
        raise ValueError(f"the built-in training text yields at most {tok.get_vocab_size()} BPE tokens, "
                         f"asked for {bpe_vocab_size}")
    tok.add_special_tokens(list(LLAMA4_SPECIAL_TOKENS))
    specials = {t: tok.token_to_id(t) for t in LLAMA4_SPECIAL_TOKENS}
    assert list(specials.values()) == list(range(bpe_vocab_size, bpe_vocab_size + len(specials)))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in specials.items()},
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    return TokenizerInfo(vocab_size=tok.get_vocab_size(), bos_token_id=specials[BOS],
                         eos_token_ids=tuple(specials[t] for t in EOS_TOKENS), pad_token_id=specials[PAD],
                         special_tokens=specials)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
