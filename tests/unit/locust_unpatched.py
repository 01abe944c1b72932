"""Import this before Locust: Locust then loads without monkey-patching the process with gevent.

Importing Locust patches the whole process unless LOCUST_SKIP_MONKEY_PATCH is set; the other unit
tests (asyncio, threads, a threaded HTTP server) must not run patched, and no unit test needs it.
"""

import os
import sys

if "locust" not in sys.modules:
    _saved = os.environ.get("LOCUST_SKIP_MONKEY_PATCH")
    os.environ["LOCUST_SKIP_MONKEY_PATCH"] = "1"
    import locust  # noqa: F401

    if _saved is None:
        del os.environ["LOCUST_SKIP_MONKEY_PATCH"]
    else:
        os.environ["LOCUST_SKIP_MONKEY_PATCH"] = _saved
