"""rustbpe against a plain-Python reference trainer; tiktoken parity; chat rendering and its errors."""
import collections
import warnings

import pytest
import regex
import rustbpe
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, get_token_bytes, get_tokenizer

from conftest import sample_texts


def reference_train(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Textbook BPE: recount every pair before each merge; most frequent wins, ties to the smallest pair."""
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(regex.findall(pattern, text))
    words = {tuple(chunk.encode("utf-8")): count for chunk, count in chunk_counts.items()}
    merges = []
    for new_id in range(256, vocab_size):
        pair_counts = collections.Counter()
        for ids, count in words.items():
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        merged_words = collections.Counter()
        for ids, count in words.items():
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            merged_words[tuple(out)] += count
        words = merged_words
    vocab = {i: bytes([i]) for i in range(256)}
    for new_id, (left, right) in enumerate(merges, start=256):
        vocab[new_id] = vocab[left] + vocab[right]
    return [(vocab[i], i) for i in range(len(vocab))]


def rust_train(texts, vocab_size, buffer_size=8192):
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size)
    return trainer


PROSE = sample_texts(60_000)
MULTILINGUAL = [
    "Hello world! 你好，世界！こんにちは世界 🙂🙃😀 emoji 🇫🇷🇯🇵 flags",
    "Ünïcödé çömbïnïng: e\u0301 a\u0308 o\u0302 — naïve café résumé; Ελληνικά; русский текст; עברית; العربية",
    "한국어 문장입니다. 中文句子。日本語の文です。 👩‍👩‍👧‍👦 family, 🏳️‍🌈, ‍zero width",
] * 20
REPETITIVE = ["ab" * 50, "ba" * 50, "aaaa bbbb aaaa", "abcabcabc " * 10, "xyxyxy yxyxyx", "zz" * 7] * 5


@pytest.mark.parametrize("vocab_size", [300, 512, 2048])
@pytest.mark.parametrize("corpus_name", ["prose", "multilingual", "repetitive"])
def test_rustbpe_matches_reference_trainer(corpus_name, vocab_size):
    corpus = {"prose": PROSE, "multilingual": MULTILINGUAL, "repetitive": REPETITIVE}[corpus_name]
    if corpus_name == "prose" and vocab_size == 2048:
        corpus = corpus[:40]  # the reference recounts everything each merge: keep it quick
    expected = reference_train(corpus, vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora may run out of pairs; checked separately
        trainer = rust_train(corpus, vocab_size, buffer_size=7)  # several buffers, uneven last one
    assert trainer.get_mergeable_ranks() == expected


def test_buffer_size_does_not_change_the_result():
    a = rust_train(PROSE, 700, buffer_size=1).get_mergeable_ranks()
    b = rust_train(PROSE, 700, buffer_size=100_000).get_mergeable_ranks()
    assert a == b


def test_rust_encode_equals_tiktoken_encode():
    trainer = rust_train(PROSE, 1024)
    tokenizer = RustBPETokenizer.from_mergeable_ranks(trainer.get_pattern(), dict(trainer.get_mergeable_ranks()))
    texts = PROSE[:30] + MULTILINGUAL[:3] + ["", " ", "a", "   leading and trailing   ", "12345678 99"]
    for text in texts:
        assert tokenizer.encode(text) == trainer.encode(text)
    assert trainer.batch_encode(texts) == tokenizer.encode(texts)


def test_small_vocab_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="at least 256"):
        rustbpe.Tokenizer().train_from_iterator(iter(["hello"]), 255)
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["hello"]), 260)


def test_iterator_exception_reaches_python_unchanged():
    class Boom(Exception):
        pass

    def documents():
        yield "some text"
        raise Boom("disk on fire")

    with pytest.raises(Boom, match="disk on fire"):
        rustbpe.Tokenizer().train_from_iterator(documents(), 300, buffer_size=1)


def test_non_str_items_raise_type_error():
    with pytest.raises(TypeError, match="str"):
        rustbpe.Tokenizer().train_from_iterator(iter(["fine", b"bytes"]), 300)


def test_running_out_of_pairs_stops_cleanly_and_says_so():
    trainer = rustbpe.Tokenizer()
    with pytest.warns(UserWarning, match="ran out of pairs"):
        trainer.train_from_iterator(iter(["abc"]), 1000)
    assert len(trainer.get_mergeable_ranks()) == 258  # "ab", then "abc"


def test_empty_and_tiny_inputs():
    trainer = rustbpe.Tokenizer()
    with pytest.warns(UserWarning):
        trainer.train_from_iterator(iter(["", "a", ""]), 300)
    assert len(trainer.get_mergeable_ranks()) == 256
    assert trainer.encode("") == []
    assert trainer.encode("a") == [97]


def test_mergeable_ranks_start_with_the_single_bytes():
    ranks = rust_train(PROSE, 400).get_mergeable_ranks()
    assert ranks[:256] == [(bytes([i]), i) for i in range(256)]
    assert [rank for _, rank in ranks] == list(range(400))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_decode_encode_round_trip_for_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_tokens_follow_the_bpe_vocab(tiny_tokenizer):
    ids = [tiny_tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(512 - len(SPECIAL_TOKENS), 512))
    assert tiny_tokenizer.get_bos_token_id() == ids[0]
    # text that looks like a special token is encoded as ordinary text
    assert tiny_tokenizer.get_bos_token_id() not in tiny_tokenizer.encode("<|bos|>")


def test_encode_prepend_append_and_batch(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    ids = tiny_tokenizer.encode("hello", prepend="<|bos|>", append=end)
    assert ids[0] == bos and ids[-1] == end and tiny_tokenizer.decode(ids[1:-1]) == "hello"
    batch = tiny_tokenizer.encode(["one", "two three"], prepend=bos, num_threads=2)
    assert [tiny_tokenizer.decode(row[1:]) for row in batch] == ["one", "two three"]
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(42)


def test_token_bytes_come_from_raw_bytes(tiny_tokenizer):
    token_bytes = tiny_tokenizer.compute_token_bytes()
    assert token_bytes.shape == (512,)
    for token_id in range(512 - len(SPECIAL_TOKENS)):
        assert token_bytes[token_id] == len(tiny_tokenizer.enc.decode_single_token_bytes(token_id))
    assert (token_bytes[-len(SPECIAL_TOKENS):] == 0).all()
    # single bytes >= 0x80 are not valid UTF-8 on their own: a str round trip would get their length wrong
    assert token_bytes[0xC3] == 1


def test_save_and_load_round_trip(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    loaded = get_tokenizer()
    text = "Round trip through disk, with ünïcode and 🙂."
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.get_vocab_size() == 512
    assert get_token_bytes().tolist() == tiny_tokenizer.compute_token_bytes().tolist()


def test_missing_tokenizer_says_how_to_train_one(base_dir):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_tokenizer()


# ---------------------------------------------------------------- chat rendering


def special(tokenizer, name):
    return tokenizer.encode_special(name)


def test_render_conversation_masks_only_what_the_assistant_produces(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check. "},
                {"type": "python", "text": "2+2"},
                {"type": "python_output", "text": "4"},
                {"type": "text", "text": "It is 4."},
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    ids, mask = tok.render_conversation(conversation)
    assert len(ids) == len(mask)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Let me check. <|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert untrained.startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|><|assistant_start|>")
    assert "<|output_start|>4<|output_end|>" in untrained
    assert ids[0] == tok.get_bos_token_id()


def test_render_conversation_truncates(tiny_tokenizer):
    conversation = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok " * 100}]
    ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=50)
    assert len(ids) == len(mask) == 50
    full_ids, _ = tiny_tokenizer.render_conversation(conversation)
    assert ids == full_ids[:50]


def test_render_for_completion_primes_the_assistant(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids = tok.render_for_completion(conversation)
    assert ids[-1] == special(tok, "<|assistant_start|>")
    assert "Hello!" not in tok.decode(ids)
    assert tok.render_for_completion(conversation[:1]) == ids


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "beep"}], "unknown role 'robot'"),
        ([{"role": "assistant", "content": "hi"}], "should be from the user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "should be from the assistant"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
        ([{"role": "user", "content": 5}], "content must be a str"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_malformed_conversations_name_the_problem(tiny_tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message):
        tiny_tokenizer.render_conversation(conversation)
