"""What a load-test user sends: the request of each API built from a prompt, and its settings.

A *prompt source* is any callable with no arguments that returns a `PromptFields`, or the plain
tuple `(fields, expected_input_tokens, expected_output_tokens)`: `fields` are request-body fields
in OpenAI's vocabulary (`prompt` text or chat `messages`, `max_tokens`, `min_tokens`,
`ignore_eos`, `temperature`, ...), translated here for the API under test, so one source serves
every API. The expected counts (None when unknown) go into the record, where the report compares
them with what the server counted. A `gpufleet.loadtest.prompts.Prompt` (exact token lengths) is
taken as it is (`as_fields`). The default is one fixed short prompt.

No Locust here (importing Locust patches the process with gevent), so this is unit-tested plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gpufleet.loadtest.sse import APIS, OPENAI_CHAT, OPENAI_COMPLETIONS, TGI
from gpufleet.paths import display_path
from gpufleet.secretfiles import secret_file_problem

PATHS = {OPENAI_CHAT: "/v1/chat/completions", OPENAI_COMPLETIONS: "/v1/completions", TGI: "/generate_stream"}
DEFAULT_MAX_TOKENS = 128
DEFAULT_PROMPT = "Explain in one paragraph what an inference gateway does."

# OpenAI sampling fields and their TGI `parameters` names; other OpenAI-only fields (ignore_eos,
# min_tokens, stream_options, ...) have no TGI counterpart and are left out of a TGI request
_TGI_PARAMETERS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "seed", "stop": "stop", "repetition_penalty": "repetition_penalty",
                   "frequency_penalty": "frequency_penalty"}


class PromptFields(NamedTuple):
    """One request's body fields and the token counts it was built to have (None: not known)."""

    fields: dict[str, Any]
    expected_input_tokens: int | None = None
    expected_output_tokens: int | None = None


PromptFn = Callable[[], Any]  # () -> PromptFields, a (fields, in, out) tuple, or a prompts.Prompt


def default_prompt() -> PromptFields:
    """The fixed short prompt used when no source is plugged in (lengths left to the model)."""
    return PromptFields({"prompt": DEFAULT_PROMPT})


def as_fields(prompt: Any) -> PromptFields:
    """What a prompt source returned, as PromptFields.

    Takes PromptFields, a `(fields, expected_input_tokens, expected_output_tokens)` tuple, or an
    object shaped like `gpufleet.loadtest.prompts.Prompt` (`messages` or `text`, `max_tokens`,
    `min_tokens`, the expected counts): a forced length (`min_tokens` set) becomes vLLM's
    `min_tokens` with `ignore_eos`.
    """
    if isinstance(prompt, tuple):
        return PromptFields(*prompt)
    messages = getattr(prompt, "messages", None)
    text = getattr(prompt, "text", None)
    if messages is None and text is None:
        raise ApiError(f"a prompt source returned {type(prompt).__name__}: expected (fields, input tokens, "
                       "output tokens) or a prompts.Prompt")
    fields: dict[str, Any] = {"messages": messages} if messages is not None else {"prompt": text}
    max_tokens = getattr(prompt, "max_tokens", None)
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    min_tokens = getattr(prompt, "min_tokens", None)
    if min_tokens is not None:
        fields.update(min_tokens=min_tokens, ignore_eos=True)
    return PromptFields(fields, getattr(prompt, "expected_input_tokens", None),
                        getattr(prompt, "expected_output_tokens", None))


class ApiError(ValueError):
    """A prompt that cannot be sent to the API under test (e.g. chat messages to /generate_stream)."""


def build_request(api: str, prompt: PromptFields, model: str | None, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one streamed request; `max_tokens` applies when the prompt sets none.

    OpenAI bodies always stream with `stream_options.include_usage` (the server's token counts
    arrive in a final usage chunk), whatever the prompt's fields say.
    """
    fields = dict(prompt.fields)
    if api == OPENAI_CHAT:
        return PATHS[api], _openai_body(_as_chat(fields), model, max_tokens)
    if api == OPENAI_COMPLETIONS:
        return PATHS[api], _openai_body(_as_completion(fields), model, max_tokens)
    if api == TGI:
        return PATHS[api], _tgi_body(fields, max_tokens)
    raise ApiError(f"unknown API {api!r}: expected one of {', '.join(APIS)}")


def _as_chat(fields: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in fields:
        prompt = fields.pop("prompt", None)
        if not isinstance(prompt, str):
            raise ApiError("a chat request needs `messages` or a text `prompt`")
        fields["messages"] = [{"role": "user", "content": prompt}]
    else:
        fields.pop("prompt", None)
    return fields


def _as_completion(fields: dict[str, Any]) -> dict[str, Any]:
    if "messages" in fields:
        raise ApiError("/v1/completions takes a text `prompt`, not chat `messages`")
    if "prompt" not in fields:
        raise ApiError("a completions request needs a `prompt`")
    return fields


def _openai_body(fields: dict[str, Any], model: str | None, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = model
    if "max_tokens" not in fields and "max_completion_tokens" not in fields:
        body["max_tokens"] = max_tokens
    body.update(fields)
    options = body.get("stream_options")
    body["stream"] = True
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return body


def _tgi_body(fields: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    if "messages" in fields:
        raise ApiError("TGI's /generate_stream takes a text `prompt`, not chat `messages`")
    inputs = fields.get("prompt", fields.get("inputs"))
    if not isinstance(inputs, str):
        raise ApiError("a TGI request needs a text `prompt`")
    given = fields.get("parameters")
    parameters: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name, tgi_name in _TGI_PARAMETERS.items():
        if name in fields:
            parameters[tgi_name] = fields[name]
    if isinstance(given, dict):
        parameters.update(given)
    parameters["details"] = True  # the final event then carries generated_tokens (the usage count)
    return {"inputs": inputs, "parameters": parameters, "stream": True}


# ---- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The users' settings, from Locust's command line (`--gpufleet-*`)."""

    api: str = OPENAI_CHAT
    model: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


class SettingsError(ValueError):
    """A setting that cannot work; the message names the option and says how to fix it."""


def read_api_key(path: Path) -> str:
    """The key a 0600 file holds alone on one line (SettingsError naming the file otherwise).

    A file and not an argument, so the key never shows in `ps`, shell history or Locust's
    own logs of its command line; no message quotes the key.
    """
    shown = display_path(path)
    found = secret_file_problem(path)
    if found is not None:
        message, fix = found
        raise SettingsError(f"--gpufleet-api-key-file: {shown} {message}" + (f"; fix: {fix}" if fix else ""))
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--gpufleet-api-key-file: {shown} cannot be read ({exc})") from None
    if len(lines) != 1 or any(char.isspace() for char in lines[0]):
        raise SettingsError(f"--gpufleet-api-key-file: {shown} must hold one key alone on one line "
                            f"(it holds {len(lines)} non-empty lines)")
    return lines[0]


def settings_from(options: Any) -> Settings:
    """Settings from Locust's parsed options (an argparse namespace); SettingsError when one is wrong."""
    api = getattr(options, "gpufleet_api", None) or OPENAI_CHAT
    if api not in APIS:
        raise SettingsError(f"--gpufleet-api: {api!r} is not one of {', '.join(APIS)}")
    max_tokens = getattr(options, "gpufleet_max_tokens", None) or DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise SettingsError(f"--gpufleet-max-tokens: {max_tokens!r} is not a positive whole number")
    key_file = getattr(options, "gpufleet_api_key_file", None)
    key = read_api_key(Path(key_file)) if key_file else None
    return Settings(api=api, model=getattr(options, "gpufleet_model", None) or None, max_tokens=max_tokens,
                    api_key=key)
