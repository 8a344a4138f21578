"""Tokenizer: offline GPT-2 BPE, truncation, padding."""

from __future__ import annotations

import pytest
import torch

from filterd.model.tokenizer import Tokenizer, max_length_from, pad_batch


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


def _no_network(monkeypatch) -> list[str]:
    """Record (and refuse) every attempt to resolve or connect."""
    import socket

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_missing_tokenizer_files_fail_in_one_line_without_network(tmp_path, monkeypatch):
    from filterd.model import tokenizer
    from filterd.errors import ModelError

    attempts = _no_network(monkeypatch)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenizer._encoding.cache_clear()
    try:
        with pytest.raises(ModelError) as e:
            Tokenizer(8).encode("hello")
    finally:
        tokenizer._encoding.cache_clear()  # the next test loads from the real cache again
    msg = str(e.value)
    assert attempts == [], attempts  # tiktoken would have tried openaipublic.blob.core.windows.net
    assert "\n" not in msg and str(tmp_path) in msg and "TIKTOKEN_CACHE_DIR" in msg
    assert "vocab.bpe" in msg and "6d1cbeee0f20b3d9449abfede4726ed8212e3aee" in msg  # the cache's name for it


def test_corrupt_tokenizer_file_is_refused_not_refetched(tmp_path, monkeypatch):
    import shutil

    from filterd.model import tokenizer
    from filterd.errors import ModelError

    attempts = _no_network(monkeypatch)
    for name in ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"):
        shutil.copy(tokenizer.tiktoken_cache_dir()[0] / name, tmp_path / name)
    (tmp_path / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").write_bytes(b"#version: 0.2\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenizer._encoding.cache_clear()
    try:
        with pytest.raises(ModelError, match="does not match its sha256"):
            Tokenizer(8).encode("hello")
    finally:
        tokenizer._encoding.cache_clear()
    assert attempts == []
