"""Request and response bodies of the HTTP API (pydantic; FastAPI validates and documents them)."""


from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.serve.security import has_visible_text
from trprompt.config import DATASETS


def _valid_text(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from e
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


DatasetHint = Annotated[str | None, Field(None, max_length=32, description=f"Benchmark hint: one of {DATASETS}.")]


class _QuestionBody(_Strict):
    question: str = Field(description="The problem (not empty; at most the server's max_question_chars).")
    dataset: DatasetHint = None

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        _valid_text(v)
        if not has_visible_text(v):
            raise ValueError("question must not be empty (whitespace, control or zero-width characters only)")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}")
        return v


class PromptRequest(_QuestionBody):
    """Body of ``POST /v1/prompt``."""

    n: int = Field(1, ge=1, le=8, description="How many instructions to sample.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False,
                                      description="Sampling temperature (default: the run's evaluation one).")


class SolveRequest(_QuestionBody):
    """Body of ``POST /v1/solve``."""


class ReloadRequest(_Strict):
    """Body of ``POST /v1/admin/reload``: a run directory, or an adapter folder and/or a t* text."""

    run_dir: str | None = Field(None, min_length=1, max_length=4096, description="Finished run directory.")
    adapter_path: str | None = Field(None, min_length=1, max_length=4096, description="A peft adapter folder.")
    optimal_reward: str | None = Field(None, min_length=1, max_length=20_000, description="A t* text.")

    @field_validator("run_dir", "adapter_path", "optimal_reward")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return None if v is None else _valid_text(v)


class TokenCounts(BaseModel):
    """Tokens spent by a request."""

    prompt: int
    completion: int


class PromptResponse(BaseModel):
    """Reply of ``POST /v1/prompt``."""

    prompts: list[str]
    prompt: str
    run_id: str
    adapter_version: str
    optimal_reward_version: str
    epoch: int
    dataset: str | None = None
    warning: str | None = None
    tokens: TokenCounts


class SolveResponse(BaseModel):
    """Reply of ``POST /v1/solve``."""

    prompt: str
    answer: str
    extracted: str | None
    run_id: str
    adapter_version: str
    optimal_reward_version: str
    tokens: TokenCounts
    tokens_by_role: dict[str, TokenCounts]


class ErrorResponse(BaseModel):
    """Every error body."""

    error: str
    message: str
    details: list[dict[str, Any]] | None = None
