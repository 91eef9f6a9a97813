"""Every failure as a JSON body: input errors, validation errors, and exceptions from the deployments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from cluster.serve.run_spec import RunDirError


class InputError(Exception):
    """A request refused with a 4xx/5xx status, a machine-readable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers, param


OPENAI_ROUTES = ("/v1/chat/completions", "/v1/models")
"""Routes whose errors use OpenAI's body shape."""

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
                 413: "invalid_request_error", 421: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    """Whether ``path`` (route prefix included) is one of the OpenAI-compatible routes."""
    path = path.rstrip("/")
    return any(path.endswith(r) or path.startswith(r + "/") or f"{r}/" in path for r in OPENAI_ROUTES)


def error_json(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None, openai: bool = False, param: str | None = None) -> JSONResponse:
    """A JSON error response: ``{"error", "message", "details"?}``, or OpenAI's ``{"error": {...}}`` shape."""
    text = safe_text(message, 2000)
    body: dict[str, Any]
    if openai:
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        if details and param is None:
            loc = details[0].get("loc") or []
            param = ".".join(str(x) for x in loc[1:]) or None if loc and loc[0] == "body" else None
            text = f"{text}: {'; '.join(str(d.get('msg')) for d in details[:5])}"
        body = {"error": {"message": text, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": code, "message": text}
        if details is not None:
            body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def safe_text(value: Any, limit: int = 200) -> str:
    """``value`` as a short string that is always encodable as UTF-8."""
    s = str(value)
    if len(s) > limit:
        s = s[:limit] + "..."
    return s.encode("utf-8", "replace").decode("utf-8")


def clean_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without the offending input (which may be huge or unencodable)."""
    out = []
    for e in list(errors)[:20]:
        if not isinstance(e, dict):
            out.append({"msg": safe_text(e)})
            continue
        loc = [x if isinstance(x, int) and not isinstance(x, bool) else safe_text(x, 80) for x in e.get("loc", ())]
        out.append({"loc": loc, "msg": safe_text(e.get("msg", ""), 300), "type": safe_text(e.get("type", ""), 60)})
    return out


def is_replica_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica serving a request died or went away (the request may be retried)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(exc, (RayActorError, ActorUnavailableError, DeploymentUnavailableError))


def exception_error(exc: BaseException) -> InputError:
    """The status, code and message for a failure while serving a valid request."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError, RequestCancelledError

    retry = {"Retry-After": "1"}
    if isinstance(exc, InputError):
        return exc
    if isinstance(exc, RunDirError):
        return InputError(422, "invalid_run", str(exc))
    if isinstance(exc, BackPressureError):
        return InputError(503, "overloaded", "too many requests queued; retry later", retry)
    if isinstance(exc, TimeoutError):
        return InputError(504, "timeout", "the model did not answer in time; retry later", retry)
    if is_replica_failure(exc) or isinstance(exc, RequestCancelledError):
        return InputError(503, "replica_unavailable", f"a model replica is unavailable ({type(exc).__name__}); "
                          "retry shortly", retry)
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return InputError(500, "engine_error", f"{type(cause).__name__}: {safe_text(cause, 500)}")
    return InputError(500, "internal_error", f"{type(exc).__name__}: {safe_text(exc, 500)}")


def map_exception(exc: BaseException, openai: bool = False) -> JSONResponse:
    """The JSON response for a failure while serving a valid request."""
    e = exception_error(exc)
    return error_json(e.status, e.code, e.message, headers=e.headers, openai=openai, param=e.param)
