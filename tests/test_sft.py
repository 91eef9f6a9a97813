"""LoRA SFT of the prompt model: label mask, truncation, collation, local and Ray Train training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from trprompt.config import SFTConfig
from trprompt.sft import (
    IGNORE_INDEX,
    SFT_INFO_FILE,
    TRIM_MARKER,
    SFTExample,
    build_sft_examples,
    collate_batch,
    context_text,
    encode_examples,
    end_of_turn_id,
    tokenize_example,
    train_lora,
)
from trprompt.templates import Templates

T = Templates()
EX = SFTExample(
    question="A baker sells 17 muffins a day for 6 days. How many muffins does she sell?",
    critique="The instruction pointed at the multiplication and asked for a check; the answer was correct.",
    prompt="Multiply the muffins per day by the number of days, then verify the product before answering.",
)
EXAMPLES = [
    EX,
    SFTExample("What is 25% of 80?", "Clear and correct.", "Convert 25% to a fraction, take it of 80, and state it."),
]


def small_cfg(**kw: object) -> SFTConfig:
    base = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, epochs=10, learning_rate=1e-3, batch_size=2, max_length=256)
    base.update(kw)
    return SFTConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trprompt.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tok(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One local training run shared by several tests."""
    from cluster.sft_trainer import LocalSFT

    out = tmp_path_factory.mktemp("local") / "adapter"
    metrics = LocalSFT()(EXAMPLES, tiny, out, small_cfg(), T, seed=0)
    return out, metrics


# ---------------------------------------------------------------- examples and the label mask


def test_build_sft_examples_filters_rows() -> None:
    rows = [
        {"question": "q1", "critique": "r1", "instruction": "  do it  ", "correct": True},
        {"question": "q2", "critique": "r2", "instruction": "", "correct": True},
        {"question": "q3", "reward": "r3", "instruction": "   ", "correct": False},
        {"question": "q4", "reward": "r4", "instruction": "try", "correct": False},
    ]
    assert build_sft_examples(rows) == [SFTExample("q1", "r1", "do it"), SFTExample("q4", "r4", "try")]
    assert build_sft_examples(rows, only_correct=True) == [SFTExample("q1", "r1", "do it")]


def test_labels_are_exactly_prompt_plus_end_of_turn(tok) -> None:
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    f = tokenize_example(tok, T, EX, max_length=512)
    ids, labels = f["input_ids"], f["labels"]
    assert len(ids) == len(labels) == len(f["attention_mask"])
    assert all(m == 1 for m in f["attention_mask"])
    target = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(target) == EX.prompt + "<|im_end|>"
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    # Everything after the first label position is target; label == input there.
    assert labels[first:] == ids[first:]
    # The context is exactly the chat template with the generation prompt, ending right before the target.
    ctx = context_text(tok, T, EX)
    assert ctx.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[:first]) == ctx
    assert first == len(tok(ctx, add_special_tokens=False)["input_ids"])
    # Question and reward tokens only appear in the masked part.
    assert EX.question in tok.decode(ids[:first]) and EX.critique in tok.decode(ids[:first])
    assert all(t == IGNORE_INDEX for t in labels[:first])


LONG = SFTExample(
    question="A farmer has 17 cows and buys 5 more each week. How many cows after 6 weeks?",
    critique="BEGINNING of the critique. " + "The instruction was vague about the weekly step. " * 30
    + "END of the critique.",
    prompt="Multiply 5 by 6 and add 17.",
)


def test_overlong_example_trims_the_middle_of_the_critique(tok) -> None:
    full = tokenize_example(tok, T, LONG, max_length=4096)
    assert full is not None and full["trimmed"] == [0]
    limit = len(full["input_ids"]) - 120
    cut = tokenize_example(tok, T, LONG, max_length=limit)
    assert cut is not None and 0 < len(cut["input_ids"]) <= limit and cut["trimmed"][0] >= 120
    first = next(i for i, t in enumerate(cut["labels"]) if t != IGNORE_INDEX)
    context = tok.decode(cut["input_ids"][:first])
    # System prompt, question, both ends of the critique and the marker survive; the target is whole.
    assert T.prompt_model_system in context and LONG.question in context
    assert "BEGINNING of the critique." in context and "END of the critique." in context
    assert TRIM_MARKER.strip() in context
    assert context.endswith("<|im_start|>assistant\n")
    assert tok.decode([t for t in cut["labels"] if t != IGNORE_INDEX]) == LONG.prompt + "<|im_end|>"


def test_example_that_cannot_fit_is_skipped_and_counted(tok) -> None:
    assert tokenize_example(tok, T, EX, max_length=4) is None
    with pytest.raises(ValueError):
        tokenize_example(tok, T, EX, max_length=1)
    full = len(tokenize_example(tok, T, LONG, max_length=4096)["input_ids"])
    features, stats = encode_examples(tok, T, [EX, LONG, LONG], max_length=full - 100)
    assert (stats.kept, stats.trimmed, stats.skipped) == (3, 2, 0) and len(features) == 3
    ex_len = len(tokenize_example(tok, T, EX, max_length=4096)["input_ids"])
    features, stats = encode_examples(tok, T, [EX, LONG], max_length=ex_len)
    assert stats.kept == 2 and stats.trimmed == 1  # EX fits exactly, LONG is trimmed
    _, stats = encode_examples(tok, T, [EX, LONG], max_length=20)
    assert (stats.kept, stats.skipped) == (0, 2)


def test_collate_pads_right_and_masks_padding(tok) -> None:
    a = tokenize_example(tok, T, EXAMPLES[0], max_length=512)
    b = tokenize_example(tok, T, EXAMPLES[1], max_length=512)
    assert len(a["input_ids"]) != len(b["input_ids"])
    batch = collate_batch([a, b], pad_token_id=7)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, f in enumerate((a, b)):
        k = len(f["input_ids"])
        assert batch["input_ids"][row, :k].tolist() == f["input_ids"]
        assert batch["labels"][row, :k].tolist() == f["labels"]
        assert batch["attention_mask"][row, :k].tolist() == [1] * k
        assert (batch["input_ids"][row, k:] == 7).all()
        assert (batch["labels"][row, k:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, k:] == 0).all()


# ---------------------------------------------------------------- local training


def _lora_b_norm(adapter_dir: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b, "the adapter holds no LoRA B matrices"
    return float(sum(v.float().norm() for v in b))


def _logits(model_dir: Path, tok, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([tokenize_example(tok, T, EX, max_length=512)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_train_lora_lowers_loss_and_saves_adapter(trained: tuple[Path, dict]) -> None:
    out, m = trained
    assert m["steps"] == 10 and m["epochs"] == 10 and m["examples"] == 2
    assert m["final_loss"] < m["first_loss"]
    assert m["mean_loss_last_epoch"] == pytest.approx(m["final_loss"])
    assert m["tokens"] > m["target_tokens"] > 0
    assert m["train_s"] > 0 and m["ray_train"] is False
    assert [h["step"] for h in m["history"]] == list(range(1, 11))
    assert all(h["epoch_end"] for h in m["history"])  # one step per epoch here
    assert m["history"][-1]["lr"] < m["history"][0]["lr"]  # linear decay
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / SFT_INFO_FILE).read_text())
    assert info["sft_config"]["lora_r"] == 8 and info["metrics"]["steps"] == 10
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # atomic save left no temp dir


def test_saved_adapter_loads_and_changes_logits(tiny: Path, tok, trained: tuple[Path, dict]) -> None:
    out, _ = trained
    base = _logits(tiny, tok)
    tuned = _logits(tiny, tok, out)
    assert base.shape == tuned.shape
    assert (base - tuned).abs().max() > 1e-4


def test_continue_from_previous_adapter(tiny: Path, trained: tuple[Path, dict], tmp_path: Path) -> None:
    prev, m1 = trained
    steps: list[dict] = []
    m2 = train_lora(
        EXAMPLES, tiny, tmp_path / "next", small_cfg(epochs=2), T, init_adapter=prev, seed=1, on_step=steps.append
    )
    # Starting from the trained adapter, the first loss is already near where the first run ended.
    assert m2["first_loss"] < m1["first_loss"]
    assert m2["first_loss"] == pytest.approx(m1["final_loss"], abs=0.05)
    assert len(steps) == m2["steps"] == 2
    assert _lora_b_norm(tmp_path / "next") != pytest.approx(_lora_b_norm(prev), rel=1e-6)


def test_grad_accum_matches_a_bigger_batch(tiny: Path, tmp_path: Path) -> None:
    # The loss of a step is the mean over all its target tokens, however the step is split.
    one = train_lora(EXAMPLES, tiny, tmp_path / "one", small_cfg(epochs=1, batch_size=2), T)
    two = train_lora(EXAMPLES, tiny, tmp_path / "two", small_cfg(epochs=1, batch_size=1, grad_accum=2), T)
    assert one["steps"] == two["steps"] == 1
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-5)
    assert _lora_b_norm(tmp_path / "two") == pytest.approx(_lora_b_norm(tmp_path / "one"), rel=1e-3)


def test_train_lora_rejects_bad_input(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one example"):
        train_lora([], tiny, tmp_path / "a", small_cfg(), T)
    with pytest.raises(ValueError, match="target modules"):
        train_lora(EXAMPLES, tiny, tmp_path / "b", small_cfg(target_modules=["no_such_proj"]), T)
    with pytest.raises(ValueError, match="fits sft.max_length"):
        train_lora(EXAMPLES, tiny, tmp_path / "c", small_cfg(max_length=8), T)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_train_lora_counts_trimmed_and_skipped(tiny: Path, tok, tmp_path: Path) -> None:
    ex_len = len(tokenize_example(tok, T, EX, max_length=4096)["input_ids"])
    m = train_lora([EX, LONG], tiny, tmp_path / "a", small_cfg(epochs=1, max_length=ex_len), T)
    assert (m["examples"], m["trained_examples"], m["trimmed"], m["skipped"]) == (2, 2, 1, 0)
    assert m["trimmed_tokens"] > 0


# ---------------------------------------------------------------- Ray Train


@pytest.mark.ray
def test_ray_train_sft_one_cpu_worker(ray_session, tiny: Path, tok, tmp_path: Path) -> None:
    from cluster.sft_trainer import RayTrainSFT

    cfg = dataclasses.replace(small_cfg(epochs=3), num_workers=1, cpus_per_worker=1.0)
    out = tmp_path / "iter0" / "adapter"
    m = RayTrainSFT()(EXAMPLES * 2, tiny, out, cfg, T, seed=0)
    assert m["ray_train"] is True and m["world_size"] == 1
    assert m["steps"] == 6 and m["examples"] == 4
    assert len(m["history"]) == 6 and m["history"][-1]["step"] == 6
    assert m["final_loss"] < m["first_loss"]
    assert m["adapter_dir"] == str(out.resolve())
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # An untrained LoRA adapter has all-zero B matrices; the trained one does not.
    assert _lora_b_norm(out) > 0
    assert (_logits(tiny, tok) - _logits(tiny, tok, out)).abs().max() > 1e-4
    # Ray Train's run folder is removed once the adapter is copied out.
    assert not any((tmp_path / "iter0" / "ray_train").glob("sft-*"))


def test_saved_adapter_config_is_deterministic(trained: tuple[Path, dict]) -> None:
    # peft saves target_modules in set order (it changes with each process's string hashing): sorted here.
    out, _ = trained
    modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1


# ---------------------------------------------------------------- the fast loss path


def _lora_model(tiny: Path, dtype: str, dropout: float = 0.0):
    from trprompt.sft import load_model

    return load_model(tiny, small_cfg(dtype=dtype, lora_dropout=dropout), None, 0, None)


def _batch(tok) -> dict[str, torch.Tensor]:
    feats, _ = encode_examples(tok, T, EXAMPLES, 256)
    return collate_batch(feats, tok.pad_token_id or 0)


def _loss_and_grads(tm, batch, lm_head, ctx=None) -> tuple[float, list[torch.Tensor]]:
    from contextlib import nullcontext

    from trprompt.sft import _token_loss_sum

    tm.train_model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with ctx or nullcontext():
        loss = _token_loss_sum(tm.train_model, batch, lm_head)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in tm.peft_model.parameters() if p.requires_grad]


def test_target_only_logits_give_the_full_loss_and_gradients(tiny: Path, tok) -> None:
    tm = _lora_model(tiny, "float32")
    with torch.no_grad():  # a non-zero LoRA B, so every LoRA weight gets a gradient
        for name, p in tm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = _batch(tok)
    head = tm.peft_model.get_output_embeddings()
    rows: list[int] = []

    def count_rows(_m: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
        rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    hook = head.register_forward_hook(count_rows)
    full, g_full = _loss_and_grads(tm, batch, None)
    fast, g_fast = _loss_and_grads(tm, batch, head)
    hook.remove()
    n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [batch["input_ids"].numel(), n_targets]  # the head saw only the target positions
    assert fast == pytest.approx(full, rel=1e-5)
    for a, b in zip(g_full, g_fast, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_base_runs_the_adapter_under_autocast(tiny: Path, tok) -> None:
    from contextlib import nullcontext

    from trprompt.sft import _lora_compute

    tm = _lora_model(tiny, "bfloat16", dropout=0.1)
    assert all(p.dtype == torch.float32 for p in tm.peft_model.parameters() if p.requires_grad)  # master weights
    assert isinstance(_lora_compute(_lora_model(tiny, "float32")), nullcontext)
    with torch.no_grad():
        for name, p in tm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch, head = _batch(tok), tm.peft_model.get_output_embeddings()
    lora_a = next(m for n, m in tm.peft_model.named_modules() if n.endswith("lora_A.default"))
    seen: list[torch.dtype] = []
    hook = lora_a.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    ref, g_ref = _loss_and_grads(tm, batch, head)  # peft's own float32 adapter path
    mixed, g_mixed = _loss_and_grads(tm, batch, head, _lora_compute(tm))
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the adapter's matmuls ran in bfloat16 under autocast
    assert mixed == pytest.approx(ref, rel=2e-2)  # bfloat16 rounding only (same dropout masks)
    for a, b in zip(g_ref, g_mixed, strict=True):
        assert b.dtype == torch.float32
        assert float((a - b).norm()) <= 0.05 * float(a.norm()) + 1e-6


def test_init_adapter_is_recorded_relative_to_the_adapter_inside_a_run(tmp_path):
    """trprompt_sft.json names the adapter SFT continued from relative to the new adapter when both belong to
    the same run (the run directory stays relocatable); a worker's download cache or a URI is kept as it is."""
    from trprompt.sft import _path_from

    run = tmp_path / "run"
    assert _path_from(run / "iter_2" / "adapter", run / "iter_1" / "adapter") == "../../iter_1/adapter"
    assert (run / "iter_2" / "adapter" / "../../iter_1/adapter").resolve() == (run / "iter_1" / "adapter").resolve()
    cache = tmp_path / "worker-cache" / "0123abcd"
    assert _path_from(run / "iter_2" / "adapter", cache) == str(cache)
    assert _path_from(run / "iter_2" / "adapter", "s3://bucket/run/iter_1/adapter") == "s3://bucket/run/iter_1/adapter"
    assert _path_from(run / "iter_2" / "adapter", None) is None
