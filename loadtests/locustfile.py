"""gpufleet's load test: LLM streaming users through the gateway, every token timed (docs/loadtest.md).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \
        --gpufleet-api-key-file secrets/loadtest.key --gpufleet-api openai-chat

Without a user class named on the command line, `--gpufleet-api` picks one of OpenAIChatUser,
OpenAICompletionsUser and TgiUser; naming one (`... OpenAICompletionsUser`) runs that one.
Every request's raw record is gathered on the master (or the single process) for the SLO gate
and the report: `gpufleet.loadtest.collect.collected_records(environment)`. Add a load shape
(`-f loadtests/locustfile.py,loadtests/ramp.py`, or `openloop.py`) and `--gpufleet-inventory DIR`,
and the run ends with the SLO gate's exit code and a report (gpufleet/loadtest/locust_gate.py).
"""

from __future__ import annotations

from locust import events

from gpufleet.loadtest import locust_gate, users
from gpufleet.loadtest.users import OpenAIChatUser, OpenAICompletionsUser, TgiUser

__all__ = ["OpenAIChatUser", "OpenAICompletionsUser", "TgiUser"]  # the user classes Locust finds here

users.install(events)
locust_gate.install(events)
