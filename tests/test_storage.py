"""Storage roots: resolution rules, local and URI runs, sync and resume, adapters from a URI.

The URI tests run against a real S3-compatible server on loopback (moto in server mode), started here.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from test_loop import FakeSFT, fake_gold, make_cfg, scripted

from trprompt.engines.echo import EchoEngine
from trprompt.loop import TRPromptTrainer
from trprompt.storage import (
    DEFAULT_ROOT,
    ENV_VAR,
    MANIFEST,
    HookChain,
    RunStorage,
    StorageAdapterEngine,
    StorageError,
    StorageSyncHooks,
    in_ray_working_dir,
    localize,
    resolve_run_location,
    resolve_storage_root,
)

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")

# --------------------------------------------------------------------------- resolution rules


def test_in_ray_working_dir_from_job_config_or_cwd(tmp_path):
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_ab.zip"}})}
    assert in_ray_working_dir(tmp_path, job_env)
    assert not in_ray_working_dir(tmp_path, {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})})
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    pkg.mkdir(parents=True)
    assert in_ray_working_dir(pkg, {})
    assert not in_ray_working_dir(tmp_path, {})


def test_storage_root_precedence(tmp_path):
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "x"}})}
    assert resolve_storage_root("s3://cli", "cfg", {ENV_VAR: "env"}, tmp_path) == ("s3://cli", "--storage")
    assert resolve_storage_root(None, "cfg", {ENV_VAR: "env"}, tmp_path)[0] == "env"
    assert resolve_storage_root(None, "cfg", {}, tmp_path)[0] == "cfg"
    assert resolve_storage_root(None, None, job_env, tmp_path)[0] == DEFAULT_ROOT
    assert resolve_storage_root(None, None, {}, tmp_path) == (None, "current folder")


def test_run_location_local_and_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve_run_location("runs/a", None)
    assert loc.run_dir == str(tmp_path / "runs" / "a") and loc.local_dir == tmp_path / "runs" / "a"
    assert not loc.remote and loc.path("report.md") == str(tmp_path / "runs" / "a" / "report.md")
    home = resolve_run_location("runs/a", DEFAULT_ROOT)
    assert home.run_dir == str(Path.home() / "trprompt_runs" / "runs" / "a")
    absolute = resolve_run_location(str(tmp_path / "abs"), "s3://b/root")
    assert absolute.run_dir == str(tmp_path / "abs")  # an absolute run_dir ignores the root
    s3 = resolve_run_location("runs/a", "s3://bucket/root/", staging=tmp_path / "stage")
    assert s3.remote and s3.run_dir == "s3://bucket/root/runs/a" and s3.local_dir == tmp_path / "stage"
    assert s3.path("iter_1/adapter") == "s3://bucket/root/runs/a/iter_1/adapter"
    default_stage = resolve_run_location("s3://bucket/x/run", None)
    assert default_stage.local_dir.name.startswith("run-")  # a stable staging folder per URI
    with pytest.raises(StorageError, match="run_dir"):
        resolve_run_location("", None)


def test_bad_uri_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="nosuchscheme://x/run"):
        RunStorage(resolve_run_location("nosuchscheme://x/run", None, staging=tmp_path))


# --------------------------------------------------------------------------- a run on a URI root


def _run(cfg, storage: RunStorage, sft: FakeSFT, engine: EchoEngine):
    engines = {r: engine for r in ROLES}
    engines["prompt_model"] = StorageAdapterEngine(engine, storage)
    hooks = HookChain(StorageSyncHooks(storage))
    storage.pull()
    try:
        return TRPromptTrainer(cfg, engines, sft, base_model_path="unused", hooks=hooks, progress=False).run()
    finally:
        storage.push()


def _run_on(uri: str, tmp_path: Path, staging: str, monkeypatch, crash_on: int | None = None):
    loc = resolve_run_location(uri, None, staging=tmp_path / staging)
    cfg = make_cfg(tmp_path, run_dir=str(loc.local_dir))
    storage = RunStorage(loc)
    sft, engine = FakeSFT(crash_on=crash_on), EchoEngine(scripted)
    return loc, storage, sft, engine, lambda: _run(cfg, storage, sft, engine)


def _check_resume_from_storage(uri: str, tmp_path: Path, monkeypatch, remote_files) -> None:
    """Crash in iteration 2, resume from a fresh staging folder: iteration 1 is pulled, not redone."""
    fake_gold(monkeypatch)
    loc, storage, sft, engine, go = _run_on(uri, tmp_path, "stage1", monkeypatch, crash_on=2)
    with pytest.raises(KeyboardInterrupt):
        go()
    stored = remote_files()
    assert "iter_1/synthetic_set.parquet" in stored and "iter_1/adapter/adapter_config.json" in stored
    assert "iter_1/sft_metrics.json" in stored and MANIFEST in stored
    assert not any(name.endswith(".tmp") for name in stored)
    # The adapter was loaded from the storage URI, not from the staging folder.
    assert engine.loaded["iter1"] == f"{uri}/iter_1/adapter"

    loc2, storage2, sft2, engine2, go2 = _run_on(uri, tmp_path, "stage2", monkeypatch)
    assert not loc2.local_dir.exists()
    summary = go2()
    assert [c["k"] for c in sft2.calls] == [2]  # iteration 1's SFT was reused from the storage
    assert sft2.calls[0]["init"] == str(loc2.local_dir / "iter_1" / "adapter")
    assert summary.test["trprompt"]["n"] == 5
    stored = remote_files()
    assert {"report.md", "best.json", "iter_2/adapter/adapter_config.json", "test/trprompt.json"} <= set(stored)
    assert stored["report.md"].startswith(b"# TRPrompt run report")


def test_run_on_file_uri_resumes_in_fresh_staging(tmp_path, monkeypatch):
    root = tmp_path / "durable"
    uri = f"file://{root}/run"
    loc = resolve_run_location(uri, None, staging=tmp_path / "s")
    assert loc.run_dir == str(root / "run") and not loc.remote  # file:// is a plain local folder

    # file:// resolves to a plain folder above; to exercise the URI code path on pyarrow's local filesystem
    # (temporary name + rename per upload), route a made-up "local://" scheme to it.
    import pyarrow.fs as pafs

    def remote_files():
        sel = pafs.FileSelector(str(root / "run"), recursive=True, allow_not_found=True)
        fs = pafs.LocalFileSystem()
        return {i.path[len(str(root / "run")) + 1:]: Path(i.path).read_bytes()
                for i in fs.get_file_info(sel) if i.type == pafs.FileType.File}

    import trprompt.storage as st

    real = st.filesystem
    monkeypatch.setattr(st, "filesystem", lambda u: real("file://" + u[len("local://"):]))
    _check_resume_from_storage(f"local://{root}/run", tmp_path, monkeypatch, remote_files)


# --------------------------------------------------------------------------- S3 (moto server on loopback)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with one bucket; yields the env to reach it."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket="trprompt-test")
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _s3_objects(env: dict[str, str], prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="trprompt-test", Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket="trprompt-test", Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix) + 1:]] = body
    return out


def test_s3_run_resumes_from_storage(tmp_path, monkeypatch, s3_server):
    _check_resume_from_storage("s3://trprompt-test/runs/resume", tmp_path, monkeypatch,
                               lambda: _s3_objects(s3_server, "runs/resume"))


def test_localize_downloads_once_per_fingerprint(tmp_path, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket="trprompt-test", Key="ad/a/adapter_config.json", Body=b"{}")
    s3.put_object(Bucket="trprompt-test", Key="ad/a/sub/w.bin", Body=b"12345")
    first = Path(localize("s3://trprompt-test/ad/a", cache=tmp_path / "cache"))
    assert (first / "adapter_config.json").read_bytes() == b"{}" and (first / "sub" / "w.bin").read_bytes() == b"12345"
    assert localize("s3://trprompt-test/ad/a", cache=tmp_path / "cache") == str(first)  # cached
    s3.put_object(Bucket="trprompt-test", Key="ad/a/sub/w.bin", Body=b"123456")  # re-trained: new fingerprint
    second = Path(localize("s3://trprompt-test/ad/a", cache=tmp_path / "cache"))
    assert second != first and (second / "sub" / "w.bin").read_bytes() == b"123456"
    assert localize(str(tmp_path), cache=tmp_path / "cache") == str(tmp_path)  # local paths pass through
    with pytest.raises(StorageError, match="nothing stored"):
        localize("s3://trprompt-test/ad/none", cache=tmp_path / "cache")


@pytest.mark.ray
def test_engine_actor_loads_lora_adapter_from_s3(tmp_path, tiny_model_dir, ray_session, s3_server):
    """A real HF engine in a Ray actor (its own process and cache) loads a PEFT adapter stored in S3."""
    import pyarrow.fs as pafs
    import ray
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from actors.engine_actor import EngineActor
    from trprompt.config import ModelConfig
    from trprompt.engines.base import ChatRequest, SamplingParams
    from trprompt.storage import filesystem

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    fs, base = filesystem("s3://trprompt-test/runs/actor/iter_1/adapter")
    pafs.copy_files(str(tmp_path / "adapter"), base, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)

    cfg = ModelConfig(model=str(tiny_model_dir), engine="hf", threads=1)
    actor = ray.remote(EngineActor).options(
        num_cpus=0.25, runtime_env={"env_vars": {**s3_server, "TRPROMPT_CACHE": str(tmp_path / "actor-cache")}}
    ).remote(cfg, name="s3-test")
    try:
        uri = "s3://trprompt-test/runs/actor/iter_1/adapter"
        ray.get(actor.load_adapter.remote("iter1", uri))
        assert ray.get(actor.adapters.remote()) == ["iter1"]
        req = ChatRequest([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3), adapter="iter1")
        out = ray.get(actor.generate.remote([req], {"iter1": uri}))
        assert len(out) == 1 and out[0].completion_tokens > 0
    finally:
        ray.kill(actor)
    cached = list((tmp_path / "actor-cache" / "adapters").glob("*/adapter_config.json"))
    assert len(cached) == 1  # downloaded once by the actor, keyed by URI + fingerprint


def test_push_removes_files_the_run_deleted(tmp_path, monkeypatch):
    """The loop deletes best.json/report.md before recomputing changed stages; the storage must not keep them."""
    import pyarrow.fs as pafs

    import trprompt.storage as st

    real = st.filesystem
    monkeypatch.setattr(st, "filesystem", lambda u: real("file://" + u[len("local://"):]))
    root = tmp_path / "durable"
    loc = resolve_run_location(f"local://{root}/run", None, staging=tmp_path / "s")
    storage = st.RunStorage(loc)
    storage.pull()
    for name in ("best.json", "iter_1/metrics.json"):
        (loc.local_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (loc.local_dir / name).write_text("{}")
    assert storage.push() == 2
    (loc.local_dir / "best.json").unlink()
    storage.push()
    fs = pafs.LocalFileSystem()
    assert fs.get_file_info(str(root / "run" / "best.json")).type == pafs.FileType.NotFound
    assert fs.get_file_info(str(root / "run" / "iter_1" / "metrics.json")).type == pafs.FileType.File


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_sft_checkpoints_through_s3_and_starts_from_an_s3_adapter(tmp_path, tiny_model_dir, ray_session,
                                                                           s3_server):
    """Ray Train's storage is the S3 URI and the previous adapter comes from S3: nothing needs a shared disk."""
    import pyarrow.fs as pafs
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cluster.sft_trainer import RayTrainSFT
    from trprompt.config import SFTConfig
    from trprompt.sft import SFTExample
    from trprompt.storage import filesystem
    from trprompt.templates import Templates

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "prev")
    fs, base = filesystem("s3://trprompt-test/runs/rt/iter_1/adapter")
    pafs.copy_files(str(tmp_path / "prev"), base, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)

    env = {**s3_server, "TRPROMPT_CACHE": str(tmp_path / "worker-cache")}
    runner = RayTrainSFT(storage_path="s3://trprompt-test/runs/rt/ray_train", keep_run_dir=True,
                         worker_runtime_env={"env_vars": env})
    examples = [SFTExample("What is 2+3?", "Correct.", "Add the numbers."),
                SFTExample("What is 4*5?", "Correct.", "Multiply the numbers.")]
    cfg = SFTConfig(lora_r=2, lora_alpha=4, epochs=1, batch_size=2, learning_rate=1e-3, max_length=128,
                    num_workers=1, cpus_per_worker=0.25)
    out = tmp_path / "iter_2" / "adapter"
    m = runner(examples, str(tiny_model_dir), str(out), cfg, Templates(),
               init_adapter="s3://trprompt-test/runs/rt/iter_1/adapter", seed=0)
    assert m["ray_train"] is True and (out / "adapter_config.json").is_file()
    from trprompt.sft import SFT_INFO_FILE

    info = json.loads((out / SFT_INFO_FILE).read_text())
    assert info["init_adapter"].startswith(str(tmp_path / "worker-cache"))  # the worker downloaded it from S3
    stored = _s3_objects(s3_server, "runs/rt/ray_train")
    assert any(k.endswith("adapter_config.json") for k in stored)  # Ray Train's checkpoint went through S3
    assert not (tmp_path / "iter_2" / "ray_train").exists()


def test_local_run_dir_for_compare_and_sweep(tmp_path, monkeypatch):
    from trprompt.storage import local_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert local_run_dir("runs/c").run_dir == str(tmp_path / "runs" / "c")
    assert local_run_dir("runs/c", str(tmp_path / "root")).run_dir == str(tmp_path / "root" / "runs" / "c")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert local_run_dir("runs/c").run_dir == str(tmp_path / "env" / "runs" / "c")
    with pytest.raises(StorageError, match="jobs/train.py"):
        local_run_dir("runs/c", "s3://bucket/x")


def test_hook_chain_forwards_every_hook_and_isolates_failures():
    calls = []

    class Good:
        def stage(self, k, name):
            calls.append(("stage", k, name))

        def later_hook(self, x):
            calls.append(("later", x))

    class Broken:
        def stage(self, k, name):
            raise RuntimeError("boom")

    chain = HookChain(Broken(), None, Good())
    chain.stage(1, "sft")
    chain.validation_accuracy(1, 0.5, "sft")  # nobody implements it: a no-op
    chain.later_hook(7)  # a hook the loop may add later is forwarded too
    assert calls == [("stage", 1, "sft"), ("later", 7)]
