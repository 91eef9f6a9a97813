"""The run configuration: one documented object, loaded from YAML, validated up front.

Every field has a default and a one-line doc (the ``doc`` metadata). Invalid input
raises :class:`ConfigError` naming the dotted field path, before any model loads.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trprompt.roles import ROLES

EngineKind = Literal["hf", "vllm", "openai", "echo"]
DATASETS = ("gsm8k", "gsm_hard", "math", "svamp")
GRADER_NAMES = ("numeric", "math", "exact", "choice", "contains")
"""The built-in graders a config may name (see ``trprompt.grading``); ``python: ...`` names a user metric."""
BASELINE_NAMES: tuple[str, ...] = ("plain", "cot")
"""Baselines that need no training (no instruction; "Let's think step by step."): ``eval.baselines`` values."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (the message names the field)."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        # a deep copy per instance: dataclasses.replace would share nested sections (every config's
        # models.prompt_model was one object, so setting resolved_dtype on one run's config changed them all)
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ModelConfig:
    """One role's model and where it runs."""

    model: str = _f("smollm2-135m-instruct", "Registry name, HF model id, local path, or served model name.")
    engine: EngineKind = _f("hf", "Engine kind: hf (transformers), vllm, openai (compatible server), echo (tests).")
    base_url: str | None = _f(None, "OpenAI-compatible base URL (engine=openai).")
    api_key_env: str | None = _f(None, "Environment variable holding the API key (engine=openai).")
    num_actors: int = _f(1, "Engine actors in this role's pool.")
    num_cpus: float = _f(0.5, "CPUs reserved per actor (fractional is fine).")
    num_gpus: float = _f(0.0, "GPUs reserved per actor.")
    threads: int | None = _f(None, "torch threads per HF engine (None: torch default).")
    dtype: str = _f("auto", "Weights dtype: auto, float32, bfloat16, float16. auto (hf): bfloat16 on CPUs with "
                    "native bfloat16 (AVX512-BF16 or AMX), else float32; the checkpoint's dtype on GPUs.")
    resolved_dtype: str | None = _f(None, "Written by the run, not read: what dtype auto resolved to on the driver "
                                          "(see trprompt.engines.dtype).")
    max_batch_size: int = _f(32, "Largest batch one engine call runs at once.")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size.")
    gpu_memory_utilization: float = _f(0.85, "vLLM GPU memory fraction.")
    max_model_len: int | None = _f(None, "vLLM context length cap.")
    max_lora_rank: int = _f(256, "vLLM max LoRA rank (prompt model).")
    timeout_s: float = _f(120.0, "Per-request timeout (engine=openai).")
    max_retries: int = _f(3, "Retries per request (engine=openai).")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        _positive(self.num_actors, f"{path}.num_actors")
        _nonneg(self.num_cpus, f"{path}.num_cpus")
        _nonneg(self.num_gpus, f"{path}.num_gpus")
        _positive(self.max_batch_size, f"{path}.max_batch_size")
        if self.engine == "openai" and not self.base_url:
            raise ConfigError(f"{path}.base_url is required when {path}.engine is 'openai'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"{path}.dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        _check_resolved(self.resolved_dtype, f"{path}.resolved_dtype")
        if not self.model:
            raise ConfigError(f"{path}.model must not be empty")

    def pool_key(self) -> str:
        """Identity of the engine this role needs; roles with equal keys may share a pool."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class ModelsConfig:
    """The models for each role of the paper."""

    prompt_model: ModelConfig = _f(ModelConfig(), "Π: writes a query-specific instruction (LoRA-tuned).")
    target_model: ModelConfig = _f(ModelConfig(), "The frozen model that answers question + instruction.")
    reward_model: ModelConfig = _f(ModelConfig(), "R: writes the textual critique of a prompt.")
    optimizer_model: ModelConfig | None = _f(None, "TextGrad's optimizer/backward model (None: reward_model).")
    share_engines: bool = _f(True, "Roles with identical model settings share one pool (CPU default).")


@dataclass
class FieldsConfig:
    """Which column of a data file holds what (files only; built-in tasks know their own)."""

    question: str = _f("question", "Column with the question shown to the models.")
    answer: str = _f("answer", "Column with the gold answer.")
    solution: str | None = _f(None, "Optional column with a worked solution / explanation (reference for R).")
    choices: str | None = _f(None, "Optional column with the options (list, JSON list or 'a|b|c'); appended "
                                   "to the question as lettered lines.")
    id: str | None = _f(None, "Optional column with a unique id (None: '<task>-<pool>-<row>').")

    def validate(self, path: str) -> None:
        """Raise ConfigError for empty or repeated column names."""
        names = [v for v in dataclasses.asdict(self).values() if v is not None]
        for k, v in dataclasses.asdict(self).items():
            if v is not None and not v.strip():
                raise ConfigError(f"{path}.{k} must not be empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: two roles name the same column ({names})")


@dataclass
class DatasetConfig:
    """Which task's data and how much of it."""

    name: str = _f("gsm8k", "A built-in task (gsm8k, gsm_hard, math, svamp), or a JSONL/CSV/Parquet file, or a "
                            "folder with train.* and/or test.*.")
    fields: FieldsConfig = _f(FieldsConfig(), "Column mapping for files (defaults: question, answer).")
    test_file: str | None = _f(None, "A separate test file for a single-file dataset (its test split).")
    test_size: float | None = _f(None, "Rows held out as test from a single file with no test file: a count "
                                       "(>= 1) or a fraction (None: 0.2; gsm_hard: 319).")
    split_seed: int | None = _f(None, "Seed of that hash-based hold-out (None: 0; gsm_hard: 1234); not the run "
                                      "seed, so the test split never moves.")
    skip_bad_rows: bool = _f(False, "Drop rows that fail the checks (listed in the run report) instead of failing.")
    val_fraction: float = _f(0.1, "Validation fraction of the training split (paper: 0.1).")
    train_limit: int | None = _f(None, "Cap on training questions (None: all).")
    val_limit: int | None = _f(None, "Cap on validation questions used for model selection (None: all).")
    test_limit: int | None = _f(None, "Cap on test questions in the final evaluation (None: all).")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        # A path is checked when the data is read (trprompt.data.task_from_config, before any model loads), so a
        # finished run's config still loads where its data file is not (serving, reports).
        looks_like_path = "/" in self.name or "\\" in self.name or Path(self.name).suffix != "" or \
            Path(self.name).exists()
        if self.name not in DATASETS and not looks_like_path:
            raise ConfigError(f"{path}.name must be a built-in task {DATASETS} or a path to a JSONL/CSV/Parquet file "
                              f"or a folder, got {self.name!r}")
        self.fields.validate(f"{path}.fields")
        if self.test_size is not None and not (
            0 < self.test_size < 1 or (self.test_size >= 1 and float(self.test_size).is_integer())
        ):
            raise ConfigError(f"{path}.test_size must be a fraction in (0, 1) or a whole number of rows, "
                              f"got {self.test_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{path}.val_fraction must be in (0, 1), got {self.val_fraction}")
        for k in ("train_limit", "val_limit", "test_limit"):
            v = getattr(self, k)
            if v is not None:
                _positive(v, f"{path}.{k}")


@dataclass
class TaskConfig:
    """What the task is: how answers are graded and how the meta-instructions describe it."""

    grader: str | None = _f(None, "numeric, math, exact, choice, contains or 'python: pkg.module:function' "
                                  "(None: the built-in task's grader; numeric for files).")
    description: str | None = _f(None, "One or two sentences: what the assistant is asked to do and what a correct "
                                       "answer looks like. Fills the meta-instructions and t*_0 (None: the "
                                       "built-in task's wording; a generic sentence for files).")

    def validate(self, path: str) -> None:
        """Raise ConfigError for an unknown grader or an empty description."""
        if self.description is not None and not self.description.strip():
            raise ConfigError(f"{path}.description must not be empty (leave it out for the default)")
        if self.grader is not None:  # the spelling here; a python: metric is imported when the data is read
            name = self.grader.strip()
            if name.lower().startswith("python"):
                target = name[len("python"):].lstrip(" :")
                if ":" not in target or not all(target.split(":", 1)):
                    raise ConfigError(f"{path}.grader: a user metric is 'python: package.module:function', "
                                      f"got {self.grader!r}")
            elif name.lower() not in GRADER_NAMES:
                raise ConfigError(f"{path}.grader: unknown grader {self.grader!r}; choose one of "
                                  f"{', '.join(GRADER_NAMES)} or 'python: package.module:function'")


@dataclass
class GenerationConfig:
    """Sampling settings for each role."""

    prompt_temperature: float = _f(0.9, "Π's sampling temperature for the synthetic set (paper: 0.9).")
    prompt_eval_temperature: float = _f(0.0, "Π's temperature when evaluating on validation/test.")
    prompt_max_tokens: int = _f(96, "Longest instruction Π may write.")
    target_temperature: float = _f(0.0, "Target temperature (paper: ~0).")
    target_max_tokens: int = _f(256, "Longest target answer.")
    reward_temperature: float = _f(0.0, "Reward-model temperature.")
    reward_max_tokens: int = _f(160, "Longest critique.")
    batch_size: int = _f(64, "Requests sent to an engine (or pool) in one call.")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        for k in ("prompt_temperature", "prompt_eval_temperature", "target_temperature", "reward_temperature"):
            v = getattr(self, k)
            if not 0.0 <= v <= 2.0:
                raise ConfigError(f"{path}.{k} must be in [0, 2], got {v}")
        for k in ("prompt_max_tokens", "target_max_tokens", "reward_max_tokens", "batch_size"):
            _positive(getattr(self, k), f"{path}.{k}")


@dataclass
class LoopConfig:
    """Algorithm 1's outer loop."""

    iterations: int = _f(4, "K: outer iterations (paper: 4).")
    synthetic_size: int = _f(800, "N: questions in each iteration's synthetic set (paper: 800).")
    textual_reward: bool = _f(True, "False: ablation with a numeric reward ('correct'/'incorrect').")
    update_optimal_reward: bool = _f(True, "False: ablation with t* fixed at t*_0.")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        _positive(self.iterations, f"{path}.iterations")
        _positive(self.synthetic_size, f"{path}.synthetic_size")


@dataclass
class SFTConfig:
    """LoRA fine-tuning of the prompt model."""

    lora_r: int = _f(256, "LoRA rank (paper: 256).")
    lora_alpha: int = _f(256, "LoRA alpha (paper: 256).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Modules that get LoRA."
    )
    epochs: int = _f(2, "Epochs per SFT stage (paper: 2).")
    learning_rate: float = _f(2e-5, "Peak learning rate (paper: 2e-5).")
    lr_schedule: Literal["linear", "constant", "cosine"] = _f("linear", "Learning-rate schedule (paper: linear decay).")
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up.")
    batch_size: int = _f(8, "Examples per optimizer step per worker.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    max_length: int = _f(
        512, "Longest training sequence in tokens (an over-long example keeps system prompt, question and "
        "instruction; the middle of its critique is trimmed with a marker, or it is skipped)."
    )
    num_workers: int = _f(1, "Ray Train workers.")
    cpus_per_worker: float = _f(1.0, "CPUs per Ray Train worker.")
    threads: int | None = _f(
        None, "torch threads in each Ray Train worker (None: Ray's default, one per whole reserved CPU)."
    )
    use_gpu: bool = _f(False, "Train on GPUs.")
    dtype: str = _f("auto", "Base model dtype: auto (bfloat16 on CPUs with native bfloat16 and on GPUs that support "
                    "it, else float32), float32, bfloat16, float16. LoRA weights stay float32.")
    resolved_dtype: str | None = _f(None, "Written by the run, not read: what dtype auto resolved to on the driver.")
    only_correct: bool = _f(False, "Train only on synthetic examples whose prompt led to a correct answer.")
    continue_from_previous: bool = _f(True, "Start each SFT from the previous iteration's adapter.")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        for k in ("lora_r", "lora_alpha", "epochs", "batch_size", "grad_accum", "max_length", "num_workers"):
            _positive(getattr(self, k), f"{path}.{k}")
        if not 0.0 < self.learning_rate < 1.0:
            raise ConfigError(f"{path}.learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{path}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules must not be empty")
        if self.threads is not None:
            _positive(self.threads, f"{path}.threads")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"{path}.dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        _check_resolved(self.resolved_dtype, f"{path}.resolved_dtype")


@dataclass
class RacingConfig:
    """Successive-halving racing of one search step's candidates (``reward_search.racing``).

    Off: every candidate is scored on every validation question. On: every candidate
    is scored on the first ``first_questions`` questions, the better ``keep_fraction``
    (at least one) is extended to ``first_questions / keep_fraction`` questions, and so
    on until one is left, which is then scored on all of them; the current t* is
    always compared on the same questions and acceptance is decided on all of them.
    Off by default: in ``bench/racing.py`` (3 candidates 3 points apart, 64 questions,
    4000 trials) racing at half the generations picked the best candidate 31 % of
    the time against 44 % for full scoring, outside the noise (see the README).
    """

    enabled: bool = _f(False, "Race the candidates (successive halving) instead of scoring each on every question.")
    first_questions: int = _f(16, "Validation questions of the first rung (every candidate is scored on these).")
    keep_fraction: float = _f(0.5, "Fraction of the candidates kept after each rung (at least one); each rung has "
                                   "1/keep_fraction times the questions of the one before.")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        _positive(self.first_questions, f"{path}.first_questions")
        if not 0.0 < self.keep_fraction < 1.0:
            raise ConfigError(f"{path}.keep_fraction must be in (0, 1), got {self.keep_fraction}")


@dataclass
class RewardSearchConfig:
    """TextGrad search over the optimal textual reward t*."""

    steps: int = _f(10, "TextGrad steps per iteration (paper: 10).")
    candidates_per_step: int = _f(3, "Candidate t* proposed (and each scored on validation) per step.")
    val_questions: int = _f(64, "Validation questions each candidate is scored on.")
    optimizer_temperature: float = _f(0.9, "Temperature when proposing candidates.")
    optimizer_max_tokens: int = _f(384, "Longest optimizer reply.")
    max_tag_retries: int = _f(2, "Retries when the optimizer's reply lacks <IMPROVED_VARIABLE> tags.")
    failures_in_feedback: int = _f(6, "Failed validation examples shown to TextGrad's loss.")
    racing: RacingConfig = _f(RacingConfig(), "Race the candidates on growing slices of the validation questions.")

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        if self.steps < 0:
            raise ConfigError(f"{path}.steps must be >= 0, got {self.steps}")
        for k in ("candidates_per_step", "val_questions", "optimizer_max_tokens"):
            _positive(getattr(self, k), f"{path}.{k}")
        if self.max_tag_retries < 0:
            raise ConfigError(f"{path}.max_tag_retries must be >= 0")
        self.racing.validate(f"{path}.racing")


@dataclass
class BudgetConfig:
    """Hard caps on what a run may spend (None: no cap)."""

    max_llm_requests: int | None = _f(None, "Most LLM requests over all roles.")
    max_tokens: int | None = _f(None, "Most tokens (prompt + completion) over all roles.")


@dataclass
class EvalConfig:
    """The final evaluation."""

    baselines: list[str] = _f(["plain", "cot"], "Baselines evaluated on the same test questions.")
    run_test: bool = _f(True, "Evaluate the best iteration on the test split at the end.")


@dataclass
class TRPromptConfig:
    """Everything one TRPrompt run needs. Load with :func:`load_config`."""

    run_dir: str = _f("runs/default", "Where artifacts go; re-running with the same run_dir resumes.")
    seed: int = _f(0, "Seed for splits, sampling and training.")
    dataset: DatasetConfig = _f(DatasetConfig(), "Task data (built-in name or file), fields and split sizes.")
    task: TaskConfig = _f(TaskConfig(), "Grader and description of the task.")
    models: ModelsConfig = _f(ModelsConfig(), "Models per role.")
    generation: GenerationConfig = _f(GenerationConfig(), "Sampling per role.")
    loop: LoopConfig = _f(LoopConfig(), "Algorithm 1's outer loop.")
    sft: SFTConfig = _f(SFTConfig(), "LoRA SFT of the prompt model.")
    reward_search: RewardSearchConfig = _f(RewardSearchConfig(), "Optimal-reward search.")
    budget: BudgetConfig = _f(BudgetConfig(), "Spending caps.")
    eval: EvalConfig = _f(EvalConfig(), "Final evaluation.")
    templates_file: str | None = _f(None, "YAML file overriding templates by name (see trprompt.templates).")
    # -- storage and tracking (trprompt.storage, trprompt.tracking) --
    storage: str | None = _f(
        None, "Storage root for a relative run_dir: a folder or a URI (s3://..., gs://...). None: $TRPROMPT_STORAGE, "
        "else ~/trprompt_runs inside a Ray working-dir job, else the current folder.")
    tracking: Literal["none", "mlflow"] = _f("none", "Experiment tracking: none or mlflow.")
    tracking_uri: str | None = _f(None, "MLflow tracking URI (None: a local store in <run_dir>/mlruns).")

    def validate(self) -> TRPromptConfig:
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        self.dataset.validate("dataset")
        self.task.validate("task")
        for role in ROLES:
            m = getattr(self.models, role)
            if m is not None:
                m.validate(f"models.{role}")
        if self.models.prompt_model.engine == "openai":
            raise ConfigError("models.prompt_model.engine cannot be 'openai': the prompt model is LoRA-trained "
                              "locally (use hf or vllm)")
        self.generation.validate("generation")
        self.loop.validate("loop")
        self.sft.validate("sft")
        self.reward_search.validate("reward_search")
        for k in ("max_llm_requests", "max_tokens"):
            v = getattr(self.budget, k)
            if v is not None:
                _positive(v, f"budget.{k}")
        for b in self.eval.baselines:
            if b not in BASELINE_NAMES:
                raise ConfigError(f"eval.baselines: unknown baseline {b!r}; choose from {BASELINE_NAMES}")
        if self.templates_file is not None and not Path(self.templates_file).is_file():
            raise ConfigError(f"templates_file: no such file {self.templates_file!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of the resolved config."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _check_resolved(v: str | None, path: str) -> None:
    if v not in (None, "auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{path} must be empty or auto/float32/bfloat16/float16, got {v!r}")


def _positive(v: Any, path: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{path} must be a positive number, got {v!r}")


def _nonneg(v: Any, path: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{path} must be >= 0, got {v!r}")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown field {where}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TRPromptConfig:
    """Build and validate a config from a nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping, got {type(data).__name__}")
    if isinstance(data.get("dataset"), str):  # `dataset: gsm8k` / `dataset: my.jsonl` shorthand
        data = {**data, "dataset": {"name": data["dataset"]}}
    return _build(TRPromptConfig, data, "").validate()


def read_yaml(path: str | Path, kind: str = "config file", mapping_error: str | None = None) -> Any:
    """Read a YAML file; ConfigError when it is missing, not valid YAML, or (with ``mapping_error``) not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if mapping_error is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: {mapping_error}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TRPromptConfig:
    """Load a YAML config, apply ``a.b.c=value`` overrides (YAML-parsed), validate."""
    data = read_yaml(path)
    for ov in overrides or []:
        apply_override(data, ov)
    return config_from_dict(data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like a.b.c=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if isinstance(nxt, str) and cur is data and part == "dataset":  # the `dataset: name` shorthand
            nxt = cur[part] = {"name": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {part} is not a mapping")
        cur = nxt
    cur[parts[-1]] = yaml.safe_load(raw)


def dump_config(cfg: TRPromptConfig) -> str:
    """YAML text of the resolved config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def check_api_keys(models: ModelsConfig, environ: typing.Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming the variable when a role's ``api_key_env`` is not set in the environment.

    The jobs call this right after loading the config, before any model loads, so a paper config
    that uses gpt-4o-mini as TextGrad's optimizer fails at once instead of after the local models
    have started.
    """
    import os

    env = os.environ if environ is None else environ
    for role in ROLES:
        mc = getattr(models, role)
        if mc is not None and mc.api_key_env and not env.get(mc.api_key_env):
            raise ConfigError(
                f"models.{role}.api_key_env: environment variable {mc.api_key_env} is not set; it holds the "
                f"API key for {mc.model} at {mc.base_url or 'the default endpoint'} (export {mc.api_key_env}=..., "
                f"or use the all-local twin of a paper config, configs/paper-*-local.yaml)"
            )
