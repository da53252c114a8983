"""What every `lamina` command shares: help settings and the one-line error report."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from lamina.errors import LaminaError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaminaError as e:
            flag = f" (--{e.param.replace('_', '-')})" if e.param in _FLAGS else ""
            click.echo(f"error: {e.message}{flag}", err=True)
            sys.exit(2)

    return wrapper


# Library errors name the parameter; on the command line, name the flag that sets it.
_FLAGS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "model", "device", "dtype"}
