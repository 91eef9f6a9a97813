"""The HTTP front (FastAPI behind ``@serve.ingress``): validation, routing to the model deployments, errors."""


import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve.args import HARD_MAX_BODY_BYTES, ServeArgs
from cluster.serve.errors import InputError, clean_validation_errors, error_json, map_exception, safe_text
from cluster.serve.messages import AnswerJob, AnswerOutcome, PromptJob, PromptOutcome
from cluster.serve.metrics import METRICS
from cluster.serve.run_spec import RunSpec
from cluster.serve.schemas import (
    ErrorResponse,
    PromptRequest,
    PromptResponse,
    ReloadRequest,
    SolveRequest,
    SolveResponse,
    TokenCounts,
)

log = logging.getLogger("trprompt.serve")


async def _as_awaitable(response: Any) -> Any:
    return await response


app = FastAPI(
    title="TRPrompt query-aware prompts",
    description="Query-aware instructions from a TRPrompt run (prompt model + LoRA adapter + optimal reward t*).",
    version="1",
    max_body_size=HARD_MAX_BODY_BYTES,
)

_LIMITS: dict[str, int] = {"max_body_bytes": 64 * 1024}
"""Set by the ingress replica of this process (one per process) from its settings."""


def set_body_limit(max_body_bytes: int) -> None:
    """Set the body-size limit the middleware of this process enforces.

    A module-level function on purpose: Serve pickles the ingress class by value, so
    it must reach this module's state through a by-reference function.
    """
    _LIMITS["max_body_bytes"] = int(max_body_bytes)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = clean_validation_errors(exc.errors())
    code = "invalid_json" if any(d.get("type") == "json_invalid" for d in details) else "invalid_request"
    return error_json(422 if code == "invalid_request" else 400, code, "the request body is not valid", details)


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            413: "body_too_large"}.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, safe_text(exc.detail, 500), headers=getattr(exc, "headers", None))


@app.exception_handler(InputError)
async def _on_input_error(request: Request, exc: InputError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message)


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Any:
    """Body-size limit, metrics, and a last-resort JSON 500 for anything unexpected."""
    t0 = time.perf_counter()
    response: Any
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > _LIMITS["max_body_bytes"]):
        bad = not length.isdigit()
        response = error_json(400 if bad else 413, "bad_request" if bad else "body_too_large",
                              "invalid Content-Length" if bad else f"body over {_LIMITS['max_body_bytes']} bytes")
    else:
        try:
            response = await call_next(request)
        except Exception as e:  # pragma: no cover - routes catch their own errors
            log.exception("unhandled error on %s", request.url.path)
            response = map_exception(e)
    route = request.scope.get("route")
    METRICS.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
    return response


@serve.ingress(app)
class Ingress:
    """HTTP front: validation, routing to the model deployments, JSON errors."""

    def __init__(self, prompt_model: Any, target_model: Any | None, spec: RunSpec, settings: dict[str, Any],
                 shared: bool) -> None:
        self.settings = ServeArgs.model_validate(settings)
        set_body_limit(self.settings.max_body_bytes)
        self.prompt_model = prompt_model
        self.target_model = target_model
        self.spec = spec
        self.shared = shared
        self._reload_lock = asyncio.Lock()

    async def _call(self, response: Any) -> Any:
        """Await a deployment response under the per-request deadline (cancelled when it passes)."""
        try:
            return await asyncio.wait_for(_as_awaitable(response), timeout=self.settings.request_timeout_s)
        except TimeoutError:
            try:
                response.cancel()
            except Exception:
                pass
            raise

    def _check_question(self, question: str) -> None:
        if len(question) > self.settings.max_question_chars:
            limit = self.settings.max_question_chars
            raise InputError(422, "question_too_long", f"question has {len(question)} characters; the limit is {limit}")

    def _warning(self, dataset: str | None) -> str | None:
        trained = self.spec.config.dataset.name
        if dataset is not None and dataset != trained:
            return f"this prompt model was trained on {trained}, not {dataset}"
        return None

    @app.post("/v1/prompt", response_model=PromptResponse, responses={400: {"model": ErrorResponse},
              422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}})
    async def prompt(self, body: PromptRequest) -> Any:
        """Query-aware instruction(s) Π(question, t*) from the served run."""
        self._check_question(body.question)
        try:
            out: PromptOutcome = await self._call(self.prompt_model.prompts.remote(
                PromptJob(body.question, body.n, body.temperature)))
        except Exception as e:
            return map_exception(e)
        return PromptResponse(
            prompts=out.prompts, prompt=out.prompts[0], run_id=out.run_id, adapter_version=out.adapter_version,
            optimal_reward_version=out.reward_version, epoch=out.epoch, dataset=body.dataset,
            warning=self._warning(body.dataset),
            tokens=TokenCounts(prompt=out.prompt_tokens, completion=out.completion_tokens),
        )

    @app.post("/v1/solve", response_model=SolveResponse, responses={400: {"model": ErrorResponse},
              404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def solve(self, body: SolveRequest) -> Any:
        """Instruction from Π, answer from the target model, and the extracted final answer."""
        from trprompt.grading import extract_answer

        self._check_question(body.question)
        if self.target_model is None:
            return error_json(404, "no_target", "this deployment has no target model (started with --no-target)")
        try:
            p: PromptOutcome = await self._call(self.prompt_model.prompts.remote(PromptJob(body.question)))
            a: AnswerOutcome = await self._call(self.target_model.answer.remote(
                AnswerJob(p.target_messages, p.target_sampling)))
        except Exception as e:
            return map_exception(e)
        by_role = {"prompt_model": TokenCounts(prompt=p.prompt_tokens, completion=p.completion_tokens),
                   "target_model": TokenCounts(prompt=a.prompt_tokens, completion=a.completion_tokens)}
        return SolveResponse(
            prompt=p.prompts[0], answer=a.text, extracted=extract_answer(a.text), run_id=p.run_id,
            adapter_version=p.adapter_version, optimal_reward_version=p.reward_version,
            tokens=TokenCounts(prompt=p.prompt_tokens + a.prompt_tokens,
                               completion=p.completion_tokens + a.completion_tokens),
            tokens_by_role=by_role,
        )

    @app.get("/healthz")
    async def healthz(self) -> Any:
        """200 when a prompt-model replica answers within 5 s, else 503."""
        try:
            r = await asyncio.wait_for(_as_awaitable(self.prompt_model.ping.remote()), timeout=5.0)
        except Exception as e:
            return error_json(503, "unhealthy", f"prompt model not answering ({type(e).__name__})")
        return {"status": "ok", "prompt_model": r}

    @app.get("/v1/info")
    async def info(self) -> Any:
        """Run id, models, t*, validation accuracy, adapter version, batching settings and engine counters."""
        try:
            p = await self._call(self.prompt_model.info.remote())
            t = None
            if self.target_model is not None and not self.shared:
                t = await self._call(self.target_model.info.remote())
        except Exception as e:
            return map_exception(e)
        version = p["version"] or {}
        models = self.spec.config.models
        s = self.settings
        return {
            **version,
            "epoch": p["epoch"],
            "adapter_id": p["adapter_id"],
            "loaded_adapters": p["loaded_adapters"],
            "models": {
                "prompt_model": {"model": models.prompt_model.model, "engine": models.prompt_model.engine},
                "target_model": ({"model": models.target_model.model, "engine": models.target_model.engine,
                                  "shared_with_prompt_model": self.shared} if self.target_model is not None
                                 else None),
            },
            "batching": {"enabled": s.batching, "max_batch_size": s.max_batch_size,
                         "batch_wait_timeout_s": s.batch_wait_timeout_s},
            "limits": {"max_question_chars": s.max_question_chars, "max_body_bytes": s.max_body_bytes,
                       "request_timeout_s": s.request_timeout_s},
            "replicas": {"prompt_model": p["replica"], "target_model": t["replica"] if t else None},
            "stats": {"prompt_model": p["stats"]["prompt"],
                      "target_model": t["stats"] if t else (p["stats"]["target"] if self.shared else None)},
        }

    @app.post("/v1/admin/reload", responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
              409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    async def reload(self, body: ReloadRequest, request: Request) -> Any:
        """Hot-swap the adapter and t*: load under a new id, switch, unload the old one; no request is dropped."""
        s = self.settings
        if not s.enable_admin:
            return error_json(404, "not_found", "admin routes are disabled")
        if s.admin_token and request.headers.get("authorization") != f"Bearer {s.admin_token}":
            return error_json(401, "unauthorized", "admin token required")
        if body.run_dir is None and body.adapter_path is None and body.optimal_reward is None:
            return error_json(422, "invalid_request", "give run_dir, or adapter_path and/or optimal_reward")
        if body.run_dir is not None and (body.adapter_path is not None or body.optimal_reward is not None):
            return error_json(422, "invalid_request", "give either run_dir or adapter_path/optimal_reward, not both")
        async with self._reload_lock:
            try:
                if body.run_dir is not None:
                    spec = await asyncio.to_thread(RunSpec.from_run_dir, body.run_dir)
                else:
                    current: RunSpec = await self._call(self.prompt_model.current_spec.remote())
                    spec = await asyncio.to_thread(current.with_overrides, body.adapter_path, body.optimal_reward)
            except Exception as e:
                return map_exception(e)
            old, new = self.spec.config.models.prompt_model, spec.config.models.prompt_model
            if (old.model, old.engine) != (new.model, new.engine):
                return error_json(409, "base_model_mismatch", f"served prompt model is {old.engine}:{old.model}; "
                                  f"the new run uses {new.engine}:{new.model} (redeploy instead)")
            try:
                result = await self._call(self.prompt_model.reload.remote(spec))
            except RayTaskError as e:  # the adapter did not load: the old version keeps serving
                cause = e.cause if getattr(e, "cause", None) is not None else e
                return error_json(422, "reload_failed", f"{type(cause).__name__}: {safe_text(cause, 500)}")
            except Exception as e:
                return map_exception(e)
        return {"status": "ok", **result}
