"""Every failure as a JSON body: input errors, validation errors, and exceptions from the deployments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from cluster.serve.run_spec import RunDirError


class InputError(Exception):
    """Bad input found after schema validation (e.g. a question over the length limit)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_json(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response (``{"error", "message", "details"?}``)."""
    body: dict[str, Any] = {"error": code, "message": safe_text(message, 2000)}
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


def map_exception(exc: BaseException) -> JSONResponse:
    """The JSON response for a failure while serving a valid request."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, InputError):
        return error_json(exc.status, exc.code, exc.message)
    if isinstance(exc, RunDirError):
        return error_json(422, "invalid_run", str(exc))
    if isinstance(exc, BackPressureError):
        return error_json(503, "overloaded", "too many requests queued; retry later", headers={"Retry-After": "1"})
    if isinstance(exc, TimeoutError):
        return error_json(504, "timeout", "the model did not answer in time; retry later",
                          headers={"Retry-After": "1"})
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, RequestCancelledError)):
        return error_json(503, "replica_unavailable", f"a model replica is unavailable ({type(exc).__name__}); "
                          "retry shortly", headers={"Retry-After": "1"})
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return error_json(500, "engine_error", f"{type(cause).__name__}: {safe_text(cause, 500)}")
    return error_json(500, "internal_error", f"{type(exc).__name__}: {safe_text(exc, 500)}")
