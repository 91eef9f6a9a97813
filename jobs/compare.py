"""Compare TRPrompt, its ablations and the baselines on one test set.

The job itself lives in :mod:`cluster.jobs.compare` (edit it there); ``trprompt compare`` runs it too.
"""

from __future__ import annotations

import sys

from cluster.jobs.compare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
