"""Serve a finished TRPrompt run over HTTP with Ray Serve.

The job itself lives in :mod:`cluster.jobs.serve` (edit it there); ``trprompt serve`` runs it too.
"""

from __future__ import annotations

import sys

from cluster.jobs.serve import main, parse_args, serve_args

__all__ = ["main", "parse_args", "serve_args"]

if __name__ == "__main__":
    sys.exit(main())
