"""Tokenizer: offline GPT-2 BPE, truncation, padding."""

from __future__ import annotations

import pytest
import torch

from filterd.tokenizer import Tokenizer, max_length_from, pad_batch


def test_gpt2_ids_offline():
    tok = Tokenizer(1024)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode("Win a FREE prize now!")) == "Win a FREE prize now!"


def test_special_token_text_is_ordinary_text():
    ids = Tokenizer(64).encode("<|endoftext|>")
    assert 50256 not in ids and len(ids) > 1


def test_truncation_and_empty_text():
    tok = Tokenizer(8)
    assert len(tok.encode("word " * 100)) == 8
    assert tok.encode("") == [50256]  # an empty message still gets a score
    assert [len(x) for x in tok.encode_batch(["a b c", "", "x " * 50])] == [3, 1, 8]


def test_huge_message_is_truncated_quickly():
    tok = Tokenizer(1024)
    for text in ("a" * 100_000, "spam " * 20_000, "€" * 100_000):
        assert len(tok.encode(text)) == 1024


def test_lone_surrogates_do_not_crash():
    assert len(Tokenizer(16).encode("bad \udcff byte")) >= 2


def test_bounds():
    with pytest.raises(ValueError):
        Tokenizer(0)
    with pytest.raises(ValueError):
        Tokenizer(1025)
    assert max_length_from([5, 120, 7]) == 120
    assert max_length_from([5000], cap=1024) == 1024


def test_pad_batch_right_pads_with_50256():
    ids, lengths = pad_batch([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [4, 50256, 50256]] and lengths.tolist() == [3, 1]
    assert ids.dtype == torch.long
