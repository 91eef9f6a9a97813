"""Hyperparameter sweep of TRPrompt settings with Ray Tune.

The job itself lives in :mod:`cluster.jobs.sweep` (edit it there); ``trprompt sweep`` runs it too.
"""

from __future__ import annotations

import sys

from cluster.jobs.sweep import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
