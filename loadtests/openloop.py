"""Open-loop arrivals as a Locust load shape: requests leave at scheduled times, answered or not.

    locust -f loadtests/locustfile.py,loadtests/openloop.py --headless --host http://127.0.0.1:8080 \
        --gpufleet-rates 1,2,4 --gpufleet-burstiness 1 --gpufleet-warmup-s 30 --gpufleet-measure-s 120

A closed loop waits for each answer before the next request, so a stalled server slows the load
and hides its own stall (coordinated omission). Here one dispatcher per load-generator process
sends its share of a fixed schedule (Poisson by default; `--gpufleet-burstiness inf` a constant
rate) and every record keeps its intended send time: `dispatch_lag_s` shows how late it left.
"""

from locust import events

from gpufleet.loadtest import shape_options
from gpufleet.loadtest.shapes import OpenLoopDispatcher, OpenLoopShape
from gpufleet.loadtest.users import OpenAIChatUser, OpenAICompletionsUser, TgiUser


class ChatDispatcher(OpenLoopDispatcher, OpenAIChatUser):
    """Sends the schedule as OpenAI chat requests (--gpufleet-api openai-chat)."""


class CompletionsDispatcher(OpenLoopDispatcher, OpenAICompletionsUser):
    """Sends the schedule as OpenAI completions requests (--gpufleet-api openai-completions)."""


class TgiDispatcher(OpenLoopDispatcher, TgiUser):
    """Sends the schedule as TGI generate_stream requests (--gpufleet-api tgi)."""


class OpenLoop(OpenLoopShape):
    """Rates from `--gpufleet-rates`; the dispatcher of `--gpufleet-api`."""


shape_options.install(events)
