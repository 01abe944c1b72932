"""The stand-in tokenizer: its counting rule, exact-length texts, and chat template overhead."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.sim import tokenizer
from gpufleet.sim.tokenizer import chat_prompt_tokens, chat_token_ids, count_tokens, text_of_tokens, tokenize


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("", []),
        ("hello", ["hello"]),
        (" hello world", [" hello", " world"]),
        ("tokenization", ["tokeni", "zation"]),
        ("Hi, there!", ["Hi", ",", " there", "!"]),
        ("2024", ["2", "0", "2", "4"]),
        ("中文字", ["中", "文", "字"]),
        ("a\n\n  b", ["a", "\n\n  ", "b"]),
        ("x_y ...", ["x", "_", "y", " ..."]),
        ("wait.....", ["wait", "....", "."]),
    ],
)
def test_counting_rule(text: str, pieces: list[str]) -> None:
    assert tokenize(text) == pieces
    assert count_tokens(text) == len(pieces)


@given(st.text(max_size=300))
def test_tokens_cover_the_text(text: str) -> None:
    assert "".join(tokenize(text)) == text


@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=2**32))
@settings(max_examples=60, deadline=None)
def test_text_of_tokens_is_exact(n: int, seed: int) -> None:
    assert count_tokens(text_of_tokens(n, seed)) == n


def test_text_of_tokens_is_deterministic_and_seeded() -> None:
    assert text_of_tokens(50, seed=1) == text_of_tokens(50, seed=1)
    assert text_of_tokens(50, seed=1) != text_of_tokens(50, seed=2)
    assert not text_of_tokens(50).startswith(" ")
    assert count_tokens(text_of_tokens(32768, seed=9)) == 32768
    with pytest.raises(ValueError):
        text_of_tokens(-1)


def test_chat_counts_the_template_around_each_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    content = count_tokens("Be brief.") + count_tokens("Hello there")
    assert chat_prompt_tokens(messages) == content + 2 * tokenizer.MESSAGE_OVERHEAD_TOKENS + 3
    assert chat_prompt_tokens(messages, add_generation_prompt=False) == content + 10
    assert len(chat_token_ids(messages)) == chat_prompt_tokens(messages)
    ids = chat_token_ids([{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.IM_START_ID and ids[-3] == tokenizer.IM_START_ID and tokenizer.IM_END_ID in ids


def test_chat_content_parts_and_refusals() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": " two"}]}]
    assert chat_prompt_tokens(parts) == 2 + 5 + 3
    assert chat_prompt_tokens([{"role": "assistant", "content": None}]) == 5 + 3
    with pytest.raises(ValueError, match="only text content parts"):
        chat_prompt_tokens([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="must be a string or a list"):
        chat_prompt_tokens([{"role": "user", "content": 5}])


def test_token_ids_are_stable() -> None:
    assert tokenizer.token_id(" hello") == tokenizer.token_id(" hello")
    assert 0 <= tokenizer.token_id(" hello") < 152064
    assert tokenizer.token_id(" hello") != tokenizer.token_id("hello")


def test_counting_is_fast() -> None:
    text = text_of_tokens(4000, seed=5)
    started = time.perf_counter()
    for i in range(20):
        count_tokens(text + str(i))  # distinct texts: no cache hits
    per_call = (time.perf_counter() - started) / 20
    assert per_call < 0.01, f"{per_call * 1000:.1f} ms to count 4,000 tokens"
