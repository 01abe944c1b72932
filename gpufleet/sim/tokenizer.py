"""A deterministic stand-in tokenizer: no downloads, exact and fast enough for load tests.

The simulator needs token counts (prompt length decides prefill time, KV blocks and the
max_model_len checks) but must not fetch a real tokenizer. Load tests need the opposite
direction too: a text of exactly N tokens, so an "input length 1,000" scenario really sends
1,000 prompt tokens. Both directions use one rule, a regex pre-tokenizer shaped like Qwen2's:

* a run of letters, with one optional leading space, is one token per 6 letters
  (" hello" is 1 token, " tokenization" is 3: " tokeni" + "zation");
* each CJK / kana / hangul character is one token;
* each digit is one token (Qwen splits numbers into digits);
* a run of up to 4 other symbols, with one optional leading space, is one token (",", " ...");
* a run of whitespace (newlines included) is one token.

Counts are close to a real BPE's for English prose (about 1.2-1.3 tokens per word) but are not
Qwen's; what matters is that they are deterministic and that `text_of_tokens` inverts them.

Chat prompts are counted like Qwen2.5's ChatML template renders them: every message is
`<|im_start|>{role}\\n{content}<|im_end|>\\n` (5 tokens of template around the content: the two
special tokens, the role, and the two newlines) and the generation prompt
`<|im_start|>assistant\\n` adds 3. No default system prompt is injected, so a load test can
predict a chat request's prompt_tokens as sum(count_tokens(content)) + 5 x messages + 3.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN_RE = re.compile(
    rf"[{_CJK}]"  # one CJK/kana/hangul character
    rf"| ?[^\W\d_{_CJK}]{{1,6}}"  # up to 6 letters, optional leading space
    r"|\d"  # one digit
    r"| ?(?:[^\s\w]|_){1,4}"  # up to 4 symbols, optional leading space
    r"|\s+"  # a whitespace run
)

# The template tokens around each chat message and the generation prompt (see module docstring).
MESSAGE_OVERHEAD_TOKENS = 5
GENERATION_PROMPT_TOKENS = 3
# Qwen2's ids for the template's special tokens and its newline
IM_START_ID, IM_END_ID, NEWLINE_ID = 151644, 151645, 198

# One-token words (at most 6 letters) that text_of_tokens builds texts of a known length from.
_WORDS = """
    the of and to in is was for that on as with by he at from his it an were are which this be or
    has had not but first one their its new after who they two her she been other when there all
    during into school time may years more most only over city some world would where later up
    such used many can state about national out known university united then made people also
    group three area each while them part since between film first team game season water light
    house early small large river power music high long under north south east west great found
    world life work line name years local place point model serve token cache batch queue
    stream engine server block layer value data plan fleet node host rate limit load test
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(word for word in _WORDS.split() if len(word) <= 6))
# Each word with a leading space counts as exactly one token, and so does any run of them.
_SPACED = tuple(" " + word for word in VOCABULARY)


def count_tokens(text: str) -> int:
    """The number of tokens in `text` under the stand-in rule."""
    if not text:
        return 0
    if len(text) > 256:
        return _count_long(text)  # load tests resend the same long prompts; skip re-scanning them
    return len(_TOKEN_RE.findall(text))


@lru_cache(maxsize=128)
def _count_long(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def tokenize(text: str) -> list[str]:
    """The token strings of `text` (their concatenation is `text`)."""
    return _TOKEN_RE.findall(text)


def token_id(piece: str) -> int:
    """A stable id for a token string, for APIs that return ids (/tokenize, TGI details)."""
    return _token_id(piece)


@lru_cache(maxsize=65536)
def _token_id(piece: str) -> int:
    # FNV-1a over UTF-8, folded into Qwen2's 152,064-id vocabulary
    h = 0x811C9DC5
    for byte in piece.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % 152064


def text_of_tokens(n: int, seed: int = 0) -> str:
    """Deterministic text that `count_tokens` counts as exactly `n` tokens.

    Words with a leading space, with a full stop after about every twelfth word; a word never
    follows a symbol run directly and symbols never touch, so no two units merge into one token.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return ""
    rng = random.Random(seed)
    words = rng.choices(_SPACED, k=n)
    parts: list[str] = []
    i = 0
    while i < n:
        parts.append(words[i])
        i += 1
        # a full stop is one token of its own; never the last token, so the text ends in a word
        if i < n - 1 and rng.random() < 0.08:
            parts.append(".")
            i += 1
    text = "".join(parts)
    return text[1:] if text.startswith(" ") else text


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise ValueError("only text content parts are supported by the simulator")
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of content parts, not {type(content).__name__}")


def chat_prompt_tokens(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> int:
    """Prompt tokens of a chat request rendered with a ChatML (Qwen2.5) template."""
    total = 0
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + count_tokens(message_text(message.get("content")))
    return total + (GENERATION_PROMPT_TOKENS if add_generation_prompt else 0)


def chat_token_ids(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a rendered chat prompt (for /tokenize); as many as `chat_prompt_tokens` counts."""
    ids: list[int] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError("each message must be an object with a role and content")
        content = tokenize(message_text(message.get("content")))
        ids += [IM_START_ID, token_id(str(message.get("role", ""))), NEWLINE_ID]
        ids += [token_id(piece) for piece in content]
        ids += [IM_END_ID, NEWLINE_ID]
    if add_generation_prompt:
        ids += [IM_START_ID, token_id("assistant"), NEWLINE_ID]
    return ids
