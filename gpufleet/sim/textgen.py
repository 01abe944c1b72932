"""Deterministic output text: plausible words, reproducible from (seed, request id).

Tests and load runs compare outputs across runs, so each request draws from its own RNG seeded by
a hash of the engine seed and the request id: the same request id under the same seed always
gets the same length and the same words, whatever else runs beside it. The first draw of that
RNG decides where the request stops (the EOS decision); the words follow from the same stream.
"""

from __future__ import annotations

import hashlib
import math
import random

from gpufleet.sim.types import FinishReason, GenerationParams

# The end-of-turn token a chat model stops on (Qwen2.5's <|im_end|> unless the model is known to
# use another). vLLM streams it with empty text and counts it in usage.completion_tokens; the
# simulator does the same.
EOS_TOKEN_ID = 151645
_EOS_BY_FAMILY = (("llama-3", 128009), ("llama3", 128009), ("mistral", 2), ("qwen", 151645))
COMMA = (11, ",")
PERIOD = (13, ".")

_WORDS_TEXT = (
    "the of and to in is that for it as with was on be by this are from at or an have which not but "
    "can has one all their more also its will other new these when there been would into time may "
    "first two after system model data each some used only between over such where through most "
    "process under well however three while both during since value results number example user "
    "request server memory token batch cache engine latency throughput capacity network service "
    "response performance client queue layer kernel compute design simple large small fast slower "
    "important different general possible common useful because therefore usually often typically "
    "approach method structure function problem question answer point case part order level form "
    "information research analysis support change control power practice example history world "
    "people language text words sentence meaning context reason example important consider provide "
    "include require increase reduce improve maintain describe explain follow create allow ensure"
)
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS_TEXT.split()))


def _token_id(word: str) -> int:
    """A stable id in Qwen's ordinary-token range for a word (leading space included)."""
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return 1000 + int.from_bytes(digest, "big") % 30000  # inside every catalogue model's vocabulary


def _pair(text: str) -> tuple[int, str]:
    return _token_id(text), text


# each word as it appears mid-sentence and capitalised at the start of one
_WORD_TOKENS: tuple[tuple[tuple[int, str], tuple[int, str]], ...] = tuple(
    (_pair(" " + w), _pair(" " + w[0].upper() + w[1:])) for w in VOCABULARY
)


def request_seed(seed: int, request_id: str) -> int:
    """The per-request RNG seed: independent of Python's hash randomisation."""
    digest = hashlib.blake2b(f"{seed}\x00{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class TextGen:
    """One request's output stream: `output_length` first (once), then `next_token` per token."""

    __slots__ = ("_capital", "_rng", "_since_stop")

    def __init__(self, seed: int, request_id: str):
        self._rng = random.Random(request_seed(seed, request_id))
        self._capital = True
        self._since_stop = 0

    def output_length(self, params: GenerationParams, eos_probability: float) -> tuple[int, FinishReason]:
        """How many tokens the request will emit and why it stops.

        After `min_tokens` tokens, each token is the EOS with `eos_probability` (a geometric
        draw, so one RNG call decides it). As in vLLM, reaching max_tokens reports "length"
        even when that last token would have been the EOS.
        """
        u = self._rng.random()
        if params.ignore_eos or eos_probability <= 0.0:
            return params.max_tokens, "length"
        # number of non-EOS tokens before the EOS, once EOS is allowed
        free = math.floor(math.log(1.0 - u) / math.log(1.0 - eos_probability)) if eos_probability < 1 else 0
        length = params.min_tokens + free + 1
        if length >= params.max_tokens:
            return params.max_tokens, "length"
        return length, "stop"

    def next_token(self) -> tuple[int, str]:
        """The next ordinary token: a word with a leading space, or punctuation."""
        rng = self._rng
        self._since_stop += 1
        if self._since_stop > 4 and not self._capital:
            roll = rng.random()
            if roll < 0.08:
                self._capital = True
                self._since_stop = 0
                return PERIOD
            if roll < 0.14:
                return COMMA
        plain, capitalised = _WORD_TOKENS[rng.randrange(len(_WORD_TOKENS))]
        if self._capital:
            self._capital = False
            return capitalised
        return plain


def eos_token(model: str = "") -> tuple[int, str]:
    """The token a "stop" finish ends with: the model's end-of-turn id and no text."""
    name = model.lower()
    for family, token_id in _EOS_BY_FAMILY:
        if family in name:
            return token_id, ""
    return EOS_TOKEN_ID, ""
