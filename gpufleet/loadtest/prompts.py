"""Prompts for the load tests: synthetic ones of an exact input length, and a shipped chat set.

A load test of "input 4,096 tokens, output 512" is only that if the server counts 4,096 prompt
tokens and generates 512. So:

- **Synthetic prompts** are built from the simulator's tokenizer (`gpufleet.sim.tokenizer`):
  `text_of_tokens` gives a text it counts exactly, and a chat prompt subtracts the template's
  tokens (5 per message + 3 for the generation prompt), so the simulator's `prompt_tokens` is
  exactly `expected_input_tokens`. A real engine's tokenizer and chat template differ (Qwen2.5's
  template adds a default system prompt); `TokenizeAligner` then asks the server's
  `POST /tokenize` (vLLM, and the simulator) and trims or pads the text until the server counts
  exactly N, once per (model, api, N, seed).
- **Per-request variation.** Every call reshuffles the first `VARY_TOKENS` words of the varying
  part (after the optional shared prefix), so no two requests share their first KV block and
  prefix caching (a hash chain from the first block, in vLLM) cannot flatter the numbers. Words
  only trade places, so the count stays exact for any tokenizer that splits words at spaces.
  `shared_prefix_tokens` keeps the first tokens identical across requests instead, to measure
  the opposite.
- **Output length** is forced where the API allows it: vLLM and the simulator take
  `min_tokens = max_tokens` with `ignore_eos`; TGI has no minimum (`max_new_tokens` only caps
  it, and the answer may stop at EOS earlier), so TGI records carry the generated count from
  `details`.
- **The shipped chat set** (`loadtests/prompts/chat.jsonl`, written for gpufleet) holds
  realistic chat requests in several languages: summaries, JSON extraction, translation, code.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.sim import tokenizer
from gpufleet.suggest import hint

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT_SET_PATH = REPO_ROOT / "loadtests" / "prompts" / "chat.jsonl"

SEED_INPUT_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)  # the seed's 512 ~ 32768
SEED_OUTPUT_TOKENS = 512
KINDS: tuple[str, ...] = ("synthetic-chat", "synthetic-text", "chat-set")
CHAT_TASKS: tuple[str, ...] = ("summary", "json_extraction", "translation", "code")
CHAT_LANGUAGES: tuple[str, ...] = ("en", "zh", "de", "es", "ja", "fr")
VARY_TOKENS = 64  # words reshuffled per request at the start of the varying part
# one user message plus the generation prompt, as the simulator's ChatML template counts them
CHAT_OVERHEAD_TOKENS = tokenizer.MESSAGE_OVERHEAD_TOKENS + tokenizer.GENERATION_PROMPT_TOKENS

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Prompt:
    """One request's prompt and output length, and the request fields each API needs.

    `messages` is set for chat requests, `text` for completions and TGI; `min_tokens` is set
    when the output length is forced (then it equals `max_tokens`). The body methods return the
    JSON fields without `stream`/`stream_options`, which the sending user adds.
    """

    messages: Messages | None
    text: str | None
    expected_input_tokens: int
    max_tokens: int
    min_tokens: int | None
    label: str = ""  # where it came from: "synthetic-chat:512", or the chat set's entry id

    @property
    def expected_output_tokens(self) -> int | None:
        """The output length the request forces, for `RequestRecord.expected_output_tokens`; None if free."""
        return self.max_tokens if self.min_tokens is not None and self.min_tokens >= self.max_tokens else None

    def _length_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.min_tokens is not None:
            # vLLM's extra sampling parameters: no EOS before min_tokens, and none at all with ignore_eos
            fields.update(min_tokens=self.min_tokens, ignore_eos=True)
        return fields

    def openai_chat_body(self, model: str) -> dict[str, Any]:
        """`POST /v1/chat/completions` fields (vLLM, the simulator, TGI's OpenAI route)."""
        if self.messages is None:
            raise ValueError(f"prompt {self.label or '(unlabelled)'} is a text prompt: it has no chat messages")
        return {"model": model, "messages": self.messages, **self._length_fields()}

    def openai_completions_body(self, model: str) -> dict[str, Any]:
        """`POST /v1/completions` fields."""
        return {"model": model, "prompt": self._require_text(), **self._length_fields()}

    def tgi_body(self) -> dict[str, Any]:
        """`POST /generate_stream` (or `/generate`) fields: TGI caps the output but cannot force it;
        `details` makes the last event carry `generated_tokens`."""
        return {"inputs": self._require_text(), "parameters": {"max_new_tokens": self.max_tokens, "details": True}}

    def _require_text(self) -> str:
        if self.text is None:
            raise ValueError(f"prompt {self.label or '(unlabelled)'} is a chat prompt: use openai_chat_body")
        return self.text


# ---- synthetic text that varies per request -----------------------------------------------------


def _is_spaced_word(piece: str) -> bool:
    return len(piece) > 1 and piece[0] == " " and piece[1:].isalpha()


class VaryingText:
    """A base text, held as its token pieces, whose variants reshuffle a window of words.

    The first `fixed` pieces (the shared prefix) never change; the spaced words among the next
    `vary` pieces trade places per variant; the rest is the base text. Punctuation stays put, so
    no two symbols ever meet and merge into another token.
    """

    def __init__(self, pieces: Sequence[str], fixed: int = 0, vary: int = VARY_TOKENS) -> None:
        end = min(len(pieces), fixed + vary)
        self.head = "".join(pieces[:fixed])
        self.window = list(pieces[fixed:end])
        self.movable = [i for i, piece in enumerate(self.window) if _is_spaced_word(piece)]
        self.tail = "".join(pieces[end:])

    def variant(self, rng: random.Random) -> str:
        words = [self.window[i] for i in self.movable]
        rng.shuffle(words)
        window = list(self.window)
        for i, word in zip(self.movable, words, strict=True):
            window[i] = word
        return self.head + "".join(window) + self.tail


def base_pieces(tokens: int, seed: int) -> list[str]:
    """Token pieces of a seeded text the simulator counts as `tokens` (one token per piece)."""
    return tokenizer.tokenize(tokenizer.text_of_tokens(tokens, seed))


# ---- alignment against a server's /tokenize ------------------------------------------------------

TokenCounter = Callable[[dict[str, Any]], int]
"""Counts a /tokenize payload, `{"prompt": text}` or `{"messages": [...]}`, as the server does."""


def vllm_token_counter(base_url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0
                       ) -> TokenCounter:
    """A TokenCounter over vLLM's `POST /tokenize` (the simulator's too).

    Point it at an engine instance, not the gateway, which does not pass /tokenize through.
    Chat payloads are counted with the generation prompt, as a chat request is rendered.
    """
    url = base_url.rstrip("/") + "/tokenize"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def count(payload: dict[str, Any]) -> int:
        body = {"model": model, **payload}
        if "messages" in payload:
            body["add_generation_prompt"] = True
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return int(json.load(response)["count"])
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ValueError(f"{url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{url}: cannot count tokens ({exc})") from None

    return count


def _payload(api: str, text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]} if api == "chat" else {"prompt": text}


class TokenizeAligner:
    """Finds, per (model, api, N, seed, shared prefix), a base text the server counts as exactly N tokens.

    The text is a prefix of a longer seeded text: the cut is moved by the difference between N
    and the server's count until they agree, and where one word costs the server several tokens,
    single-token words are appended one by one. Each try is one `/tokenize` call; results are
    cached, so a load test aligns each length once, before the load starts.
    """

    def __init__(self, counter: TokenCounter, model: str, max_calls: int = 48) -> None:
        self.counter = counter
        self.model = model
        self.max_calls = max_calls
        self.cache: dict[tuple[str, str, int, int, int], list[str]] = {}

    def count(self, payload: dict[str, Any]) -> int:
        return int(self.counter(payload))

    def pieces(self, api: str, tokens: int, seed: int, fixed: int = 0) -> list[str]:
        """Token pieces (local tokenizer) of a text the server counts as `tokens` for `api` ("chat"/"text")."""
        key = (self.model, api, tokens, seed, fixed)
        if key not in self.cache:
            self.cache[key] = self._align(api, tokens, seed, fixed)
        return self.cache[key]

    def _align(self, api: str, target: int, seed: int, fixed: int) -> list[str]:
        overhead = CHAT_OVERHEAD_TOKENS if api == "chat" else 0
        pool = base_pieces(target + max(256, target // 8), seed)
        calls = 0

        def measure(pieces: list[str]) -> int:
            nonlocal calls
            calls += 1
            if calls > self.max_calls:
                raise ValueError(f"{self.model}: could not build a {api} prompt the server counts as {target} "
                                 f"tokens in {self.max_calls} /tokenize calls")
            return self.count(_payload(api, "".join(pieces)))

        # The server's count grows with the cut `k` (every piece costs it at least one token): a
        # secant search kept inside the bracket (lo: count below target, hi: above) finds the cut.
        shortest = fixed + 1
        lo: tuple[int, int] | None = None
        hi: tuple[int, int] | None = None
        previous: tuple[int, int] | None = None
        k = min(max(target - overhead, shortest), len(pool))
        while True:
            got = measure(pool[:k])
            if got == target:
                return pool[:k]
            if got < target:
                lo = (k, got)
            else:
                hi = (k, got)
            low = lo[0] + 1 if lo else shortest
            high = hi[0] - 1 if hi else len(pool)
            if low > high:
                if lo is None:
                    raise ValueError(f"{self.model}: the server counts {got} tokens for the shortest {api} prompt "
                                     f"(shared prefix {fixed}); {target} is too few")
                if hi is None:
                    raise ValueError(f"{self.model}: the server counts only {got} tokens for the longest {api} "
                                     f"prompt built; it cannot reach {target}")
                # the piece after `lo` costs the server several tokens: finish with one-token words
                return self._pad(pool[:lo[0]], lo[1], target, measure)
            slope = 1.0  # tokens per piece: about one, then as measured
            if previous is not None and previous[0] != k and previous[1] != got:
                slope = (got - previous[1]) / (k - previous[0])
            guess = round(k + (target - got) / slope)
            previous = (k, got)
            k = guess if low <= guess <= high else (low + high) // 2

    @staticmethod
    def _pad(pieces: list[str], got: int, target: int, measure: Callable[[list[str]], int]) -> list[str]:
        """Append single-token words until the server counts `target` (a word that costs more is skipped)."""
        words = [" " + word for word in tokenizer.VOCABULARY]
        i = 0
        while got < target:
            candidate = [*pieces, words[i % len(words)]]
            i += 1
            count = measure(candidate)
            if count <= target:
                pieces, got = candidate, count
        return pieces


# ---- the shipped chat set ---------------------------------------------------------------------


@dataclass(frozen=True)
class ChatEntry:
    """One shipped chat request."""

    id: str
    task: str
    language: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int


def load_chat_set(path: Path = CHAT_SET_PATH) -> list[ChatEntry]:
    """Read and check a chat set (JSON lines: id, task, language, messages, max_tokens)."""
    entries: list[ChatEntry] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = _chat_entry(json.loads(line))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if entry.id in seen:
            raise ValueError(f"{path}:{number}: duplicate id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries


def _chat_entry(data: Any) -> ChatEntry:
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    missing = {"id", "task", "language", "messages", "max_tokens"} - set(data)
    if missing:
        raise ValueError(f"missing field(s): {', '.join(sorted(missing))}")
    if data["task"] not in CHAT_TASKS:
        raise ValueError(f"task {data['task']!r}: {hint(str(data['task']), CHAT_TASKS, 'task')}")
    if data["language"] not in CHAT_LANGUAGES:
        raise ValueError(f"language {data['language']!r}: {hint(str(data['language']), CHAT_LANGUAGES, 'language')}")
    max_tokens = data["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for message in messages:
        if (not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant")
                or not isinstance(message.get("content"), str) or not message["content"].strip()):
            raise ValueError("each message needs a role (system, user, assistant) and non-empty text content")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    return ChatEntry(str(data["id"]), data["task"], data["language"],
                     tuple({"role": m["role"], "content": m["content"]} for m in messages), max_tokens)


# ---- sources ----------------------------------------------------------------------------------


class PromptSource:
    """A callable `() -> Prompt` with its own seeded random generator.

    An object rather than a closure so it can sit on a Locust class as an attribute without
    becoming a bound method. Give each load-generator process its own seed (`reseed`), or they
    would all send the same sequence of prompts.
    """

    def __init__(self, build: Callable[[random.Random], Prompt], seed: int, description: str) -> None:
        self._build = build
        self._rng = random.Random(seed)
        self.description = description

    def __call__(self) -> Prompt:
        return self._build(self._rng)

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"PromptSource({self.description})"


def prompt_source(kind: str, input_tokens: int | None = None, output_tokens: int | None = None,
                  seed: int = 0, *, shared_prefix_tokens: int = 0, max_model_len: int | None = None,
                  aligner: TokenizeAligner | None = None, force_output: bool = True,
                  languages: Collection[str] | None = None, tasks: Collection[str] | None = None,
                  chat_set_path: Path = CHAT_SET_PATH) -> PromptSource:
    """A source of prompts for one load test.

    kind: "synthetic-chat" (one user message; the template's tokens count in `input_tokens`),
    "synthetic-text" (completions and TGI), or "chat-set" (the shipped set, filtered by
    `languages` and `tasks`; `input_tokens` must be None, each entry has its own length).
    `output_tokens` is forced (min = max) when `force_output`; None means the seed's 512 for
    synthetic prompts and each entry's own `max_tokens`, unforced, for the chat set.
    `max_model_len` refuses lengths the server would refuse (prompt + output beyond it).
    `aligner` counts against the real server instead of the simulator's tokenizer.
    Raises ValueError for anything that cannot be built.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}: {hint(kind, KINDS, 'kind')}")
    if output_tokens is not None and (isinstance(output_tokens, bool) or output_tokens < 1):
        raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
    if kind == "chat-set":
        if input_tokens is not None:
            raise ValueError("chat-set: each shipped prompt has its own length; leave input_tokens None")
        return _chat_set_source(output_tokens, seed, max_model_len, aligner, force_output, languages, tasks,
                                chat_set_path)
    return _synthetic_source(kind, input_tokens, output_tokens or SEED_OUTPUT_TOKENS, seed, shared_prefix_tokens,
                             max_model_len, aligner, force_output)


def _check_fits(input_tokens: int, output_tokens: int, max_model_len: int | None, what: str) -> None:
    if max_model_len is not None and input_tokens + output_tokens > max_model_len:
        raise ValueError(f"{what}: {input_tokens} input + {output_tokens} output tokens exceed the model's "
                         f"max_model_len of {max_model_len}; the server would refuse every request")


def _synthetic_source(kind: str, input_tokens: int | None, output_tokens: int, seed: int, shared_prefix: int,
                      max_model_len: int | None, aligner: TokenizeAligner | None, force_output: bool
                      ) -> PromptSource:
    chat = kind == "synthetic-chat"
    overhead = CHAT_OVERHEAD_TOKENS if chat else 0
    if input_tokens is None or isinstance(input_tokens, bool) or input_tokens <= overhead:
        raise ValueError(f"{kind}: input_tokens must be an integer > {overhead}"
                         f"{' (the chat template alone takes that many)' if chat else ''}, got {input_tokens}")
    content = input_tokens - overhead
    if not 0 <= shared_prefix < content:
        raise ValueError(f"{kind}: shared_prefix_tokens must be >= 0 and leave at least one varying token of the "
                         f"{content} content tokens, got {shared_prefix}")
    _check_fits(input_tokens, output_tokens, max_model_len, kind)
    if aligner is None:
        pieces = base_pieces(content, seed)
    else:
        pieces = aligner.pieces("chat" if chat else "text", input_tokens, seed, shared_prefix)
    text = VaryingText(pieces, fixed=shared_prefix)
    label = f"{kind}:{input_tokens}"
    min_tokens = output_tokens if force_output else None

    def build(rng: random.Random) -> Prompt:
        body = text.variant(rng)
        if chat:
            return Prompt([{"role": "user", "content": body}], None, input_tokens, output_tokens, min_tokens, label)
        return Prompt(None, body, input_tokens, output_tokens, min_tokens, label)

    return PromptSource(build, seed, f"{label}, output {output_tokens}, shared prefix {shared_prefix}")


def _chat_set_source(output_tokens: int | None, seed: int, max_model_len: int | None,
                     aligner: TokenizeAligner | None, force_output: bool, languages: Collection[str] | None,
                     tasks: Collection[str] | None, path: Path) -> PromptSource:
    languages = (languages,) if isinstance(languages, str) else languages
    tasks = (tasks,) if isinstance(tasks, str) else tasks
    for name, chosen, valid in (("language", languages, CHAT_LANGUAGES), ("task", tasks, CHAT_TASKS)):
        for value in chosen or ():
            if value not in valid:
                raise ValueError(f"chat-set: unknown {name} {value!r}: {hint(value, valid, name)}")
    entries = [entry for entry in load_chat_set(path)
               if (languages is None or entry.language in languages) and (tasks is None or entry.task in tasks)]
    if not entries:
        raise ValueError(f"chat-set: no prompt in {path} has language in {languages} and task in {tasks}")
    prompts: list[Prompt] = []
    for entry in entries:
        messages = [dict(message) for message in entry.messages]
        counted = aligner.count({"messages": messages}) if aligner else tokenizer.chat_prompt_tokens(messages)
        max_tokens = entry.max_tokens if output_tokens is None else output_tokens
        _check_fits(counted, max_tokens, max_model_len, f"chat-set entry {entry.id}")
        forced = max_tokens if force_output and output_tokens is not None else None
        prompts.append(Prompt(messages, None, counted, max_tokens, forced, entry.id))

    def build(rng: random.Random) -> Prompt:
        chosen = rng.choice(prompts)
        return Prompt([dict(m) for m in chosen.messages or ()], None, chosen.expected_input_tokens,
                      chosen.max_tokens, chosen.min_tokens, chosen.label)

    return PromptSource(build, seed, f"chat-set, {len(prompts)} prompts")
