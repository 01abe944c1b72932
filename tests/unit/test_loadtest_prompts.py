"""Load-test prompts: exact input lengths (simulator tokenizer, chat template, a server's /tokenize),
per-request variation, the shared prefix, forced output lengths, the shipped chat set, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpufleet.loadtest.prompts import (
    CHAT_LANGUAGES,
    CHAT_OVERHEAD_TOKENS,
    CHAT_SET_PATH,
    CHAT_TASKS,
    SEED_INPUT_LENGTHS,
    SEED_OUTPUT_TOKENS,
    VARY_TOKENS,
    Prompt,
    TokenizeAligner,
    load_chat_set,
    prompt_source,
    vllm_token_counter,
)
from gpufleet.sim import tokenizer, vllm_api

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def content(prompt: Prompt) -> str:
    if prompt.messages is not None:
        return prompt.messages[0]["content"]
    assert prompt.text is not None
    return prompt.text


# ---- exact lengths against the simulator -------------------------------------------------------


@pytest.mark.parametrize("tokens", SEED_INPUT_LENGTHS)
def test_synthetic_chat_is_exact_for_every_seed_length(tokens: int) -> None:
    source = prompt_source("synthetic-chat", tokens, SEED_OUTPUT_TOKENS, seed=5)
    for _ in range(3):
        prompt = source()
        body = prompt.openai_chat_body(MODEL)
        # what the simulator's vLLM surface counts for this very body, template included
        assert vllm_api.chat_prompt_tokens(body) == tokens == prompt.expected_input_tokens
        assert vllm_api.output_limit(body, tokens, tokens + SEED_OUTPUT_TOKENS, chat=True) == SEED_OUTPUT_TOKENS
        assert body["min_tokens"] == body["max_tokens"] == SEED_OUTPUT_TOKENS and body["ignore_eos"] is True
        assert prompt.expected_output_tokens == SEED_OUTPUT_TOKENS


@pytest.mark.parametrize("tokens", SEED_INPUT_LENGTHS)
def test_synthetic_text_is_exact_for_every_seed_length(tokens: int) -> None:
    source = prompt_source("synthetic-text", tokens, SEED_OUTPUT_TOKENS, seed=6)
    for _ in range(3):
        prompt = source()
        body = prompt.openai_completions_body(MODEL)
        assert vllm_api.completion_prompt_tokens(body["prompt"]) == tokens
        assert tokenizer.count_tokens(prompt.tgi_body()["inputs"]) == tokens  # TGI counts its `inputs`


def test_chat_prompts_subtract_the_template() -> None:
    prompt = prompt_source("synthetic-chat", 100, 8, seed=1)()
    assert tokenizer.count_tokens(content(prompt)) == 100 - CHAT_OVERHEAD_TOKENS == 92
    assert prompt.messages == [{"role": "user", "content": content(prompt)}]
    smallest = prompt_source("synthetic-chat", CHAT_OVERHEAD_TOKENS + 1, 8)()
    assert tokenizer.chat_prompt_tokens(smallest.messages or []) == CHAT_OVERHEAD_TOKENS + 1


# ---- variation and the shared prefix -------------------------------------------------------------


def test_texts_differ_per_call_and_repeat_per_seed() -> None:
    source = prompt_source("synthetic-text", 2048, 16, seed=1)
    texts = [content(source()) for _ in range(50)]
    assert len(set(texts)) == 50
    # vLLM's prefix cache hashes 16-token blocks chained from the start: the first block must differ
    first_blocks = {tuple(tokenizer.tokenize(text)[:16]) for text in texts}
    assert len(first_blocks) == 50
    again = prompt_source("synthetic-text", 2048, 16, seed=1)
    assert [content(again()) for _ in range(50)] == texts
    other = prompt_source("synthetic-text", 2048, 16, seed=2)
    assert content(other()) not in texts


def test_variation_only_moves_words_in_the_window() -> None:
    source = prompt_source("synthetic-text", 1000, 16, seed=3)
    a, b = (tokenizer.tokenize(content(source())) for _ in range(2))
    assert sorted(a[:VARY_TOKENS]) == sorted(b[:VARY_TOKENS]) and a[:VARY_TOKENS] != b[:VARY_TOKENS]
    assert a[VARY_TOKENS:] == b[VARY_TOKENS:]
    assert [i for i, p in enumerate(a) if p == "."] == [i for i, p in enumerate(b) if p == "."]


@pytest.mark.parametrize("kind", ["synthetic-text", "synthetic-chat"])
def test_shared_prefix_is_identical_and_the_rest_varies(kind: str) -> None:
    source = prompt_source(kind, 4096, 64, seed=4, shared_prefix_tokens=1000)
    prompts = [source() for _ in range(10)]
    pieces = [tokenizer.tokenize(content(p)) for p in prompts]
    assert len({tuple(p[:1000]) for p in pieces}) == 1
    assert len({tuple(p[1000:1000 + VARY_TOKENS]) for p in pieces}) == 10
    for prompt in prompts:
        counted = (tokenizer.chat_prompt_tokens(prompt.messages) if prompt.messages
                   else tokenizer.count_tokens(content(prompt)))
        assert counted == 4096


# ---- request bodies ---------------------------------------------------------------------------


def test_bodies_per_api() -> None:
    chat = prompt_source("synthetic-chat", 64, 32, seed=1)()
    assert set(chat.openai_chat_body(MODEL)) == {"model", "messages", "max_tokens", "min_tokens", "ignore_eos"}
    assert "stream" not in chat.openai_chat_body(MODEL)
    with pytest.raises(ValueError, match="chat prompt"):
        chat.openai_completions_body(MODEL)
    with pytest.raises(ValueError, match="chat prompt"):
        chat.tgi_body()
    text = prompt_source("synthetic-text", 64, 32, seed=1)()
    assert text.openai_completions_body(MODEL)["prompt"] == text.text
    assert text.tgi_body() == {"inputs": text.text, "parameters": {"max_new_tokens": 32, "details": True}}
    with pytest.raises(ValueError, match="text prompt"):
        text.openai_chat_body(MODEL)


def test_unforced_output_sends_only_a_cap() -> None:
    prompt = prompt_source("synthetic-chat", 64, 32, seed=1, force_output=False)()
    body = prompt.openai_chat_body(MODEL)
    assert body["max_tokens"] == 32 and "min_tokens" not in body and "ignore_eos" not in body
    assert prompt.min_tokens is None and prompt.expected_output_tokens is None


# ---- the shipped chat set ---------------------------------------------------------------------


def test_shipped_chat_set_covers_every_task_and_language() -> None:
    entries = load_chat_set()
    assert len(entries) >= 40
    assert {e.task for e in entries} == set(CHAT_TASKS)
    assert {e.language for e in entries} == set(CHAT_LANGUAGES)
    assert {"en", "zh", "de", "es", "ja"} <= {e.language for e in entries}
    for language in CHAT_LANGUAGES:
        assert {e.task for e in entries if e.language == language} == set(CHAT_TASKS), language
    assert len({e.id for e in entries}) == len(entries)
    assert len({e.messages[-1]["content"] for e in entries}) == len(entries)
    raw = [json.loads(line) for line in CHAT_SET_PATH.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "task", "language", "messages", "max_tokens"} for r in raw)


def test_chat_set_source_filters_and_counts() -> None:
    source = prompt_source("chat-set", seed=2, languages=["zh", "ja"], tasks=["code"])
    entries = {e.id: e for e in load_chat_set()}
    seen = set()
    for _ in range(40):
        prompt = source()
        entry = entries[prompt.label]
        seen.add(prompt.label)
        assert entry.language in ("zh", "ja") and entry.task == "code"
        assert prompt.expected_input_tokens == tokenizer.chat_prompt_tokens(prompt.messages or [])
        assert prompt.max_tokens == entry.max_tokens and prompt.min_tokens is None
    assert len(seen) == 4
    forced = prompt_source("chat-set", None, 100, seed=2, languages="de")()
    assert forced.min_tokens == forced.max_tokens == 100 and forced.label.startswith("de-")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a", "task": "poetry", "language": "en", "messages": [], "max_tokens": 5}', "task 'poetry'"),
        ('{"id": "a", "task": "code", "language": "EN", "messages": [], "max_tokens": 5}', "did you mean 'en'"),
        ('{"id": "a", "task": "code", "language": "en", "max_tokens": 5}', "missing field"),
        ('{"id": "a", "task": "code", "language": "en", "messages": [], "max_tokens": 5}', "non-empty list"),
        ('{"id": "a", "task": "code", "language": "en", "messages": [{"role": "user", "content": "x"}], '
         '"max_tokens": 0}', "positive integer"),
        ('{"id": "a", "task": "code", "language": "en", "messages": [{"role": "bot", "content": "x"}], '
         '"max_tokens": 5}', "role"),
        ('{"id": "a", "task": "code", "language": "en", "messages": [{"role": "system", "content": "x"}], '
         '"max_tokens": 5}', "last message"),
        ("not json", "Expecting value"),
    ],
)
def test_chat_set_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    good = '{"id": "ok", "task": "code", "language": "en", "messages": [{"role": "user", "content": "hi"}], ' \
           '"max_tokens": 5}'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_chat_set(path)
    assert f"{path}:2:" in str(info.value)


def test_chat_set_duplicate_ids(tmp_path: Path) -> None:
    line = '{"id": "x", "task": "code", "language": "en", "messages": [{"role": "user", "content": "hi"}], ' \
           '"max_tokens": 5}'
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{line}\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: duplicate id 'x'"):
        load_chat_set(path)


# ---- alignment against a server's /tokenize -----------------------------------------------------


class FakeServer:
    """A /tokenize whose tokenizer differs from the simulator's, as a real model's does.

    Words of more than four letters cost two tokens, a completions prompt gets a BOS token, and
    the chat template injects a default system prompt (as Qwen2.5's does) plus 5 tokens per message.
    """

    SYSTEM_PROMPT_TOKENS = 19

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def text_tokens(text: str) -> int:
        pieces = tokenizer.tokenize(text)
        return sum(2 if len(piece.strip()) > 4 else 1 for piece in pieces)

    def __call__(self, payload: dict[str, Any]) -> int:
        self.calls += 1
        if "messages" in payload:
            messages = payload["messages"]
            template = self.SYSTEM_PROMPT_TOKENS + 5 * (len(messages) + 1) + 3
            return template + sum(self.text_tokens(m["content"]) for m in messages)
        return 1 + self.text_tokens(payload["prompt"])


@pytest.mark.parametrize("kind", ["synthetic-chat", "synthetic-text"])
@pytest.mark.parametrize("tokens", [512, 2048, 32768])
def test_alignment_makes_the_server_count_exactly(kind: str, tokens: int) -> None:
    server = FakeServer()
    aligner = TokenizeAligner(server, MODEL)
    source = prompt_source(kind, tokens, 512, seed=9, aligner=aligner)
    assert server.calls <= 12
    for _ in range(5):
        prompt = source()
        payload = {"messages": prompt.messages} if prompt.messages else {"prompt": prompt.text}
        assert server(payload) == tokens == prompt.expected_input_tokens
    assert len({content(source()) for _ in range(5)}) == 5


def test_alignment_pads_when_words_cost_several_tokens() -> None:
    # every length in a range: some cuts land one token short of a two-token word and need padding
    server = FakeServer()
    aligner = TokenizeAligner(server, MODEL)
    for tokens in range(40, 80):
        prompt = prompt_source("synthetic-text", tokens, 8, seed=tokens, aligner=aligner)()
        assert server({"prompt": prompt.text}) == tokens


def test_alignment_is_cached_per_model_and_length() -> None:
    server = FakeServer()
    aligner = TokenizeAligner(server, MODEL)
    prompt_source("synthetic-chat", 1024, 64, seed=1, aligner=aligner, shared_prefix_tokens=200)
    calls = server.calls
    prompt = prompt_source("synthetic-chat", 1024, 64, seed=1, aligner=aligner, shared_prefix_tokens=200)()
    assert server.calls == calls
    assert server({"messages": prompt.messages}) == 1024


def test_alignment_against_the_simulators_own_tokenize_needs_one_call() -> None:
    def sim_tokenize(payload: dict[str, Any]) -> int:  # what the simulator's /tokenize answers
        if "messages" in payload:
            return len(tokenizer.chat_token_ids(payload["messages"]))
        return len(tokenizer.tokenize(payload["prompt"]))

    calls = []
    aligner = TokenizeAligner(lambda payload: calls.append(1) or sim_tokenize(payload), MODEL)
    plain = prompt_source("synthetic-chat", 4096, 512, seed=3)()
    aligned = prompt_source("synthetic-chat", 4096, 512, seed=3, aligner=aligner)()
    assert len(calls) == 1 and sim_tokenize({"messages": aligned.messages}) == 4096
    assert tokenizer.chat_prompt_tokens(plain.messages or []) == 4096


def test_alignment_gives_up_with_a_reason() -> None:
    aligner = TokenizeAligner(lambda payload: 10**6, MODEL)
    with pytest.raises(ValueError, match="too few"):
        prompt_source("synthetic-text", 512, 8, aligner=aligner)
    flat = TokenizeAligner(lambda payload: 3, MODEL)  # a server that counts (almost) nothing
    with pytest.raises(ValueError, match="cannot reach 512"):
        prompt_source("synthetic-text", 512, 8, aligner=flat)
    # every word costs two tokens: an odd length can never be reached, and the search stops
    even = TokenizeAligner(lambda payload: 2 * len(tokenizer.tokenize(payload["prompt"])), MODEL, max_calls=10)
    with pytest.raises(ValueError, match="in 10 /tokenize calls"):
        prompt_source("synthetic-text", 513, 8, aligner=even)


def test_chat_set_counts_with_the_aligner() -> None:
    server = FakeServer()
    prompt = prompt_source("chat-set", seed=1, aligner=TokenizeAligner(server, MODEL))()
    assert prompt.expected_input_tokens == server({"messages": prompt.messages})


def test_tokenize_counter_reports_an_unreachable_server() -> None:
    count = vllm_token_counter("http://127.0.0.1:9", MODEL, timeout_s=2)
    with pytest.raises(ValueError, match="cannot count tokens"):
        count({"prompt": "hello"})


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("synthetic-chatt", 512, 512), {}, "did you mean 'synthetic-chat'"),
        (("random", 512, 512), {}, "unknown prompt kind"),
        (("synthetic-chat", CHAT_OVERHEAD_TOKENS, 512), {}, "chat template alone"),
        (("synthetic-text", 0, 512), {}, "input_tokens must be an integer > 0"),
        (("synthetic-text", None, 512), {}, "input_tokens"),
        (("synthetic-text", 512, 0), {}, "output_tokens must be >= 1"),
        (("synthetic-chat", 32768, 512), {"max_model_len": 32768}, "exceed the model's max_model_len of 32768"),
        (("synthetic-text", 512, 512), {"shared_prefix_tokens": 512}, "shared_prefix_tokens"),
        (("synthetic-text", 512, 512), {"shared_prefix_tokens": -1}, "shared_prefix_tokens"),
        (("chat-set", 512, 512), {}, "leave input_tokens None"),
        (("chat-set", None, None), {"languages": ["klingon"]}, "unknown language"),
        (("chat-set", None, None), {"tasks": ["summery"]}, "did you mean 'summary'"),
        (("chat-set", None, 4000), {"max_model_len": 4096}, "exceed the model's max_model_len"),
    ],
)
def test_bad_input_is_refused(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prompt_source(*args, **kwargs)


def test_the_longest_seed_prompt_fits_a_long_context() -> None:
    # the seed served max_model_len 131072 (YaRN): 32768 + 512 fits there; 512 is the default output
    prompt = prompt_source("synthetic-chat", 32768, max_model_len=131072)()
    assert prompt.expected_input_tokens == 32768 and prompt.min_tokens == prompt.max_tokens == SEED_OUTPUT_TOKENS
