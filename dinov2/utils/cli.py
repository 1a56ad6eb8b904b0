"""Shared behaviour of the command-line entry points."""

import os
import sys
import textwrap
from collections.abc import Callable, Sequence

import torch.distributed as dist

from dinov2.errors import UserError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit; a :class:`UserError` becomes a one-paragraph message and exit code 2
    (under a process group at once, without its teardown)."""
    try:
        code = main(argv)
    except UserError as error:
        message = textwrap.fill(f"error: {error}", width=100, break_long_words=False, break_on_hyphens=False)
        print(message, file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            # every rank stops here on its own: skip the process group's teardown, which aborts (SIGABRT)
            # when a peer has closed its side first, so that the exit code stays 2
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
