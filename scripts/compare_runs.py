"""Compare two TRPrompt run directories artifact by artifact (e.g. two runs with the same seed).

    python scripts/compare_runs.py runs/a runs/b
    python scripts/compare_runs.py --across-versions old-run new-run     # A written by an older version

Prints one line per artifact (``same`` / ``DIFFERS`` with the first difference) and exits
1 when anything differs. Wall times, process ids and paths are ignored; adapter weights
are compared byte by byte, tables row by row (see ``trprompt.run_dir.compare_runs``).

``--across-versions`` compares a run written by an older version (A) with one written by
this version (B) for the same config and seed. Before comparing it

* renames A's fields to today's names (:data:`RENAMED_FIELDS`: t* is ``optimal_reward``, a
  per-question textual reward is a ``critique``) and maps moved files (:data:`MOVED_FILES`);
* makes every stored path relative to its run directory (older runs stored absolute paths
  or paths relative to the job's folder) and sorts ``target_modules``;
* matches files and folders named by a cache key (``methods/<method>/<key>/`` of the
  comparison, the sweep's ``trials/<Tune trial id>/``) by their name without the key
  (:data:`CACHE_KEY`, :data:`TUNE_TRIAL_ID`), and skips plots, Tune's state and
  Markdown reports (:data:`CROSS_VERSION_SKIPPED`);
* sets aside fields present on one side only (new fields such as ``grader``, ``score``,
  ``stage`` fingerprints), listing them, and compares every shared field value by value.

Each artifact then reads ``same`` (identical after the mapping), ``same*`` (every shared
value identical; fields added or removed, or a value changed on purpose (:data:`KNOWN_CHANGES`),
listed) or ``DIFFERS`` (a shared value differs: the first difference and, for tables, how
many rows differ).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt.run_dir import artifact_files, compare_runs, first_difference, load_artifact

RENAMED_FIELDS: dict[str, str] = {
    "best_reward": "optimal_reward",
    "t_star": "optimal_reward",
    "initial_reward": "initial_optimal_reward",
    "reward_completion_tokens": "critique_completion_tokens",
}
"""Older field name -> today's, in every JSON/YAML/table artifact."""

ROW_RENAMES: dict[str, dict[str, str]] = {
    "synthetic_set.parquet": {"reward": "critique"},  # a synthetic row's reward was the per-question critique
}
"""Per file name: column renames that only apply there (``reward`` means something else elsewhere)."""

MOVED_FILES: dict[str, str] = {}
"""Older relative path -> today's (none so far: the run-directory layout kept its file names)."""

KNOWN_CHANGES: dict[str, dict[str, str]] = {
    "templates.json": {"version": "templates v3 (task-neutral wording); the built-in math texts are byte-identical"},
}
"""Per file name: top-level fields whose value changed on purpose between versions, and why."""

CACHE_KEY = re.compile(r"(?<![0-9a-f])[0-9a-f]{12}(?:[0-9a-f]{4})?(?![0-9a-f])")
"""A 12- or 16-hex-digit cache key in a path (``methods/<method>/<key>/``, ``test/<dataset>-<n>-<key>.json``): it
hashes settings whose names changed between versions, so the two sides' keys differ for the same settings."""

CROSS_VERSION_SKIPPED = re.compile(r"(\.png|comparison\.md|results\.md)$|^tune/")
"""Plots and Markdown reports restate compared artifacts (plus wall times), and ``tune/`` holds Ray Tune's own
experiment state: not compared across versions."""


@dataclass
class ArtifactResult:
    """How one artifact compares across versions."""

    path: str
    verdict: str  # same | same* | DIFFERS
    detail: str = ""
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One report line."""
        extra = []
        if self.only_a:
            extra.append("fields only in A: " + ", ".join(self.only_a))
        if self.only_b:
            extra.append("fields only in B: " + ", ".join(self.only_b))
        if self.detail:
            extra.insert(0, self.detail)
        return f"{self.verdict:<8} {self.path}" + (f": {'; '.join(extra)}" if extra else "")


@dataclass
class CrossVersionComparison:
    """Every artifact's :class:`ArtifactResult` plus the files found on one side only."""

    results: list[ArtifactResult] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """No shared value differs (added fields and new files are listed, not failures)."""
        return all(r.verdict != "DIFFERS" for r in self.results)

    def counts(self) -> dict[str, int]:
        """Artifacts per verdict, and files on one side only."""
        out = {"same": 0, "same*": 0, "DIFFERS": 0}
        for r in self.results:
            out[r.verdict] += 1
        out["only A"], out["only B"] = len(self.only_in_a), len(self.only_in_b)
        return out

    def lines(self) -> list[str]:
        """The report, one artifact per line, then the counts."""
        out = [r.line() for r in self.results]
        out += [f"ONLY A   {p}" for p in self.only_in_a] + [f"ONLY B   {p}" for p in self.only_in_b]
        c = self.counts()
        out.append(f"{c['same']} same, {c['same*']} same on shared fields (fields added/removed), "
                   f"{c['DIFFERS']} different, {c['only A']} only in A, {c['only B']} only in B")
        return out


def _rename(obj: Any, renames: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {renames.get(k, k) if isinstance(k, str) else k: _rename(v, renames) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, renames) for v in obj]
    return obj


def _run_dir_of(path: Path, root: Path) -> Path:
    """The run directory holding ``path``: its nearest folder with a ``config.yaml`` (else ``root``)."""
    for parent in path.parents:
        if (parent / "config.yaml").is_file():
            return parent
        if parent == root:
            break
    return root


def _normalise(obj: Any, roots: tuple[Path, ...], key: str = "", here: Path | None = None) -> Any:
    """Paths relative to the first of ``roots`` holding them (the artifact's run directory, then the
    compared folder), cache keys and Tune trial ids masked; ``target_modules`` sorted (peft wrote them
    in set order)."""
    if isinstance(obj, dict):
        return {k: _normalise(v, roots, str(k), here) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [_normalise(v, roots, key, here) for v in obj]
        if key == "target_modules" and all(isinstance(v, str) for v in items):
            items = sorted(items)
        return items
    if isinstance(obj, str):
        if key == "init_adapter" and here is not None and obj and not obj.startswith("/") and "://" not in obj:
            obj = os.path.normpath(here / obj)  # stored relative to the adapter folder since the redesign
        for root in roots:
            for prefix in (str(root.resolve()) + "/", str(root) + "/"):
                if obj.startswith(prefix):
                    return _canonical(obj[len(prefix):])
        if key == "source":  # the config file a sweep was read from: its folder is the checkout's
            return Path(obj).name
        if key in ("trial_id", "trial", "trial_dir", "best_trial") or CACHE_KEY.fullmatch(obj):
            return _canonical(obj)
        if key == "adapter":  # a comparison method's adapter namespace hashes its work folder
            return ADAPTER_NAMESPACE.sub(r"_#_\1", obj)
    return obj


def _split_fields(a: Any, b: Any, where: str = "") -> tuple[Any, Any, set[str], set[str]]:
    """``a`` and ``b`` restricted to their shared fields, and the field paths found on one side only."""
    if isinstance(a, dict) and isinstance(b, dict):
        only_a = {f"{where}.{k}" for k in a if k not in b}
        only_b = {f"{where}.{k}" for k in b if k not in a}
        xa, xb = {}, {}
        for k in a:
            if k in b:
                xa[k], xb[k], oa, ob = _split_fields(a[k], b[k], f"{where}.{k}")
                only_a |= oa
                only_b |= ob
        return xa, xb, only_a, only_b
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        xa_l, xb_l, only_a, only_b = [], [], set(), set()
        for x, y in zip(a, b, strict=True):
            sx, sy, oa, ob = _split_fields(x, y, f"{where}[*]")
            xa_l.append(sx)
            xb_l.append(sy)
            only_a |= oa
            only_b |= ob
        return xa_l, xb_l, only_a, only_b
    return a, b, set(), set()


TUNE_TRIAL_ID = re.compile(r"(?<![0-9a-z])[0-9a-f]{5}_(\d{5})(?![0-9])")
"""Ray Tune's trial id ``<experiment hash>_<index>`` (``trials/ed379_00001``): the hash is random per sweep."""


ADAPTER_NAMESPACE = re.compile(r"_[0-9a-f]{6}_(iter\d+)$")
"""``<method>_<hash of the work folder>_iter<k>``: the adapter id a comparison method loads (it names the folder)."""


def _canonical(path: str) -> str:
    return TUNE_TRIAL_ID.sub(r"trial_\1", CACHE_KEY.sub("#", path))


def _keyed_map(files: set[str]) -> dict[str, str]:
    """``file -> canonical name``: cache keys replaced by ``#`` (ranked ``#0``, ``#1``... on a collision)."""
    groups: dict[str, list[str]] = {}
    for f in sorted(files):
        groups.setdefault(_canonical(f), []).append(f)
    out: dict[str, str] = {}
    for canon, members in groups.items():
        for i, f in enumerate(members):
            out[f] = canon if len(members) == 1 else f"{canon}#{i}"
    return out


def compare_across_versions(a: str | Path, b: str | Path) -> CrossVersionComparison:
    """Compare run ``a`` (older version) with run ``b`` (this version), see the module docstring."""
    ra, rb = Path(a), Path(b)
    files_a = {f for f in artifact_files(ra) if not CROSS_VERSION_SKIPPED.search(f)}
    files_b = {f for f in artifact_files(rb) if not CROSS_VERSION_SKIPPED.search(f)}
    map_a = _keyed_map({MOVED_FILES.get(f, f) for f in files_a})
    raw_a = {map_a[MOVED_FILES.get(f, f)]: f for f in files_a}
    map_b = _keyed_map(files_b)
    raw_b = {map_b[f]: f for f in files_b}
    cmp = CrossVersionComparison(only_in_a=sorted(raw_a[c] for c in set(raw_a) - set(raw_b)),
                                 only_in_b=sorted(raw_b[c] for c in set(raw_b) - set(raw_a)))
    for canon in sorted(set(raw_a) & set(raw_b)):
        pa, pb = ra / raw_a[canon], rb / raw_b[canon]
        x, y = load_artifact(pa), load_artifact(pb)
        shown = canon if raw_a[canon] == raw_b[canon] else f"{raw_a[canon]} ~ {raw_b[canon]}"
        if isinstance(x, bytes) or isinstance(y, bytes):
            cmp.results.append(ArtifactResult(shown, "same" if x == y else "DIFFERS",
                                              "" if x == y else f"bytes differ ({len(x)} vs {len(y)} bytes)"))
            continue
        renames = {**RENAMED_FIELDS, **ROW_RENAMES.get(pa.name, {})}
        x = _normalise(_rename(x, renames), (_run_dir_of(pa, ra), ra), here=pa.parent)
        y = _normalise(y, (_run_dir_of(pb, rb), rb), here=pb.parent)
        known = []
        for k, why in KNOWN_CHANGES.get(pa.name, {}).items():
            if isinstance(x, dict) and isinstance(y, dict) and k in x and k in y and x[k] != y[k]:
                known.append(f"expected change .{k} {x.pop(k)!r} -> {y.pop(k)!r} ({why})")
        sx, sy, only_a, only_b = _split_fields(x, y)
        if sx == sy:
            verdict = "same" if not (only_a or only_b or known) else "same*"
            cmp.results.append(ArtifactResult(shown, verdict, "; ".join(known), sorted(only_a), sorted(only_b)))
            continue
        detail = first_difference(sx, sy)
        if isinstance(sx, list) and isinstance(sy, list) and len(sx) == len(sy):
            detail += f" ({sum(p != q for p, q in zip(sx, sy, strict=True))} of {len(sx)} rows differ)"
        cmp.results.append(ArtifactResult(shown, "DIFFERS", detail, sorted(only_a), sorted(only_b)))
    return cmp


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="first run directory (with --across-versions: the older version's)")
    p.add_argument("b", help="second run directory")
    p.add_argument("--across-versions", action="store_true",
                   help="A was written by an older version: map renamed fields and moved files first")
    args = p.parse_args(argv)
    if args.across_versions:
        cross = compare_across_versions(args.a, args.b)
        print("\n".join(cross.lines()))
        return 0 if cross.same else 1
    cmp = compare_runs(args.a, args.b)
    print("\n".join(cmp.lines()))
    return 0 if cmp.same else 1


if __name__ == "__main__":
    sys.exit(main())
