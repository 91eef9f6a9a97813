"""The published prompt-model version: a deployment-scoped actor the PromptModel replicas share."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from cluster.serve.run_spec import RunSpec

VERSION_STORE = "versions"
"""Name of the deployment-scoped actor that holds the published prompt-model version."""


class VersionStore:
    """Holds the prompt-model version every replica should serve, with a growing epoch number."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.next_epoch = 1

    def reserve(self, at_least: int = 1) -> int:
        """A fresh epoch number (>= ``at_least``) for a reload about to be attempted.

        ``at_least`` lets a replica push the counter past its own epoch, should this
        actor have been recreated (and restarted counting) since that epoch was published.
        """
        e = max(self.next_epoch, at_least)
        self.next_epoch = e + 1
        return e

    def publish(self, spec: RunSpec, epoch: int) -> bool:
        """Make ``spec`` current if ``epoch`` is newer than the current one."""
        if epoch <= self.epoch:
            return False
        self.spec, self.epoch = spec, epoch
        return True

    def current(self) -> tuple[int, RunSpec]:
        """The current epoch and spec."""
        return self.epoch, self.spec


VersionStoreActor = ray.remote(num_cpus=0, max_concurrency=64)(VersionStore)


@dataclass
class ActiveVersion:
    """The version a replica serves now, and how many engine calls still use it."""

    spec: RunSpec
    epoch: int
    adapter_id: str | None
    inflight: int = 0
    retired: bool = False
    unloaded: bool = False
