"""IncrementalDetokenizer against a real (tiny, freshly trained) byte-level BPE tokenizer."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from router.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

CORPUS = [
    "The café serves coffee and tea every day.",
    "日本語 is the Japanese language.",
    "Say hello world 🙂 to everyone!",
    "hello world, hello there, café 日本語 🙂",
] * 3
# Mostly characters the tiny vocab has no merges for, so they split into byte tokens.
TEXT = "café 日本語 🙂 hello world. Ünïcödé ✓ 中文 and the end"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def stream(tok, ids, **kwargs) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = []
    for i in ids:
        step = detok.add(i)
        deltas.append(step.text_delta)
        if step.stop_string is not None:
            return deltas, "", detok
    return deltas, detok.flush(), detok


def test_tokens_really_split_characters(tok):
    ids = tok.encode(TEXT).ids
    assert any(tok.decode(ids[:n]).endswith(REPLACEMENT_CHAR) for n in range(1, len(ids)))


def test_deltas_reassemble_the_full_decode_without_broken_chars(tok):
    ids = tok.encode(TEXT).ids
    deltas, tail, detok = stream(tok, ids, prompt_ids=tok.encode("Prompt: 日本").ids)
    assert "".join(deltas) + tail == tok.decode(ids) == TEXT
    assert detok.text == TEXT
    assert not any(REPLACEMENT_CHAR in d for d in deltas + [tail])


def test_special_tokens_skipped_or_kept(tok):
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("日本").ids + [eos] + tok.encode("語").ids
    for skip in (True, False):
        deltas, tail, _ = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_random_token_streams_match_decode(tok):
    # Random byte tokens make invalid UTF-8 too; the stream must still equal the decode.
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        deltas, tail, _ = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_flush_emits_incomplete_char_as_replacement(tok):
    ids = tok.encode("ok 中").ids
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith(REPLACEMENT_CHAR))
    deltas, tail, _ = stream(tok, ids[:cut])
    assert REPLACEMENT_CHAR not in "".join(deltas)
    assert "".join(deltas) + tail == tok.decode(ids[:cut])
    assert tail.endswith(REPLACEMENT_CHAR)


def test_stop_string_spanning_tokens_is_caught(tok):
    ids = tok.encode(TEXT).ids
    stop = "ld. Ün"
    assert not any(stop in tok.decode([i]) for i in ids)  # really spans several tokens
    deltas, _, detok = stream(tok, ids, stop=["never", stop])
    assert detok.stop_string == stop
    assert "".join(deltas) == detok.text == TEXT[: TEXT.index(stop)]
    with pytest.raises(RuntimeError):
        detok.add(ids[0])
    assert detok.flush() == ""


def test_stop_prefix_is_held_then_released(tok):
    text = "hello 中文 end"
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, stop=["中文!"])
    seen, held_steps = "", 0
    for n, i in enumerate(ids, 1):
        step = detok.add(i)
        assert step.stop_string is None
        seen += step.text_delta
        if tok.decode(ids[:n]).endswith(("中", "中文")):
            held_steps += 1
            assert seen == "hello "  # could still become "中文!"
    assert held_steps >= 2
    assert seen == text  # released once " end" ruled the stop out
    assert detok.flush() == ""


def test_stop_prefix_at_end_released_by_flush(tok):
    deltas, tail, detok = stream(tok, tok.encode("hello wor").ids, stop=["world"])
    assert "".join(deltas) == "hello "
    assert tail == "wor" and detok.stop_string is None
