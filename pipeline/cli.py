"""How job entry points end: a configuration mistake is one line on stderr and exit status 2, not a traceback.

A `ConfigError` (a wrong key or value, a missing weight file or shard found by the preflight checks, broken
YAML) says what to fix; its traceback would only bury that line under frames of the config loader. Every
other exception keeps its traceback: that is a bug or a runtime fault, and the frames are what a report needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.config import ConfigError
from pipeline.redaction import redact_text

CONFIG_ERROR_STATUS = 2  # what argparse uses for a bad command line


def exit_status(run: Callable[[], object]) -> int:
    """Run a job's main body: 0 when it returns, CONFIG_ERROR_STATUS after printing the ConfigError it raised."""
    try:
        run()
    except ConfigError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_STATUS
    return 0
