"""Run TRPrompt's Algorithm 1 on Ray (the job itself: :mod:`cluster.jobs.train`; also ``trprompt train``).

Local (starts a Ray instance itself)::

    python jobs/train.py --config configs/cpu-demo.yaml

On a running cluster (``ray start --head`` or ``ray up ray_cluster.yaml``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/cpu-demo.yaml
"""

from __future__ import annotations

import sys

from cluster.jobs.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
