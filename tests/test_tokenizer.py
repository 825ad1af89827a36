import json

import pytest

from models.tokenizer import Tokenizer
from models.tokenizer_builder import LLAMA4_SPECIAL_TOKENS, build_tokenizer, padded_vocab_size

BPE = 384  # the tiny preset's ordinary vocabulary

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith a tab.",
    "café naïve crème brûlée Dvořák Łódź",
    "日本語のテキスト 你好，世界 한국어",
    "emoji 🙂🚀👍🏽 ❤️ and a flag 🇫🇷",
    "numbers 1234567 3.14159 -42 $1,299.99 (50%)",
    "def f(x):\n    return x ** 2  # square",
    "  leading and trailing spaces  ",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "  You are a terse assistant.\n"},
    {"role": "user", "content": "What is a mixture of experts?"},
    {"role": "assistant", "content": "A layer that routes each token to a few expert networks."},
    {"role": "user", "content": [{"type": "text", "text": "Why is that cheaper? 🙂"}]},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    info = build_tokenizer(path, BPE)
    return path, info


def test_build_is_byte_for_byte_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a", BPE)
    build_tokenizer(tmp_path / "b", BPE)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_round_trip(tok_dir):
    tok = Tokenizer.from_dir(tok_dir[0])
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text
        assert all(0 <= i < BPE for i in ids), "ordinary text must not produce special ids"
        with_bos = tok.encode(text)
        assert with_bos == [tok.bos_token_id, *ids]
        assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_specials_follow_the_bpe_vocab(tok_dir):
    path, info = tok_dir
    tok = Tokenizer.from_dir(path)
    assert list(info.special_tokens) == list(LLAMA4_SPECIAL_TOKENS)
    assert list(info.special_tokens.values()) == list(range(BPE, BPE + len(LLAMA4_SPECIAL_TOKENS)))
    assert info.vocab_size == tok.vocab_size == BPE + len(LLAMA4_SPECIAL_TOKENS)
    for token, tid in info.special_tokens.items():
        assert tok.encode(token, add_bos=False) == [tid]
    assert tok.encode("hi<|eot|>", add_bos=False)[-1] == info.special_tokens["<|eot|>"]
    sp = info.special_tokens
    assert info.bos_token_id == tok.bos_token_id == sp["<|begin_of_text|>"]
    assert info.eos_token_ids == (sp["<|end_of_text|>"], sp["<|eom|>"], sp["<|eot|>"])
    assert info.pad_token_id == tok.pad_token_id == sp["<|finetune_right_pad|>"]
    # With 64 specials a multiple-of-64 BPE vocab needs no padding, so the image tokens are the last ids.
    assert padded_vocab_size(info.vocab_size) == info.vocab_size
    assert sp["<|image_start|>"] == info.vocab_size - 4 and sp["<|image|>"] == info.vocab_size - 2


def test_eos_ids_come_from_generation_config_when_present(tok_dir, tmp_path):
    path, info = tok_dir
    assert Tokenizer.from_dir(path).eos_token_ids == (info.special_tokens["<|eot|>"],)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(info.eos_token_ids)}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == info.eos_token_ids


def test_chat_template(tok_dir):
    tok = Tokenizer.from_dir(tok_dir[0])
    prompt = tok.apply_chat_template(CONVERSATION[:2])
    assert prompt == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a terse assistant.<|eot|>"
                      "<|header_start|>user<|header_end|>\n\nWhat is a mixture of experts?<|eot|>"
                      "<|header_start|>assistant<|header_end|>\n\n")
    assert not tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False).endswith("\n\n")
    ids = tok.encode(prompt, add_bos=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(Exception, match="system message must come first"):
        tok.apply_chat_template([CONVERSATION[1], CONVERSATION[0]])


def test_transformers_agrees(tok_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path, info = tok_dir
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        ours.bos_token_id, ours.eos_token_ids[0], ours.pad_token_id)
    assert len(hf) == info.vocab_size
    for text in [*TEXTS, "a <|header_start|>user<|header_end|> b<|eot|>"]:
        ids = ours.encode(text, add_bos=False)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == ours.decode(ids)
    ours_prompt = ours.apply_chat_template(CONVERSATION)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == ours_prompt
    assert hf.encode(ours_prompt, add_special_tokens=False) == ours.encode(ours_prompt, add_bos=False)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_vocab_size_bounds(tmp_path):
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        build_tokenizer(tmp_path, 100)
    with pytest.raises(ValueError, match="at most"):
        build_tokenizer(tmp_path, 100_000)
