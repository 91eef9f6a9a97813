"""Step 2 of Algorithm 1: LoRA supervised fine-tuning of the prompt model Π.

Each synthetic example (q_i, t_i, p_i) becomes one training sequence:

* the **context** is the chat template applied to
  ``templates.prompt_model_messages(q_i, t_i)`` with the generation prompt, i.e.
  exactly what Π sees at inference time;
* the **target** is the instruction p_i followed by the end-of-turn token.

The loss is the mean cross-entropy over target tokens only (it maximises
log P(p_i | q_i, t_i)): every context token and every padding position carries the
label ``-100``. Context and target are tokenized separately and concatenated, so the
first target token is predicted from exactly the token sequence the model is
conditioned on when it generates.

This module has no Ray imports. Distributed training (Ray Train, see
``cluster/sft_trainer.py``) plugs in through the ``prepare_model`` and
``prepare_data_loader`` hooks of :func:`train_lora`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from trprompt.artifacts import publish_dir
from trprompt.config import SFTConfig
from trprompt.engines.cpu_speed import tune_allocator
from trprompt.engines.dtype import resolve_dtype, torch_dtype
from trprompt.templates import Templates

IGNORE_INDEX = -100
"""Label value that the loss skips (context and padding positions)."""

SFT_INFO_FILE = "trprompt_sft.json"
"""File written next to the adapter with the training metrics and settings."""

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class SFTExample:
    """One training example: Π should write ``prompt`` for ``question`` given the ``critique`` it earned."""

    question: str
    critique: str
    prompt: str


def build_sft_examples(rows: Sequence[dict[str, Any]], only_correct: bool = False) -> list[SFTExample]:
    """Turn synthetic-set rows into training examples.

    Each row needs ``question``, ``critique`` (the per-question reward t_i; older runs call
    it ``reward``) and ``instruction`` (p_i);
    ``correct`` is read only when ``only_correct`` is set. Rows whose instruction is empty
    (or only whitespace) are skipped; instructions are stripped of surrounding whitespace.
    """
    out: list[SFTExample] = []
    for row in rows:
        instruction = (row.get("instruction") or "").strip()
        if not instruction:
            continue
        if only_correct and not row.get("correct"):
            continue
        critique = row["critique"] if "critique" in row else row["reward"]
        out.append(SFTExample(question=str(row["question"]), critique=str(critique), prompt=instruction))
    return out


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn: a chat end-of-turn token if the vocabulary has one, else EOS."""
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            return int(vocab[tok])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token nor an EOS token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    """Padding token id (falls back to EOS, then to the end-of-turn token)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return end_of_turn_id(tokenizer)


def context_text(tokenizer: Any, templates: Templates, ex: SFTExample) -> str:
    """The text Π is conditioned on: system + user turns and the assistant generation prompt."""
    messages = templates.prompt_model_messages(ex.question, ex.critique)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TRIM_MARKER = " [...] "
"""Replaces the middle of a critique that had to be shortened to fit ``max_length``."""

MIN_CRITIQUE_TOKENS = 8
"""An example whose critique would keep fewer tokens than this is skipped rather than trimmed."""


@dataclass
class EncodeStats:
    """How many examples :func:`encode_examples` kept whole, trimmed or skipped."""

    kept: int = 0
    trimmed: int = 0
    skipped: int = 0
    trimmed_tokens: int = 0


def _trim_middle(tokenizer: Any, ids: list[int], keep: int) -> str:
    """The text of ``ids`` with all but ``keep`` tokens of its middle replaced by :data:`TRIM_MARKER`."""
    head, tail = (keep + 1) // 2, keep // 2
    left = tokenizer.decode(ids[:head])
    right = tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
    return left.rstrip() + TRIM_MARKER + right.lstrip()


def tokenize_example(
    tokenizer: Any, templates: Templates, ex: SFTExample, max_length: int
) -> dict[str, list[int]] | None:
    """Token ids, labels and attention mask for one example (no padding), or None if it cannot fit.

    ``labels`` equal ``input_ids`` on the target (prompt + end-of-turn) and ``-100`` on
    the context. The context always keeps the system prompt, the critique's beginning and
    end, and the question: when the sequence is longer than ``max_length``, the middle of
    the critique is replaced by :data:`TRIM_MARKER` until it fits, and the returned dict
    has ``trimmed`` (critique tokens removed) > 0. When even a critique of
    :data:`MIN_CRITIQUE_TOKENS` tokens leaves no room (a very long question or
    instruction), the example is skipped: None. Nothing else is ever cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    tgt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]

    def encode(e: SFTExample) -> list[int]:
        return tokenizer(context_text(tokenizer, templates, e), add_special_tokens=False)["input_ids"]

    ctx = encode(ex)
    removed = 0
    if len(ctx) + len(tgt) > max_length:
        crit = tokenizer(ex.critique, add_special_tokens=False)["input_ids"]
        marker = len(tokenizer(TRIM_MARKER, add_special_tokens=False)["input_ids"])
        keep = len(crit) - (len(ctx) + len(tgt) - max_length) - marker
        for _ in range(8):  # re-tokenizing can shift a token or two at the seams
            if keep < MIN_CRITIQUE_TOKENS:
                return None
            ctx = encode(dataclasses.replace(ex, critique=_trim_middle(tokenizer, crit, keep)))
            over = len(ctx) + len(tgt) - max_length
            if over <= 0:
                removed = len(crit) - keep
                break
            keep -= over
        else:
            return None
    ids = list(ctx) + list(tgt)
    labels = [IGNORE_INDEX] * len(ctx) + list(tgt)
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids), "trimmed": [removed]}


def encode_examples(
    tokenizer: Any, templates: Templates, examples: Sequence[SFTExample], max_length: int
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Tokenize every example (see :func:`tokenize_example`); returns the kept features and the counts."""
    stats = EncodeStats()
    features = []
    for ex in examples:
        f = tokenize_example(tokenizer, templates, ex, max_length)
        if f is None:
            stats.skipped += 1
            continue
        n = f["trimmed"][0]
        stats.trimmed += n > 0
        stats.trimmed_tokens += n
        stats.kept += 1
        features.append(f)
    return features, stats


def collate_batch(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into tensors; padding gets label ``-100`` and mask 0."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        input_ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
        attention[i, :k] = torch.tensor(f["attention_mask"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def present_target_modules(model: torch.nn.Module, wanted: Sequence[str]) -> list[str]:
    """The entries of ``wanted`` that name at least one module of ``model`` (by last name component)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [m for m in wanted if m in names]


def _identity(x: Any) -> Any:
    return x


def _dist_info(distributed: bool) -> tuple[int, int]:
    """(rank, world size) of the torch process group, or (0, 1) outside one."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _scheduler_name(schedule: str) -> str:
    return {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[schedule]


def _token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    lm_head: torch.nn.Module | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (labels shifted by one).

    With ``lm_head`` (the model's output embedding), only the positions that predict a
    target token go through it: a forward pre-hook hands it the hidden states of those
    positions alone. The loss and its gradients are the same as with full logits (the
    other positions carry label ``-100`` and add nothing), but the vocabulary-wide
    projection, its float32 copy and the softmax run on the ~15 % of positions that are
    targets instead of on every context and padding position.
    """
    labels = batch["labels"][:, 1:]
    if lm_head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1, :].float()
        return torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            labels.reshape(-1).to(shift_logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    targets = labels != IGNORE_INDEX
    # Position t predicts label t + 1: the last position predicts nothing.
    keep = torch.nn.functional.pad(targets, (0, 1), value=False)

    def only_targets(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][keep.to(args[0].device)], *args[1:])

    handle = lm_head.register_forward_pre_hook(only_targets)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        handle.remove()
    n = int(targets.sum())
    if logits.dim() != 2 or logits.shape[0] != n:  # a model that reshapes after its head: use full logits
        return _token_loss_sum(model, batch, None)
    return torch.nn.functional.cross_entropy(logits.float(), labels[targets].to(logits.device), reduction="sum")


def _lora_compute(tm: TrainModel) -> contextlib.AbstractContextManager[Any]:
    """The context the LoRA forward runs in: bfloat16 autocast when the base model is bfloat16.

    The LoRA weights (and their gradients and optimizer state) stay float32, but peft
    otherwise casts every adapted layer's input to float32 and runs dropout, both LoRA
    matmuls, the scaling and the sum with the base output in float32 before casting back
    to bfloat16: copies and float32 element-wise passes over every activation, in
    forward and backward, which cost more than the model's own matmuls on a CPU. Under
    autocast (mixed precision: float32 master weights, bfloat16 compute) the adapter
    path stays in bfloat16; its output is added to a bfloat16 base output and rounded to
    bfloat16 either way, so the difference is within bfloat16's rounding.
    """
    if tm.dtype != "bfloat16":
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=tm.device.type, dtype=torch.bfloat16))
    stack.enter_context(disable_input_dtype_casting(tm.peft_model))
    return stack


def _n_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _groups(loader: Any, size: int) -> Any:
    """Yield lists of up to ``size`` consecutive batches (one optimizer step each)."""
    group: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _save_adapter(peft_model: Any, out_dir: Path, info: dict[str, Any]) -> None:
    """Write the adapter (plus an info JSON) to a tmp sibling, then move it onto ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(str(tmp))
        _sort_target_modules(tmp / "adapter_config.json")
        (tmp / SFT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sort_target_modules(config_path: Path) -> None:
    """Sort ``target_modules`` in a saved adapter config.

    peft writes them in set order, which changes with Python's string hashing from one
    process to the next; sorted, two runs with the same seed write byte-identical configs.
    """
    if not config_path.is_file():
        return
    data = json.loads(config_path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class TrainModel:
    """The tokenizer and LoRA model :func:`load_model` prepares for training."""

    tokenizer: Any
    peft_model: Any
    train_model: torch.nn.Module
    device: torch.device
    dtype: str = "float32"
    """The base model's dtype (``sft.dtype`` resolved)."""


def load_model(
    base_model: Path,
    cfg: SFTConfig,
    init_adapter: str | Path | None,
    seed: int,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None,
) -> TrainModel:
    """Load the tokenizer and base model and wrap it in a LoRA adapter (new, seeded; or ``init_adapter``)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    use_cuda = cfg.use_gpu and torch.cuda.is_available()
    dtype_name = resolve_dtype(cfg.dtype, "cuda" if use_cuda else "cpu", who="LoRA SFT")
    if dtype_name == "auto":  # on a GPU: bfloat16 where supported
        dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if not use_cuda:
        tune_allocator()  # keep freed activation memory for reuse (see trprompt.engines.cpu_speed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch_dtype(dtype_name))
    torch.manual_seed(seed)  # LoRA initialisation and dropout
    if init_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        modules = present_target_modules(model, cfg.target_modules)
        if not modules:
            raise ValueError(f"none of the target modules {cfg.target_modules} exist in {base_model}")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=modules, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
    if prepare_model is None:
        train_model: torch.nn.Module = peft_model.to("cuda" if use_cuda else "cpu")
    else:
        train_model = prepare_model(peft_model)
    device = next(p for p in peft_model.parameters()).device
    train_model.train()
    return TrainModel(tokenizer, peft_model, train_model, device, dtype_name)


def make_loader(
    features: list[dict[str, list[int]]],
    cfg: SFTConfig,
    seed: int,
    pad_token_id: int,
    rank: int,
    world: int,
    prepare_data_loader: Callable[[DataLoader], Any] | None,
) -> tuple[Any, Any]:
    """A data loader over ``features`` in a seeded order (sharded with a ``DistributedSampler`` when ``world > 1``)."""
    if world > 1:
        sampler: Any = DistributedSampler(features, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(features, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=functools.partial(collate_batch, pad_token_id=pad_token_id),
    )
    return (prepare_data_loader or _identity)(loader), sampler


def make_optimizer(params: list[torch.nn.Parameter], cfg: SFTConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW (no weight decay) and the ``cfg.lr_schedule`` learning-rate schedule."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(_scheduler_name(cfg.lr_schedule), optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
    return optimizer, scheduler


def optimizer_step(
    tm: TrainModel, group: list[dict[str, torch.Tensor]], params: list[torch.nn.Parameter], optimizer: Any,
    scheduler: Any, world: int,
) -> tuple[float, float, int, int]:
    """One optimizer step over ``group`` (gradient accumulation); returns (loss, lr, target tokens, tokens).

    The loss is the mean over every target token of the step (over all ranks); DDP's
    gradient sync runs only on the group's last micro-batch; gradients are clipped to 1.0.
    """
    n_tgt = sum(_n_targets(b) for b in group)
    loss_sum = 0.0
    tokens = 0
    for bi, batch in enumerate(group):
        batch = {k: v.to(tm.device) for k, v in batch.items()}
        last = bi == len(group) - 1
        sync = nullcontext() if last or not hasattr(tm.train_model, "no_sync") else tm.train_model.no_sync()
        with sync:
            with _lora_compute(tm):
                loss = _token_loss_sum(tm.train_model, batch, tm.peft_model.get_output_embeddings())
            loss = loss / max(n_tgt, 1)
            loss.backward()
        loss_sum += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _global_mean(loss_sum * n_tgt, n_tgt, tm.device, world), lr, n_tgt, tokens


def save_adapter(peft_model: Any, out_dir: Path, info: dict[str, Any]) -> None:
    """Write the adapter and its info JSON (``trprompt_sft.json``) onto ``out_dir`` atomically."""
    _save_adapter(peft_model, out_dir, info)


def train_lora(
    examples: Sequence[SFTExample],
    base_model: str | Path,
    out_dir: str | Path,
    cfg: SFTConfig,
    templates: Templates,
    init_adapter: str | Path | None = None,
    seed: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    distributed: bool = False,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    prepare_data_loader: Callable[[DataLoader], Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter of ``base_model`` on ``examples`` and save it to ``out_dir``.

    Optimisation: AdamW (no weight decay) at ``cfg.learning_rate`` with the
    ``cfg.lr_schedule`` schedule and ``cfg.warmup_ratio`` warm-up, ``cfg.batch_size``
    examples per micro-batch, ``cfg.grad_accum`` micro-batches per optimizer step, the
    loss averaged over all target tokens of the step, gradients clipped to norm 1.0.
    The base model's dtype is ``cfg.dtype`` with ``auto`` resolved by
    :func:`trprompt.engines.dtype.resolve_dtype` (bfloat16 on CPUs with native
    bfloat16 and on bfloat16-capable GPUs, else float32); LoRA weights stay float32.
    Torch's thread count is left as it is. The stages are :func:`load_model`,
    :func:`encode_examples` and :func:`make_loader` (data), :func:`optimizer_step` and
    :func:`save_adapter`.

    Args:
        examples: Training examples (see :func:`build_sft_examples`).
        base_model: Local folder with the base model and its tokenizer.
        out_dir: Where the adapter goes (replaced atomically; written by rank 0 only).
        cfg: LoRA and optimisation settings. ``target_modules`` is filtered to the
            modules present in the model.
        templates: Builds Π's chat for each example.
        init_adapter: Adapter folder to continue training from; its own LoRA settings
            (rank, alpha, modules) then apply instead of ``cfg``'s.
        seed: Seeds the LoRA initialisation and the per-epoch shuffling.
        on_step: Called after every optimizer step with ``step``, ``epoch``, ``loss``
            (token-mean over the step), ``lr`` (used for the step), ``tokens`` (so far), ``elapsed_s`` and
            ``epoch_end``; at an epoch's last step also ``epoch_mean_loss``.
        distributed: Running inside a torch process group (e.g. a Ray Train worker): the
            data is sharded with a seeded ``DistributedSampler`` and the reported losses are
            averaged over ranks.
        prepare_model: Hook applied to the LoRA model (e.g. ``ray.train.torch.prepare_model``:
            device placement and DDP). Default: move to ``cuda`` if ``cfg.use_gpu`` and available.
        prepare_data_loader: Hook applied to the data loader. Default: identity.

    Returns:
        Metrics: ``steps``, ``examples`` (given), ``trained_examples`` (kept after encoding),
        ``trimmed`` (examples whose critique's middle was cut to fit ``cfg.max_length``),
        ``trimmed_tokens``, ``skipped`` (examples that could not fit at all), ``epochs``, ``first_loss``,
        ``final_loss``, ``mean_loss_last_epoch``, ``train_s``, ``tokens`` (non-padding tokens this rank forwarded),
        ``target_tokens`` (tokens in this rank's loss), ``world_size`` and ``adapter_dir``
        (None on ranks other than 0).

    Raises:
        ValueError: If ``examples`` is empty, none fits ``cfg.max_length`` or no target module
            exists in the model.

    """
    if not examples:
        raise ValueError("train_lora needs at least one example")
    t_start = time.perf_counter()
    rank, world = _dist_info(distributed)
    base_model, out_dir = Path(base_model), Path(out_dir)

    tm = load_model(base_model, cfg, init_adapter, seed, prepare_model)
    features, enc = encode_examples(tm.tokenizer, templates, examples, cfg.max_length)
    if not features:
        raise ValueError(f"none of the {len(examples)} examples fits sft.max_length={cfg.max_length} "
                         "(system prompt + question + a trimmed critique + instruction)")
    loader, sampler = make_loader(features, cfg, seed, pad_id(tm.tokenizer), rank, world if distributed else 1,
                                  prepare_data_loader)
    steps_per_epoch = math.ceil(math.ceil(len(sampler) / cfg.batch_size) / cfg.grad_accum)
    params = [p for p in tm.peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, steps_per_epoch * cfg.epochs)

    step = tokens = target_tokens = 0
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    for epoch in range(cfg.epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        epoch_losses = []
        groups = list(_groups(loader, cfg.grad_accum))
        for gi, group in enumerate(groups):
            step_loss, lr, n_tgt, n_tok = optimizer_step(tm, group, params, optimizer, scheduler, world)
            step += 1
            tokens += n_tok
            target_tokens += n_tgt
            step_losses.append(step_loss)
            epoch_losses.append(step_loss)
            if on_step is not None:
                record: dict[str, Any] = {"step": step, "epoch": epoch + 1, "loss": step_loss, "lr": lr,
                                          "tokens": tokens, "elapsed_s": time.perf_counter() - t_start,
                                          "epoch_end": gi == len(groups) - 1}
                if record["epoch_end"]:
                    record["epoch_mean_loss"] = sum(epoch_losses) / len(epoch_losses)
                on_step(record)

    metrics: dict[str, Any] = {
        "steps": step,
        "examples": len(examples),
        "trained_examples": enc.kept,
        "trimmed": enc.trimmed,
        "trimmed_tokens": enc.trimmed_tokens,
        "skipped": enc.skipped,
        "epochs": cfg.epochs,
        "first_loss": step_losses[0],
        "final_loss": step_losses[-1],
        "mean_loss_last_epoch": sum(epoch_losses) / len(epoch_losses),
        "train_s": time.perf_counter() - t_start,
        "tokens": tokens,
        "target_tokens": target_tokens,
        "world_size": world,
        "dtype": tm.dtype,
        "adapter_dir": None,
    }
    if rank == 0:
        metrics["adapter_dir"] = str(out_dir)
        info = {
            "metrics": {k: v for k, v in metrics.items() if k != "adapter_dir"},
            "base_model": str(base_model),
            "init_adapter": _path_from(out_dir, init_adapter),  # relative: the run directory stays relocatable
            "seed": seed,
            "sft_config": asdict(cfg),
            "pid": os.getpid(),
        }
        save_adapter(tm.peft_model, out_dir, info)
    return metrics


def _global_mean(loss_sum: float, count: int, device: torch.device, world: int) -> float:
    """Token-weighted mean loss over all ranks (just ``loss_sum / count`` outside a process group)."""
    if world > 1:
        t = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        loss_sum, count = float(t[0]), int(t[1])
    return loss_sum / max(count, 1)


def _path_from(folder: str | Path, path: str | Path | None) -> str | None:
    """``path`` as written in the metadata of adapter ``folder``.

    Another iteration's adapter of the same run (``<run>/iter_<j>/adapter`` beside ``<run>/iter_<k>/adapter``)
    is stored relative to ``folder``, so a copied or moved run stays consistent; anything else (a URI, a
    worker's download cache) is stored as it is.
    """
    if path is None or "://" in str(path):
        return None if path is None else str(path)
    target, here = Path(path).absolute(), Path(folder).absolute()
    if target.name != here.name or target.parent.parent != here.parent.parent:
        return str(path)
    return os.path.relpath(target, here)
