"""Where a run's artifacts live: a storage root (local folder or ``pyarrow.fs`` URI) and its sync.

The storage root works like Ray Train's ``storage_path``:

* the root comes from ``--storage``, else the ``TRPROMPT_STORAGE`` environment variable, else the
  config's ``storage`` field, else :data:`DEFAULT_ROOT` (``~/trprompt_runs``) *when the job runs inside
  a Ray working-dir package* (``ray job submit --working-dir .``: the job's current folder is Ray's
  copy of the code, which is thrown away and changes with every edit), else none (the current folder);
* a relative ``run_dir`` resolves under the root; an absolute ``run_dir`` or a ``run_dir`` URI is
  used as it is;
* a URI root (``s3://bucket/prefix``, ``gs://…``, ``file:///…``, anything ``pyarrow.fs`` opens) is
  used through a local *staging* folder: the run works there, :meth:`RunStorage.pull` first downloads
  what the storage already has (that is how a run resumes on another machine), and
  :meth:`RunStorage.push` uploads every file that changed since the last push, oldest first, so a
  stage's marker file (written last by the loop) lands after the artifacts it vouches for. Each
  upload is one object PUT (atomic on object stores; a temporary name plus a rename on file systems).
  A manifest, ``.trprompt_storage.json``, is written last on every push.

Engines on other nodes load adapters straight from the storage: :class:`StorageAdapterEngine` hands
them the adapter's URI, and :func:`localize` (called by the engine actor) downloads it once into a
local cache keyed by URI and a fingerprint of the remote files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("trprompt.storage")

ENV_VAR = "TRPROMPT_STORAGE"
"""Environment variable naming the storage root."""

DEFAULT_ROOT = "~/trprompt_runs"
"""Default root for jobs that run inside a Ray working-dir package."""

MANIFEST = ".trprompt_storage.json"
"""Written last by every push: the files the storage holds, with sizes."""

CACHE_ENV_VAR = "TRPROMPT_CACHE"
"""Overrides the local cache folder (default ``~/.cache/trprompt``) for staging and adapters."""


class StorageError(RuntimeError):
    """A storage root or URI that cannot be used."""


# --------------------------------------------------------------------------- paths


def is_uri(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a URI (``scheme://…``) rather than a local path."""
    return path is not None and "://" in str(path)


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "trprompt").expanduser()


def in_ray_working_dir(cwd: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs inside a Ray runtime-env working-dir package.

    True when the job config Ray hands to a submitted job's driver names a ``working_dir``, or when
    the current folder lies under a Ray session's ``runtime_resources`` (where Ray unpacks it).
    """
    env = os.environ if environ is None else environ
    raw = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
        except (ValueError, AttributeError):
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return True
    parts = Path(cwd if cwd is not None else os.getcwd()).resolve().parts
    return "runtime_resources" in parts or "working_dir_files" in parts


def resolve_storage_root(
    cli: str | None = None,
    config: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[str | None, str]:
    """The storage root and where it came from (``--storage``, ``$TRPROMPT_STORAGE``, ``config``, …).

    Returns ``(None, "current folder")`` when relative run dirs stay relative to the current folder.
    """
    env = os.environ if environ is None else environ
    if cli:
        return cli, "--storage"
    if env.get(ENV_VAR):
        return env[ENV_VAR], f"${ENV_VAR}"
    if config:
        return config, "config field storage"
    if in_ray_working_dir(cwd, env):
        return DEFAULT_ROOT, "default for Ray working-dir jobs"
    return None, "current folder"


def join(root: str, rel: str) -> str:
    """``root/rel`` for a URI or a local path."""
    rel = str(rel).replace(os.sep, "/").strip("/")
    if rel.startswith("./"):
        rel = rel[2:]
    if is_uri(root):
        return root.rstrip("/") + "/" + rel if rel else root
    return str(Path(root).expanduser() / rel)


@dataclass(frozen=True)
class RunLocation:
    """Where a run lives.

    Attributes:
        run_dir: the durable location: an absolute local path or a URI.
        local_dir: the absolute local folder the run works in (equal to ``run_dir`` when local;
            a staging folder for a URI).
        root: the storage root used (None: the current folder).
        source: where the root came from, for the log.

    """

    run_dir: str
    local_dir: Path
    root: str | None
    source: str

    @property
    def remote(self) -> bool:
        """Whether the run is stored at a URI (and synced from ``local_dir``)."""
        return is_uri(self.run_dir)

    def path(self, rel: str) -> str:
        """Durable location of ``rel`` inside the run (absolute path or URI)."""
        return join(self.run_dir, rel)

    def open_hint(self, rel: str = "report.md") -> str:
        """A shell command that opens (or fetches) ``rel`` of this run."""
        if self.remote:
            return (f"python -m trprompt.storage fetch {self.run_dir} <local folder>   "
                    f"(then open <local folder>/{rel}); a local copy is at {self.local_dir / rel}")
        return f"less {self.path(rel)}"


def staging_dir(uri: str) -> Path:
    """The default local staging folder of a run stored at ``uri`` (stable across jobs on one machine)."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    return _cache_root() / "staging" / f"{name}-{digest}"


def resolve_run_location(
    run_dir: str,
    storage: str | None = None,
    source: str = "",
    staging: str | os.PathLike[str] | None = None,
) -> RunLocation:
    """Resolve ``run_dir`` against the storage root (see the module docstring)."""
    if not run_dir:
        raise StorageError("run_dir must not be empty")
    if is_uri(run_dir):
        durable = run_dir.rstrip("/")
    elif os.path.isabs(os.path.expanduser(run_dir)) or not storage:
        durable = str(Path(run_dir).expanduser().resolve())
    else:
        durable = join(storage, run_dir)
        if not is_uri(durable):
            durable = str(Path(durable).resolve())
    if durable.startswith("file://"):
        durable = durable[len("file://"):]
    if is_uri(durable):
        local = Path(staging).expanduser().resolve() if staging else staging_dir(durable)
    else:
        local = Path(durable)
    return RunLocation(run_dir=durable, local_dir=local, root=storage, source=source)


def local_run_dir(run_dir: str, cli_storage: str | None = None, config_storage: str | None = None) -> RunLocation:
    """Resolve a harness's ``run_dir`` (comparisons, sweeps) against a *local* storage root.

    Same rules as the training job; a URI root is refused with a clear :class:`StorageError` (these
    harnesses write through the local file system).
    """
    root, source = resolve_storage_root(cli_storage, config_storage)
    loc = resolve_run_location(run_dir, root, source)
    if loc.remote:
        raise StorageError(f"storage {loc.run_dir!r}: this job needs a local folder or a shared file system "
                           "(URI roots are supported by jobs/train.py)")
    return loc


# --------------------------------------------------------------------------- filesystem access


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)`` for a URI, or a clear :class:`StorageError`.

    S3-compatible servers: set ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) as for any AWS client.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError depending on the scheme
        raise StorageError(f"cannot open storage {uri!r}: {err}") from err
    if isinstance(fs, pafs.S3FileSystem):
        # allow_delayed_open: a small object goes up in one PutObject when the stream closes.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"allow_delayed_open": True, "region": fs.region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https",
                          region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or fs.region)
        fs = pafs.S3FileSystem(**kwargs)
    return fs, path.rstrip("/")


def _remote_files(fs: Any, base: str) -> dict[str, Any]:
    """Every file under ``base`` as ``{relative path: FileInfo}`` (empty when nothing is there)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return {}
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = info.path[len(base):].lstrip("/")
            out[rel] = info
    return out


def _upload(fs: Any, local: Path, dest: str) -> None:
    """One atomic upload of ``local`` to ``dest``."""
    import pyarrow.fs as pafs

    parent = dest.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{dest.rsplit('/', 1)[-1]}.{os.getpid()}.tmp"
        with open(local, "rb") as src, fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        fs.move(tmp, dest)
        return
    # Object stores: one PUT (or a multipart upload completed on close) makes the object appear whole.
    with open(local, "rb") as src, fs.open_output_stream(dest) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _download(fs: Any, src: str, local: Path) -> None:
    """Download ``src`` to ``local`` atomically (temporary sibling + rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(src) as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _skip(rel: str) -> bool:
    """Temporary files of atomic writes, old copies being replaced, and Ray Train's scratch folder."""
    name = rel.rsplit("/", 1)[-1]
    parts = rel.split("/")
    return (name.endswith(".tmp") or name == MANIFEST or "ray_train" in parts
            or any(p.startswith(".") and (p.endswith(".old") or ".tmp" in p) for p in parts))


# --------------------------------------------------------------------------- run sync


class RunStorage:
    """Keeps a run's local folder and its durable location in step (a no-op for a local run)."""

    def __init__(self, location: RunLocation) -> None:
        self.location = location
        self._pushed: dict[str, tuple[int, int]] = {}
        self._fs: Any = None
        self._base = ""
        if location.remote:
            self._fs, self._base = filesystem(location.run_dir)

    @property
    def remote(self) -> bool:
        """Whether pushes and pulls do anything."""
        return self.location.remote

    def _local_files(self) -> dict[str, Path]:
        root = self.location.local_dir
        if not root.exists():
            return {}
        out = {}
        for p in root.rglob("*"):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                if not _skip(rel):
                    out[rel] = p
        return out

    def pull(self) -> int:
        """Download every file the storage has that the local folder lacks or holds in another size.

        Returns the number of files downloaded.
        """
        self.location.local_dir.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return 0
        n = 0
        for rel, info in sorted(_remote_files(self._fs, self._base).items()):
            if _skip(rel):
                continue
            local = self.location.local_dir / rel
            if not local.exists() or local.stat().st_size != info.size:
                _download(self._fs, info.path, local)
                n += 1
            st = local.stat()
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        if n:
            log.info("pulled %d files from %s into %s", n, self.location.run_dir, self.location.local_dir)
        return n

    def push(self) -> int:
        """Upload the files that changed since the last push, oldest first, then the manifest.

        Returns the number of files uploaded.
        """
        if not self.remote:
            return 0
        files = self._local_files()
        # The loop removes derived files (best.json, report.md, stale test summaries) before it recomputes
        # stages whose settings changed; remove them from the storage too, so no stale number stays there.
        gone = [rel for rel in self._pushed if rel not in files]
        for rel in gone:
            try:
                self._fs.delete_file(f"{self._base}/{rel}")
            except (FileNotFoundError, OSError):  # already gone, or a store without deletes: keep going
                log.warning("could not remove %s from %s", rel, self.location.run_dir)
            del self._pushed[rel]
        changed = []
        for rel, p in files.items():
            try:
                st = p.stat()
            except FileNotFoundError:  # replaced between listing and stat
                continue
            if self._pushed.get(rel) != (st.st_size, st.st_mtime_ns):
                changed.append((st.st_mtime_ns, rel, p, (st.st_size, st.st_mtime_ns)))
        if not changed and not gone:
            return 0
        for _, rel, p, key in sorted(changed):
            _upload(self._fs, p, f"{self._base}/{rel}")
            self._pushed[rel] = key
        manifest = {"files": {rel: size for rel, (size, _) in sorted(self._pushed.items())},
                    "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(manifest, f, indent=1)
        try:
            _upload(self._fs, Path(f.name), f"{self._base}/{MANIFEST}")
        finally:
            os.unlink(f.name)
        log.info("pushed %d files to %s", len(changed), self.location.run_dir)
        return len(changed)

    def durable(self, local_path: str | os.PathLike[str]) -> str:
        """The durable location (URI or path) of a path inside the local run folder."""
        p = Path(local_path).resolve()
        try:
            rel = p.relative_to(self.location.local_dir.resolve())
        except ValueError:
            return str(local_path)
        return self.location.path(rel.as_posix())


class StorageSyncHooks:
    """Loop hooks that push the run to its storage whenever a stage starts (the previous one is done).

    Duck-types ``trprompt.loop.LoopHooks``; chain it with others through :class:`HookChain`.
    """

    def __init__(self, storage: RunStorage) -> None:
        self.storage = storage

    def stage(self, iteration: int, name: str) -> None:
        """A stage starts: upload what the previous stages finished."""
        try:
            self.storage.push()
        except Exception as err:  # a flaky upload must not kill a long stage; the next push retries
            log.warning("push to %s failed (will retry at the next stage): %s", self.storage.location.run_dir, err)

    def synthetic_accuracy(self, iteration: int, accuracy: float) -> None:
        """Unused."""

    def validation_accuracy(self, iteration: int, accuracy: float, phase: str) -> None:
        """Unused."""

    def usage(self, role: str, delta: Any) -> None:
        """Unused."""


class HookChain:
    """Calls several loop-hook objects in order; a hook that raises is logged and skipped."""

    def __init__(self, *hooks: Any) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as err:
                log.warning("%s.%s failed: %s", type(h).__name__, name, err)

    def stage(self, iteration: int, name: str) -> None:
        """A stage starts."""
        self._call("stage", iteration, name)

    def synthetic_accuracy(self, iteration: int, accuracy: float) -> None:
        """Target accuracy on the synthetic set of ``iteration``."""
        self._call("synthetic_accuracy", iteration, accuracy)

    def validation_accuracy(self, iteration: int, accuracy: float, phase: str) -> None:
        """Validation accuracy after ``phase``."""
        self._call("validation_accuracy", iteration, accuracy, phase)

    def usage(self, role: str, delta: Any) -> None:
        """Tokens/calls spent by ``role`` since the last report."""
        self._call("usage", role, delta)

    def __getattr__(self, name: str) -> Any:
        """Hooks added to the loop later are forwarded to every chained object that has them."""
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self._call(name, *args)


# --------------------------------------------------------------------------- adapters on other nodes


def localize(path: str, cache: str | os.PathLike[str] | None = None) -> str:
    """A local folder holding ``path``: ``path`` itself when local, else a cached download of the URI.

    The cache folder is keyed by the URI and a fingerprint of the remote files (names, sizes,
    modification times), so a re-trained adapter at the same URI is downloaded again.
    """
    if not is_uri(path):
        return path
    if path.startswith("file://"):
        return path[len("file://"):]
    fs, base = filesystem(path)
    files = {rel: info for rel, info in _remote_files(fs, base).items() if not _skip(rel)}
    if not files:
        raise StorageError(f"nothing stored at {path}")
    fingerprint = json.dumps(sorted((rel, i.size, str(i.mtime_ns)) for rel, i in files.items()))
    key = hashlib.sha256(f"{path.rstrip('/')}\n{fingerprint}".encode()).hexdigest()[:20]
    root = Path(cache).expanduser() if cache else _cache_root() / "adapters"
    dest = root / key
    if (dest / ".complete").exists():
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        for rel, info in files.items():
            _download(fs, info.path, tmp / rel)
        (tmp / ".complete").write_text(path + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same download first
            if not (dest / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


class StorageAdapterEngine:
    """Wraps the prompt model's engine so adapters are loaded from the run's storage.

    ``load_adapter(id, local path inside the run)`` pushes the run first and hands the engine the
    adapter's URI; engine actors call :func:`localize` before loading. Everything else is
    delegated unchanged. For a local run it passes paths through.
    """

    def __init__(self, inner: Any, storage: RunStorage) -> None:
        self._inner = inner
        self._storage = storage

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load ``adapter_id`` from the storage copy of ``path``."""
        if self._storage.remote and not is_uri(path):
            self._storage.push()
            path = self._storage.durable(path)
        self._inner.load_adapter(adapter_id, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class StorageSFTRunner:
    """Wraps an SFT runner so workers on any node start from the previous adapter's storage copy.

    Before each SFT stage the run is pushed and a local ``init_adapter`` inside the run is replaced by
    its URI (the Ray Train worker calls :func:`localize`). For a local run it passes paths through.
    """

    def __init__(self, inner: Any, storage: RunStorage) -> None:
        self._inner = inner
        self._storage = storage

    def __call__(self, examples: Any, base_model: str, out_dir: str, cfg: Any, templates: Any,
                 init_adapter: str | None = None, seed: int = 0) -> dict[str, Any]:
        """Run the wrapped SFT stage."""
        if self._storage.remote and init_adapter is not None and not is_uri(str(init_adapter)):
            self._storage.push()
            init_adapter = self._storage.durable(init_adapter)
        return self._inner(examples, base_model, out_dir, cfg, templates, init_adapter=init_adapter, seed=seed)


# --------------------------------------------------------------------------- command line


def fetch(uri: str, dest: str | os.PathLike[str]) -> int:
    """Download the run stored at ``uri`` into the folder ``dest``; returns the number of files."""
    return RunStorage(resolve_run_location(uri, staging=dest)).pull()


def main(argv: list[str] | None = None) -> int:
    """``python -m trprompt.storage fetch URI DEST``: download a stored run."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m trprompt.storage", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a run from its storage URI")
    f.add_argument("uri")
    f.add_argument("dest")
    args = p.parse_args(argv)
    n = fetch(args.uri, args.dest)
    print(f"fetched {n} files into {Path(args.dest).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
