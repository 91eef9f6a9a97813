"""The run directory: its layout, its records, and the one way to read a finished run.

The loop (:mod:`trprompt.loop`) writes a run directory through this module and every
reader (serving, ``trprompt eval``, sweeps, :class:`~trprompt.methods.trprompt_method.TRPromptMethod`)
reads it through :func:`load_run`. Layout::

    <run_dir>/
      config.yaml                resolved config
      templates.json             templates version and texts
      best.json                  BestRecord: best history entry + the whole history
      usage.json, report.md, validation_accuracy.png
      iter_0/val_initial.{json,parquet}
      iter_<k>/synthetic_set.{parquet,json}  sft_metrics.json  adapter/
               val_sft.{json,parquet}  reward_search.json  reward_search_trace.jsonl
               optimal_reward.txt  val_reward_search.{json,parquet}  metrics.json
      test/<policy>.{json,parquet}

A run directory is relocatable: every path stored inside it is relative to the run
directory itself. Older runs stored paths relative to the folder the job was started
from; :func:`resolve_stored_path` still finds those (relative to the run directory,
then to the current folder, then by the known layout).

Names: t* is ``optimal_reward`` everywhere (older files used ``best_reward``, read
as a fallback); an iteration's adapter id is :func:`adapter_id` (``iter<k>``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt import artifacts

RUN_DIR_FORMAT = 2
"""2: paths inside the run directory are relative to it; stages record fingerprints."""

PHASES = ("initial", "sft", "reward_search")
"""Validation phases, in the order they happen within an iteration."""


class RunDirError(ValueError):
    """A run directory is missing, unfinished, or holds an unreadable artifact (the message names the file)."""


def adapter_id(k: int) -> str:
    """The adapter id of iteration ``k``'s LoRA adapter (what engines and ``best.json`` call it)."""
    return f"iter{k}"


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run directory, by name."""

    root: Path

    @property
    def config(self) -> Path:
        """Resolved config."""
        return self.root / "config.yaml"

    @property
    def previous_config(self) -> Path:
        """The config a run directory was last run with, when it differs from the current one."""
        return self.root / "config.previous.yaml"

    @property
    def templates(self) -> Path:
        """Templates version and texts."""
        return self.root / "templates.json"

    @property
    def best(self) -> Path:
        """:class:`BestRecord`."""
        return self.root / "best.json"

    @property
    def usage(self) -> Path:
        """LLM usage per role of the last invocation."""
        return self.root / "usage.json"

    @property
    def report(self) -> Path:
        """The Markdown report."""
        return self.root / "report.md"

    def iteration(self, k: int) -> Path:
        """Folder of iteration ``k`` (0 holds the initial validation)."""
        return self.root / f"iter_{k}"

    def val_summary(self, k: int, phase: str) -> Path:
        """Validation summary after ``phase`` of iteration ``k``."""
        return self.iteration(k) / f"val_{phase}.json"

    def val_rows(self, k: int, phase: str) -> Path:
        """Validation rows after ``phase`` of iteration ``k``."""
        return self.iteration(k) / f"val_{phase}.parquet"

    def synthetic_set(self, k: int) -> Path:
        """Synthetic set rows of iteration ``k``."""
        return self.iteration(k) / "synthetic_set.parquet"

    def synthetic_summary(self, k: int) -> Path:
        """Synthetic set summary (accuracy, fingerprint) of iteration ``k``."""
        return self.iteration(k) / "synthetic_set.json"

    def sft_metrics(self, k: int) -> Path:
        """SFT metrics of iteration ``k`` (the SFT stage's marker)."""
        return self.iteration(k) / "sft_metrics.json"

    def adapter(self, k: int) -> Path:
        """LoRA adapter folder of iteration ``k``."""
        return self.iteration(k) / "adapter"

    def reward_search(self, k: int) -> Path:
        """Reward-search result of iteration ``k``."""
        return self.iteration(k) / "reward_search.json"

    def reward_search_trace(self, k: int) -> Path:
        """Every scored candidate of iteration ``k``'s reward search (JSON lines, for resuming)."""
        return self.iteration(k) / "reward_search_trace.jsonl"

    def reward_search_trace_meta(self, k: int) -> Path:
        """Fingerprint of the search the trace belongs to."""
        return self.iteration(k) / "reward_search_trace.json"

    def optimal_reward_text(self, k: int) -> Path:
        """t* after iteration ``k``'s search, as plain text."""
        return self.iteration(k) / "optimal_reward.txt"

    def iteration_metrics(self, k: int) -> Path:
        """Per-iteration metrics (:class:`IterationMetrics`)."""
        return self.iteration(k) / "metrics.json"

    @property
    def test_dir(self) -> Path:
        """Test results folder."""
        return self.root / "test"

    def test_summary(self, policy: str) -> Path:
        """Test summary of ``policy``."""
        return self.test_dir / f"{policy}.json"

    def test_rows(self, policy: str) -> Path:
        """Test rows of ``policy``."""
        return self.test_dir / f"{policy}.parquet"

    def relative(self, path: str | Path) -> str:
        """``path`` as stored inside the run directory: relative to it when it lies inside it."""
        p = Path(path)
        try:
            return Path(os.path.relpath(p.resolve(), self.root.resolve())).as_posix() \
                if p.resolve().is_relative_to(self.root.resolve()) else str(p)
        except (OSError, ValueError):
            return str(p)


def resolve_stored_path(root: str | Path, stored: str | None, fallback: str | Path | None = None,
                        marker: str | None = None) -> Path | None:
    """Find a path recorded inside the run directory ``root``.

    Tries, in order: ``stored`` if absolute; ``root/stored`` (the current format);
    ``cwd/stored`` and ``root.parent/stored`` (older runs stored paths relative to the
    folder the job started in); then ``fallback`` (the known layout). With ``marker``,
    a candidate counts only if it contains that file. Returns None when nothing fits.
    """
    root = Path(root)
    cands: list[Path] = []
    if stored:
        sp = Path(stored).expanduser()
        if sp.is_absolute():
            cands.append(sp)
        else:
            cands += [root / sp, Path.cwd() / sp, root.parent / sp]
            parts = sp.parts
            if root.name in parts:  # e.g. "runs/cpu-demo/iter_1/adapter" for a run now at /x/cpu-demo
                cands.append(root.joinpath(*parts[len(parts) - parts[::-1].index(root.name):]))
    if fallback is not None:
        cands.append(Path(fallback))
    for c in cands:
        if (c / marker).is_file() if marker else c.exists():
            return c.resolve()
    return None


@dataclass
class HistoryEntry:
    """One validation evaluation of the run: after the initial policy, an SFT or a reward search.

    ``adapter_path`` is relative to the run directory (see :meth:`RunPaths.relative`).
    """

    iteration: int
    phase: str
    accuracy: float | None
    adapter: str | None
    adapter_path: str | None
    optimal_reward: str
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``best.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "best.json") -> HistoryEntry:
        """Parse one entry (old key names accepted)."""
        if not isinstance(data, dict):
            raise RunDirError(f"{where}: a history entry must be an object, got {data!r}")
        try:
            reward = data.get("optimal_reward", data.get("best_reward", data.get("reward")))
            acc = data.get("accuracy")
            return cls(
                iteration=int(data["iteration"]),
                phase=str(data.get("phase", "reward_search")),
                accuracy=None if acc is None else float(acc),
                adapter=data.get("adapter"),
                adapter_path=data.get("adapter_path"),
                optimal_reward=str(reward) if reward is not None else "",
                fingerprint=data.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunDirError(f"{where}: bad history entry {data!r}: {e}") from e


@dataclass
class BestRecord:
    """``best.json``: the best history entry (by validation accuracy, later iteration on ties) and the history."""

    best: HistoryEntry
    history: list[HistoryEntry] = field(default_factory=list)
    format: int = RUN_DIR_FORMAT

    @classmethod
    def from_history(cls, history: list[HistoryEntry]) -> BestRecord:
        """Pick the best entry of ``history``."""
        if not history:
            raise ValueError("an empty history has no best entry")
        best = max(history, key=lambda h: (h.accuracy if h.accuracy is not None else -1.0, h.iteration))
        return cls(best=best, history=list(history))

    def to_json(self) -> dict[str, Any]:
        """``best.json``'s content: the best entry's fields at the top level (as before) plus the history."""
        return {**self.best.to_json(), "history": [h.to_json() for h in self.history], "format": self.format}

    def write(self, paths: RunPaths) -> Path:
        """Write ``best.json`` atomically."""
        return artifacts.write_json(paths.best, self.to_json())

    @classmethod
    def read(cls, paths: RunPaths) -> BestRecord:
        """Read ``best.json`` (any format)."""
        if not paths.best.is_file():
            raise RunDirError(f"{paths.root}: no best.json (the run has not finished)")
        try:
            data = json.loads(paths.best.read_text())
        except (ValueError, OSError) as e:
            raise RunDirError(f"{paths.best}: unreadable: {e}") from e
        if not isinstance(data, dict):
            raise RunDirError(f"{paths.best}: not a JSON object")
        where = str(paths.best)
        best = HistoryEntry.from_json(data, where)
        history = [HistoryEntry.from_json(h, where) for h in data.get("history") or [data]]
        return cls(best=best, history=history, format=int(data.get("format", 1)))


@dataclass
class IterationMetrics:
    """``iter_<k>/metrics.json``: what one finished iteration achieved."""

    iteration: int
    synthetic_accuracy: float
    val_after_sft: float
    val_after_reward_search: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def write(self, paths: RunPaths) -> Path:
        """Write it atomically."""
        return artifacts.write_json(paths.iteration_metrics(self.iteration), dataclasses.asdict(self))

    @classmethod
    def read(cls, paths: RunPaths, k: int) -> IterationMetrics | None:
        """Read iteration ``k``'s metrics (None when the iteration has not finished)."""
        p = paths.iteration_metrics(k)
        if not p.is_file():
            return None
        d = artifacts.read_json(p)
        return cls(int(d["iteration"]), float(d["synthetic_accuracy"]), float(d["val_after_sft"]),
                   float(d["val_after_reward_search"]), dict(d.get("stage_seconds") or {}))


def read_iteration_metrics(run_dir: str | Path) -> list[IterationMetrics]:
    """Metrics of iterations 1, 2, ... up to the first one that has not finished."""
    paths = RunPaths(Path(run_dir))
    out: list[IterationMetrics] = []
    k = 1
    while (m := IterationMetrics.read(paths, k)) is not None:
        out.append(m)
        k += 1
    return out


def read_optimal_reward(data: dict[str, Any]) -> str:
    """t* from a reward-search or best record (``optimal_reward``, older ``best_reward``)."""
    value = data.get("optimal_reward", data.get("best_reward"))
    if not isinstance(value, str):
        raise RunDirError(f"no optimal_reward in {sorted(data)}")
    return value


def read_synthetic_set(path: str | Path) -> list[dict[str, Any]]:
    """Synthetic-set rows; rows of older runs name the per-question critique ``reward`` (read as ``critique``)."""
    rows = artifacts.read_parquet(path)
    for r in rows:
        if "critique" not in r and "reward" in r:
            r["critique"] = r.pop("reward")
    return rows


def write_templates(paths: RunPaths, templates: Any) -> Path:
    """Record the templates version, their fingerprint and the resolved texts (the task's wording)."""
    from trprompt.templates import TEMPLATES_VERSION

    record = templates.record() if hasattr(templates, "record") else {"version": TEMPLATES_VERSION,
                                                                      **dataclasses.asdict(templates)}
    return artifacts.write_json(paths.templates, record)


def read_templates(paths: RunPaths) -> Any:
    """The templates a run used (defaults when the run predates ``templates.json``)."""
    from trprompt.templates import TEMPLATES_VERSION, Templates

    if not paths.templates.is_file():
        return Templates()
    try:
        data = json.loads(paths.templates.read_text())
    except (ValueError, OSError) as e:
        raise RunDirError(f"{paths.templates}: unreadable: {e}") from e
    version = data.get("version")
    if version not in (None, TEMPLATES_VERSION):
        import logging

        logging.getLogger("trprompt.run_dir").warning("%s has templates version %s; this code has %s",
                                                      paths.templates, version, TEMPLATES_VERSION)
    names = {f.name for f in dataclasses.fields(Templates)}
    return Templates(**{k: v for k, v in data.items() if k in names and isinstance(v, str)})


def read_config(paths: RunPaths) -> Any:
    """The run's config, with ``run_dir`` pointing at where the run is now and templates from ``templates.json``."""
    import yaml

    from trprompt.config import config_from_dict

    if not paths.config.is_file():
        raise RunDirError(f"{paths.root}: no config.yaml (not a TRPrompt run directory)")
    try:
        raw = yaml.safe_load(paths.config.read_text()) or {}
        if not isinstance(raw, dict):
            raise RunDirError(f"{paths.config}: not a mapping")
        raw["templates_file"] = None  # the resolved texts are in templates.json
        raw["run_dir"] = str(paths.root)
        return config_from_dict(raw)
    except (ValueError, yaml.YAMLError, OSError) as e:
        raise RunDirError(f"{paths.config}: unreadable config: {e}") from e


@dataclass
class LoadedRun:
    """A finished run, as serving and evaluation use it.

    ``adapter_path`` is absolute (found wherever the run now lives) or None for the base
    prompt model; ``base_model`` is the prompt model's name in the config.
    """

    root: Path
    config: Any
    templates: Any
    best: BestRecord

    @property
    def paths(self) -> RunPaths:
        """The run's files."""
        return RunPaths(self.root)

    @property
    def optimal_reward(self) -> str:
        """t* of the best entry (the templates' initial t* when the record has none)."""
        return self.best.best.optimal_reward or self.templates.initial_optimal_reward

    @property
    def adapter_id(self) -> str | None:
        """The best entry's adapter id (None: the base prompt model)."""
        return self.best.best.adapter

    @property
    def history(self) -> list[HistoryEntry]:
        """Every validation evaluation of the run."""
        return self.best.history

    @property
    def iteration(self) -> int:
        """The best entry's iteration."""
        return self.best.best.iteration

    @property
    def phase(self) -> str:
        """The best entry's phase."""
        return self.best.best.phase

    @property
    def val_accuracy(self) -> float | None:
        """The best entry's validation accuracy."""
        return self.best.best.accuracy

    @property
    def base_model(self) -> str:
        """The prompt model (name, id or path) the adapter belongs to."""
        return str(self.config.models.prompt_model.model)

    @property
    def grader_version(self) -> str:
        """The grader version the best entry was validated with (current version when unrecorded)."""
        from trprompt.fingerprint import grader_version

        p = self.paths.val_summary(self.iteration, self.phase)
        if p.is_file():
            inputs = (artifacts.read_json(p).get("stage") or {}).get("inputs") or {}
            if "grader_version" in inputs:
                return str(inputs["grader_version"])
        return grader_version()

    def entry_adapter_path(self, entry: HistoryEntry) -> Path | None:
        """Absolute adapter folder of a history entry (None when it has no adapter)."""
        if not entry.adapter:
            return None
        fallback = self.paths.adapter(entry.iteration)
        found = resolve_stored_path(self.root, entry.adapter_path, fallback, marker="adapter_config.json")
        if found is None:
            raise RunDirError(f"{self.root}: best.json names adapter {entry.adapter!r} at {entry.adapter_path!r} "
                              f"but no peft adapter (adapter_config.json) is there, under the run directory, "
                              f"or at {fallback}")
        return found

    @property
    def adapter_path(self) -> Path | None:
        """Absolute adapter folder of the best entry."""
        return self.entry_adapter_path(self.best.best)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a finished run (``config.yaml``, ``templates.json``, ``best.json``); paths resolved where it lives now.

    Raises:
        RunDirError: the folder is missing, not a run, unfinished, or its adapter cannot be found.

    """
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    paths = RunPaths(root)
    config = read_config(paths)
    templates = read_templates(paths)
    best = BestRecord.read(paths)
    run = LoadedRun(root, config, templates, best)
    _ = run.adapter_path  # fail now, naming the file, if the adapter is gone
    return run


# ----------------------------------------------------------------------------- comparing two runs
VOLATILE_KEYS = frozenset({"pid", "run_dir", "adapter_dir", "ray_train_run", "stage_seconds", "history_path"})
"""Keys whose values legitimately differ between two identical runs (wall times, process ids, locations)."""

SKIPPED_FILES = ("report.md", "validation_accuracy.png", "config.previous.yaml", "stages.json")
"""Derived files :func:`compare_runs` does not compare (they only restate compared artifacts plus wall times)."""


def _volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or key.endswith("_s") or key.endswith("_seconds")


def scrub(obj: Any) -> Any:
    """``obj`` without the :data:`VOLATILE_KEYS` and ``*_s`` timing fields (recursively)."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not _volatile(str(k))}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


@dataclass
class RunComparison:
    """The result of :func:`compare_runs`: per artifact, identical or how it differs."""

    identical: list[str] = field(default_factory=list)
    different: dict[str, str] = field(default_factory=dict)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """Every compared artifact is identical and both runs have the same artifacts."""
        return not (self.different or self.only_in_a or self.only_in_b)

    def lines(self) -> list[str]:
        """A human-readable report, one artifact per line."""
        out = [f"same     {p}" for p in self.identical]
        out += [f"DIFFERS  {p}: {why}" for p, why in self.different.items()]
        out += [f"ONLY A   {p}" for p in self.only_in_a] + [f"ONLY B   {p}" for p in self.only_in_b]
        out.append(f"{len(self.identical)} identical, {len(self.different)} different, "
                   f"{len(self.only_in_a) + len(self.only_in_b)} missing on one side")
        return out


def artifact_files(root: Path) -> set[str]:
    """Paths (relative, POSIX) of the artifacts :func:`compare_runs` compares under ``root``."""
    out = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if not p.is_file() or p.name.startswith(".") or rel.parts[0] == "ray_train" or p.name in SKIPPED_FILES:
            continue
        out.add(rel.as_posix())
    return out


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two loaded artifacts first differ (a dotted/indexed path and both values)."""
    if type(a) is not type(b):
        return f"{where or 'value'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}: present on one side only"
            if a[k] != b[k]:
                return first_difference(a[k], b[k], f"{where}.{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or 'rows'}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


def load_artifact(path: Path) -> Any:
    """An artifact as :func:`compare_runs` compares it: parsed and :func:`scrub`-bed, or raw bytes."""
    suffix = path.suffix
    if suffix == ".json":
        return scrub(json.loads(path.read_text()))
    if suffix == ".jsonl":
        return scrub([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    if suffix == ".parquet":
        return scrub(artifacts.read_parquet(path))
    if suffix in (".yaml", ".yml"):
        import yaml

        return scrub(yaml.safe_load(path.read_text()))
    return path.read_bytes()


def compare_runs(a: str | Path, b: str | Path) -> RunComparison:
    """Compare two run directories artifact by artifact.

    JSON, JSON-lines, YAML and parquet artifacts are compared value by value (row by row)
    after :func:`scrub` drops wall times, process ids and locations; every other file
    (adapter weights, ``optimal_reward.txt``) byte by byte. The files in
    :data:`SKIPPED_FILES` and Ray Train's scratch folder are not compared.
    """
    ra, rb = Path(a), Path(b)
    fa, fb = artifact_files(ra), artifact_files(rb)
    cmp = RunComparison(only_in_a=sorted(fa - fb), only_in_b=sorted(fb - fa))
    for rel in sorted(fa & fb):
        x, y = load_artifact(ra / rel), load_artifact(rb / rel)
        if x == y:
            cmp.identical.append(rel)
        elif isinstance(x, bytes):
            cmp.different[rel] = f"bytes differ ({len(x)} vs {len(y)} bytes)"
        else:
            cmp.different[rel] = first_difference(x, y)
    return cmp
