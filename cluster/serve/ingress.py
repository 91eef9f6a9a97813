"""The HTTP front (FastAPI behind ``@serve.ingress``): auth, validation, routing to the model deployments, errors.

Prompt and solve requests have no side effects, so when the replica serving one dies the
ingress sends it again (to another replica, or the restarted one) until the request's
deadline: a client sees no failure from a replica crash. See :mod:`cluster.serve.security`
for the admin token, the Host allow-list and the reload roots.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve import guard, openai_compat
from cluster.serve.args import ServeArgs
from cluster.serve.errors import (
    InputError,
    clean_validation_errors,
    error_json,
    exception_error,
    is_openai_path,
    is_replica_failure,
    map_exception,
    safe_text,
)
from cluster.serve.messages import AnswerJob, AnswerOutcome, PromptJob, PromptOutcome
from cluster.serve.run_spec import RunDirError, RunSpec, check_servable
from cluster.serve.schemas import (
    ErrorResponse,
    PromptRequest,
    PromptResponse,
    ReloadRequest,
    SolveRequest,
    SolveResponse,
    TokenCounts,
)
from cluster.serve.security import PathNotAllowed, bearer_token, hide_paths, resolve_under_roots, token_matches

log = logging.getLogger("trprompt.serve")

REDACTED_INFO_KEYS = ("run_dir", "adapter_path")
"""What ``/v1/info`` shows only to the admin (besides the full t*)."""


async def _as_awaitable(response: Any) -> Any:
    return await response


app = FastAPI(
    title="TRPrompt query-aware prompts",
    description="Query-aware instructions from a TRPrompt run (prompt model + LoRA adapter + optimal reward t*). "
    "Also OpenAI-compatible: POST /v1/chat/completions, GET /v1/models.",
    version="1",
    max_body_size=None,  # the guard enforces the limit, with a JSON 413 at every size
)
app.add_middleware(guard.Guard)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = clean_validation_errors(exc.errors())
    invalid_json = any(d.get("type") == "json_invalid" for d in details)
    openai = is_openai_path(request.url.path)
    status = 400 if invalid_json or openai else 422
    return error_json(status, "invalid_json" if invalid_json else "invalid_request", "the request body is not valid",
                      details, openai=openai)


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            413: "body_too_large"}.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, safe_text(exc.detail, 500), headers=getattr(exc, "headers", None),
                      openai=is_openai_path(request.url.path))


@app.exception_handler(InputError)
async def _on_input_error(request: Request, exc: InputError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message, headers=exc.headers, openai=is_openai_path(request.url.path),
                      param=exc.param)


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 413, 421, 422, 429, 503, 504)}


@serve.ingress(app)
class Ingress:
    """HTTP front: auth, validation, routing to the model deployments, JSON errors."""

    def __init__(self, prompt_model: Any, target_model: Any | None, spec: RunSpec, settings: dict[str, Any],
                 shared: bool) -> None:
        self.settings = s = ServeArgs.model_validate(settings)
        guard.install(s.allowed_hosts, s.max_body_bytes, s.rate_limit_per_s, s.rate_limit_burst,
                      s.max_pending_requests)
        self.roots = s.resolved_run_roots()
        self.prompt_model = prompt_model
        self.target_model = target_model
        self.spec = spec
        self.shared = shared
        self.model_id = f"trprompt-{spec.run_id.partition('@')[0]}"
        self.started = int(time.time())
        self._reload_lock = asyncio.Lock()

    # --- calls to the deployments
    async def _call(self, response: Any, timeout: float | None = None) -> Any:
        """Await a deployment response under a deadline (cancelled when it passes)."""
        try:
            return await asyncio.wait_for(_as_awaitable(response), timeout=timeout or self.settings.request_timeout_s)
        except TimeoutError:
            try:
                response.cancel()
            except Exception:
                pass
            raise

    async def _retrying(self, make_call: Callable[[], Any], deadline: float) -> Any:
        """Call a side-effect-free deployment method; when its replica dies, call again until ``deadline``."""
        delay = 0.1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                return await self._call(make_call(), timeout=left)
            except Exception as e:
                if not is_replica_failure(e) or deadline - time.monotonic() <= delay:
                    raise
                log.warning("replica failure (%s); retrying the request", type(e).__name__)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    def _deadline(self) -> float:
        return time.monotonic() + (self.settings.retry_budget_s or self.settings.request_timeout_s)

    async def _prompt(self, job: PromptJob, deadline: float) -> PromptOutcome:
        return await self._retrying(lambda: self.prompt_model.prompts.remote(job), deadline)

    async def _solve(self, question: str, sampling_override: Any = None) -> tuple[PromptOutcome, AnswerOutcome]:
        deadline = self._deadline()
        p = await self._prompt(PromptJob(question), deadline)
        sampling = p.target_sampling if sampling_override is None else sampling_override(p.target_sampling)
        job = AnswerJob(p.target_messages, sampling)
        a = await self._retrying(lambda: self.target_model.answer.remote(job), deadline)  # type: ignore[union-attr]
        return p, a

    # --- checks
    def _check_question(self, question: str, param: str = "question") -> None:
        if len(question) > self.settings.max_question_chars:
            limit = self.settings.max_question_chars
            raise InputError(422, "question_too_long", f"question has {len(question)} characters; the limit is "
                             f"{limit}", param=param)

    def _check_api_key(self, request: Request) -> None:
        digest = self.settings.api_key_sha256
        if digest and not token_matches(bearer_token(request.headers), digest) and not self._is_admin(request):
            raise InputError(401, "invalid_api_key", "a valid API key is required (Authorization: Bearer <key>)",
                             headers={"WWW-Authenticate": "Bearer"})

    def _is_admin(self, request: Request) -> bool:
        return self.settings.enable_admin and token_matches(bearer_token(request.headers),
                                                            self.settings.admin_token_sha256)

    def _extract(self, text: str) -> str | None:
        """The final answer in ``text`` as the run's task grader reads it (numbers, LaTeX, a choice letter, ...)."""
        from trprompt.data import DATASET_GRADERS
        from trprompt.grading import extract_answer, make_grader

        cfg = self.spec.config
        spec = cfg.task.grader or DATASET_GRADERS.get(cfg.dataset.name, "numeric")
        try:
            return make_grader(spec).extract(text)
        except Exception:  # a user metric that cannot be imported here: the numeric reading
            return extract_answer(text)

    def _warning(self, dataset: str | None) -> str | None:
        trained = self.spec.config.dataset.name
        if dataset is not None and dataset != trained:
            return f"this prompt model was trained on {trained}, not {dataset}"
        return None

    # --- the TRPrompt routes
    @app.post("/v1/prompt", response_model=PromptResponse, responses=_ERRORS)
    async def prompt(self, body: PromptRequest, request: Request) -> Any:
        """Query-aware instruction(s) Π(question, t*) from the served run."""
        self._check_api_key(request)
        self._check_question(body.question)
        try:
            out = await self._prompt(PromptJob(body.question, body.n, body.temperature), self._deadline())
        except Exception as e:
            return map_exception(e)
        return PromptResponse(
            prompts=out.prompts, prompt=out.prompts[0], run_id=out.run_id, adapter_version=out.adapter_version,
            optimal_reward_version=out.reward_version, epoch=out.epoch, dataset=body.dataset,
            warning=self._warning(body.dataset),
            tokens=TokenCounts(prompt=out.prompt_tokens, completion=out.completion_tokens),
        )

    @app.post("/v1/solve", response_model=SolveResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}})
    async def solve(self, body: SolveRequest, request: Request) -> Any:
        """Instruction from Π, answer from the target model, and the final answer the run's grader extracts."""
        self._check_api_key(request)
        self._check_question(body.question)
        if self.target_model is None:
            return error_json(404, "no_target", "this deployment has no target model (started with --no-target)")
        try:
            p, a = await self._solve(body.question)
        except Exception as e:
            return map_exception(e)
        by_role = {"prompt_model": TokenCounts(prompt=p.prompt_tokens, completion=p.completion_tokens),
                   "target_model": TokenCounts(prompt=a.prompt_tokens, completion=a.completion_tokens)}
        return SolveResponse(
            prompt=p.prompts[0], answer=a.text, extracted=self._extract(a.text), run_id=p.run_id,
            adapter_version=p.adapter_version, optimal_reward_version=p.reward_version,
            tokens=TokenCounts(prompt=p.prompt_tokens + a.prompt_tokens,
                               completion=p.completion_tokens + a.completion_tokens),
            tokens_by_role=by_role,
        )

    # --- the OpenAI-compatible routes
    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        """OpenAI's model list: the one served model (use its id, or any name, as ``model``)."""
        self._check_api_key(request)
        return {"object": "list", "data": [openai_compat.model_card(self.model_id, self.started)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: openai_compat.ChatCompletionRequest, request: Request) -> Any:
        """OpenAI chat completion: Π writes an instruction for the last user message; the target answers."""
        self._check_api_key(request)
        try:
            question = body.question()
        except ValueError as e:
            raise InputError(400, "invalid_messages", str(e), param="messages") from e
        self._check_question(question, param="messages")
        if self.target_model is None:
            raise InputError(404, "no_target", "this deployment has no target model (started with --no-target)")
        try:
            p, a = await self._solve(question, body.target_sampling)
        except Exception as e:
            return map_exception(e, openai=True)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(openai_compat.stream(self.model_id, p, a, include),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return openai_compat.completion(self.model_id, p, a)

    # --- health and info
    @app.get("/healthz")
    async def healthz(self) -> Any:
        """200 when a prompt-model replica answers within 5 s and can serve the published version, else 503."""
        try:
            r = await asyncio.wait_for(_as_awaitable(self.prompt_model.ping.remote()), timeout=5.0)
        except Exception as e:
            return error_json(503, "unhealthy", f"prompt model not answering ({type(e).__name__})",
                              headers={"Retry-After": "1"})
        if not r.get("ready", True):
            return error_json(503, "not_ready", f"prompt model cannot serve: {r.get('reason')}",
                              headers={"Retry-After": "1"})
        return {"status": "ok", "prompt_model": r}

    @app.get("/v1/info")
    async def info(self, request: Request) -> Any:
        """Run id, models, t* version, validation accuracy, batching settings and engine counters.

        Paths and the full t* are shown only with the admin token.
        """
        self._check_api_key(request)
        admin = self._is_admin(request)
        try:
            p = await self._call(self.prompt_model.info.remote())
            t = None
            if self.target_model is not None and not self.shared:
                t = await self._call(self.target_model.info.remote())
        except Exception as e:
            return map_exception(e)
        version = dict(p["version"] or {})
        if not admin:
            for key in REDACTED_INFO_KEYS:
                version.pop(key, None)
            reward = version.pop("optimal_reward", None)
            version["optimal_reward"] = None
            version["optimal_reward_chars"] = len(reward) if isinstance(reward, str) else None
        models = self.spec.config.models
        s = self.settings
        return {
            **version,
            "redacted": not admin,
            "model_id": self.model_id,
            "epoch": p["epoch"],
            "adapter_id": p["adapter_id"],
            "loaded_adapters": p["loaded_adapters"],
            "models": {
                "prompt_model": {"model": models.prompt_model.model if admin else None,
                                 "engine": models.prompt_model.engine},
                "target_model": ({"model": models.target_model.model if admin else None,
                                  "engine": models.target_model.engine,
                                  "shared_with_prompt_model": self.shared} if self.target_model is not None
                                 else None),
            },
            "batching": {"enabled": s.batching, "max_batch_size": s.max_batch_size,
                         "batch_wait_timeout_s": s.batch_wait_timeout_s},
            "limits": {"max_question_chars": s.max_question_chars, "max_body_bytes": s.max_body_bytes,
                       "request_timeout_s": s.request_timeout_s, "rate_limit_per_s": s.rate_limit_per_s,
                       "rate_limit_burst": s.rate_limit_burst, "max_pending_requests": s.max_pending_requests},
            "replicas": {"prompt_model": p["replica"], "target_model": t["replica"] if t else None},
            "stats": {"prompt_model": p["stats"]["prompt"],
                      "target_model": t["stats"] if t else (p["stats"]["target"] if self.shared else None)},
        }

    # --- admin
    async def _new_spec(self, body: ReloadRequest) -> RunSpec:
        """The version a reload asks for, read and checked in full (paths only under the allowed roots)."""
        s = self.settings
        if body.optimal_reward is not None and not s.allow_reward_text:
            raise InputError(403, "reward_text_disabled", "setting a free-text optimal_reward is disabled "
                             "(start the server with allow_reward_text / --allow-reward-text)")
        try:
            if body.run_dir is not None:
                path, _ = resolve_under_roots(body.run_dir, self.roots, "run_dir")
                spec = await asyncio.to_thread(RunSpec.from_run_dir, path)
            else:
                adapter = None
                if body.adapter_path is not None:
                    adapter, _ = resolve_under_roots(body.adapter_path, self.roots, "adapter_path")
                current: RunSpec = await self._call(self.prompt_model.current_spec.remote())
                spec = await asyncio.to_thread(current.with_overrides, str(adapter) if adapter else None,
                                               body.optimal_reward)
            if spec.adapter_path is not None:  # best.json may point anywhere: the adapter must be inside too
                resolve_under_roots(spec.adapter_path, self.roots, "the run's adapter")
            check_servable(spec, s.max_reward_chars)
        except PathNotAllowed as e:
            raise InputError(403, "path_not_allowed", str(e)) from e
        except RunDirError as e:
            raise InputError(422, "invalid_run", hide_paths(str(e), self.roots)) from e
        except OSError as e:
            raise InputError(422, "invalid_run", f"unreadable ({type(e).__name__})") from e
        old, new = self.spec.config.models.prompt_model, spec.config.models.prompt_model
        if (old.model, old.engine) != (new.model, new.engine):
            raise InputError(409, "base_model_mismatch", "the new run uses another prompt base model or engine "
                             f"({new.engine}) than the served one ({old.engine}); redeploy instead")
        return spec

    @app.post("/v1/admin/reload", responses={**_ERRORS, 403: {"model": ErrorResponse},
                                             404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def reload(self, body: ReloadRequest, request: Request) -> Any:
        """Hot-swap the adapter and t* after checking the new version in full; on any failure the old one stays."""
        if not self.settings.enable_admin:
            return error_json(404, "not_found", "admin routes are disabled")
        if not self._is_admin(request):
            return error_json(401, "unauthorized", "admin token required (Authorization: Bearer <token>)",
                              headers={"WWW-Authenticate": "Bearer"})
        if body.run_dir is None and body.adapter_path is None and body.optimal_reward is None:
            return error_json(422, "invalid_request", "give run_dir, or adapter_path and/or optimal_reward")
        if body.run_dir is not None and (body.adapter_path is not None or body.optimal_reward is not None):
            return error_json(422, "invalid_request", "give either run_dir or adapter_path/optimal_reward, not both")
        async with self._reload_lock:
            try:
                spec = await self._new_spec(body)
                result = await self._call(self.prompt_model.reload.remote(spec))
            except RayTaskError as e:  # the adapter did not load or the trial failed: the old version keeps serving
                cause = e.cause if getattr(e, "cause", None) is not None else e
                msg = hide_paths(f"{type(cause).__name__}: {safe_text(cause, 500)}", self.roots)
                return error_json(422, "reload_failed", msg)
            except Exception as e:
                err = exception_error(e)
                return error_json(err.status, err.code, hide_paths(err.message, self.roots), headers=err.headers)
        return {"status": "ok", **result}
