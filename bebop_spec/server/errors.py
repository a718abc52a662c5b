"""One error type for the HTTP layer and the handlers that render it as an OpenAI error body.

Every client mistake becomes a 4xx with `{"error": {"message", "type", "param", "code"}}`;
only a genuine server fault is a 500 (logged with its traceback).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bebop_spec.engine.async_engine import EngineStepError
from bebop_spec.errors import EngineOverloaded, InvalidRequest

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """A reply other than 200, raised anywhere below the routes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: int | str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else status
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra: dict | None = None) -> JSONResponse:
        return JSONResponse({**(extra or {}), **self.body()}, self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def status_of(exc: BaseException) -> int:
    """The HTTP status a failed request is answered (and counted in /metrics) with."""
    return exc.status if isinstance(exc, ApiError) else 500


@contextlib.contextmanager
def engine_refusals(retry_after_s: int) -> Iterator[None]:
    """The engine's refusals as replies: overloaded -> 503 with Retry-After, a request it
    cannot run -> 400. Every serving class starts its engine streams inside this."""
    try:
        yield
    except EngineOverloaded as exc:
        raise ApiError(503, str(exc) or "server overloaded",
                       headers={"Retry-After": str(retry_after_s)}) from exc  # fmt: skip
    except InvalidRequest as exc:
        raise bad_request(str(exc)) from exc


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {first.get('msg', '')}").response()
    parts = [f"{_loc(e) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    err = ApiError(400, "; ".join(parts), param=_loc(first) or None)
    if request.url.path.startswith("/v1/"):
        return err.response()
    # SGLang-native routes: also SGLang's own {"success": false, "message"} fields
    return err.response({"success": False, "message": err.message})


def install_error_handlers(app: FastAPI, on_invalid: Callable[[str], None] | None = None) -> None:
    """`on_invalid(path)` is told of each request whose body failed validation (the metrics
    count those on generation routes as input_processing failures)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if on_invalid is not None:
            on_invalid(request.url.path)
        return _validation_error(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return ApiError(400, f"malformed JSON body: {exc}").response()

    @app.exception_handler(EngineStepError)
    async def _step_failed(request: Request, exc: EngineStepError) -> JSONResponse:
        # A handled 500; other faults are answered by server.middleware.FaultMiddleware.
        return ApiError(500, str(exc), code="engine_step_failed").response()
