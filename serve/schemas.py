"""What a request may hold, and how the ingress refuses what it may not: the pydantic request and
response models of the HTTP API, the checks that turn a request's inputs into float32 rows
(`batch`) and a user id into a personalized model's id (`personal_id`), and the one-line refusals.
Hostile input never gets a 5xx: every rejected request gets a 4xx whose JSON `detail` is one line
naming the field and what was expected (schema errors included, `one_line`); request bodies over
MAX_BODY_BYTES get a 413 before they are read (`BodyLimit`); numbers must be finite float32 values
and the answer finite (a JSON body cannot carry NaN). `guard` installs the refusals on the FastAPI
app (serve/ensemble.py).
"""

import re
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BATCH = 1024  # inputs per request
# The largest request body accepted, in bytes: a full batch of MAX_BATCH inputs of the 8 x 8 default
# written at full float64 precision (~21 bytes a number with its separator) takes 1.4 MiB, of 28 x 28
# images with 4 decimals 6.4 MiB; bigger inputs come in smaller batches. The bound matters: parsed,
# a body takes up to ~10 times its size in Python objects.
MAX_BODY_BYTES = 8 * 1024 * 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------- schemas
class _Request(BaseModel):
    """What every request body shares. strict: "1.5" or true is not a number, 1.5 not a label.
    allow_inf_nan=False: NaN and Infinity (which Python's JSON parser accepts) are refused with their
    position. Lists stop at their first bad item (fail_fast): pydantic would otherwise report every
    item, and a body of a million bad numbers would take seconds and gigabytes to refuse."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: object) -> object:
        # one error for any number of unknown fields (extra="forbid" reports each one)
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown field '{_printable(unknown[0])}'; the fields are {sorted(cls.model_fields)}"
                )
        return data


# the models compute in float32: a larger number would become inf there
Number = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Row = Annotated[list[Number], Field(fail_fast=True)]


class PredictRequest(_Request):
    # the limits on each branch (on the union they would bound a flat input to MAX_BATCH numbers, and
    # the OpenAPI schema would not show them)
    inputs: (
        Annotated[list[Row], Field(min_length=1, max_length=MAX_BATCH, fail_fast=True)]
        | Annotated[list[Number], Field(min_length=1, fail_fast=True)]
    ) = Field(
        description="one input (a flat list) or a batch of inputs, each flattened to the model's input size"
    )
    user_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description='selects a personalized model in canonical decimal form ("42"), '
        "and an A/B arm; an id without a model gets the ensemble",
    )


class MemberWeight(BaseModel):
    name: str
    weight: float


class PredictResponse(BaseModel):
    request_id: str
    predictions: list[int]
    probabilities: list[list[float]]
    members: list[MemberWeight]
    answered_by: str = Field(description="ensemble | candidate | personal")


class FeedbackRequest(_Request):
    request_id: str = Field(min_length=1, max_length=64)
    labels: list[int] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        fail_fast=True,
        description="the true label of each input of the request, in order",
    )


class PromoteRequest(_Request):
    name: str = Field(min_length=1, max_length=64, description="the candidate under trial")


# ---------------------------------------------------------------- hostile input
def _printable(value: object, limit: int = 100) -> str:
    """Safe in a one-line JSON answer: a key sent by the client may hold a lone surrogate (legal in
    JSON, not encodable as UTF-8: the response would fail) or a newline."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _where(loc: tuple | list) -> str:
    """pydantic's error location as `inputs[3][0]`. The request models are flat, so a string after
    the field name is pydantic's tag of a union branch (e.g. "list[float]"): left out."""
    parts = list(loc)
    parts = parts[1:] if parts[:1] == ["body"] else parts
    text = "".join(
        f"[{p}]" if isinstance(p, int) else _printable(p) if i == 0 else "" for i, p in enumerate(parts)
    )
    return text or "body"


def _meant(errors: list[dict], body: object) -> list[dict]:
    """pydantic reports `inputs` (one input or a batch: a union) once per branch; keep the branch the
    client meant: a batch when the first input is a list."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return errors
    batch_meant = isinstance(inputs[0], list)
    return [e for e in errors if _branch(e.get("loc", ())) in (None, batch_meant)] or errors


def _branch(loc: tuple | list) -> bool | None:
    """Whether an error is in the batch branch of `inputs` (tagged "list[list[...]]"), None if in no branch."""
    tag = next((p for p in loc if isinstance(p, str) and p.startswith("list[")), None)
    return None if tag is None else tag.startswith("list[list[")


_BOUNDS = {"le": "<=", "ge": ">=", "lt": "<", "gt": ">"}


def one_line(errors: list[dict], body: object = None) -> str:
    """One line for a request the schema refused (`body`: as parsed): which field (and position) and
    what was expected. Of several errors the deepest is the most specific."""
    errors = _meant(errors, body)
    if not errors:
        return "body: invalid request"
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    if error.get("type") == "json_invalid":
        return f"body: invalid JSON ({_printable(error.get('ctx', {}).get('error', 'cannot parse'))})"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")  # pydantic's prefix
    bound = {k: v for k, v in error.get("ctx", {}).items() if k in _BOUNDS and isinstance(v, (int, float))}
    if bound:  # pydantic writes float bounds in full: 340282346638528860000000000000000000000
        ((key, value),) = bound.items()
        message = f"Input should be {_BOUNDS[key]} {value:.7g}"
    return f"{_where(error.get('loc', ()))}: {_printable(message, 300)}"


def _count_refusal(scope: dict) -> None:
    """Count a /predict refused before the endpoint ran (schema error, undecodable or too large body)
    among the errors. Kept on the app, not in a global: Serve's ingress holds a pickled copy of `api`
    (with copies of whatever its handlers reference); the /metrics endpoint reads it back there."""
    app = scope.get("app")
    if app is not None and scope.get("path", "").endswith("/predict"):
        app.state.refused_predictions = getattr(app.state, "refused_predictions", 0) + 1


async def _refused(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default answer echoes every input (a whole batch) and can hold unencodable strings
    _count_refusal(request.scope)
    return JSONResponse({"detail": one_line(exc.errors(), exc.body)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's 400 for a body it could not decode (not UTF-8, nested too deeply) says only "There was
    # an error parsing the body": name what was expected. Our own refusals are raised `from None`.
    if exc.status_code != 400 or exc.__cause__ is None:
        return await http_exception_handler(request, exc)
    _count_refusal(request.scope)
    return JSONResponse(
        {"detail": f"body: expected a JSON object in UTF-8 ({type(exc.__cause__).__name__})"}, status_code=400
    )


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP server refuses a malformed one
    return None


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 with a JSON `detail`, and is never
    parsed. A declared Content-Length is checked before anything is read; a body streamed without one
    (chunked) is read only up to the limit. The app gets the body once it is known to fit (FastAPI
    reads a whole body before validating it anyway)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope.get("headers", []))
        messages = None if declared is not None and declared > self.limit else await self._read(receive)
        if messages is None:
            return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(messages, receive), send)

    async def _read(self, receive) -> list[dict] | None:
        """The body's messages, or None once they pass the limit (the rest is never read)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left: the app learns it as usual
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, scope, receive, send) -> None:
        _count_refusal(scope)
        detail = f"request body: larger than the limit of {self.limit} bytes ({self.limit / 2**20:g} MiB)"
        # close: the unread rest of the body must not be taken for the next request on this connection
        response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(messages: list[dict], receive):
    """A `receive` that hands out the messages already read, then reads on (a disconnect, later)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def guard(app: FastAPI) -> None:
    """Install the refusals on `app`: one-line answers to requests the schema refused or FastAPI
    could not decode, and the limit on the request body."""
    app.add_exception_handler(RequestValidationError, _refused)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)


def batch(inputs: list, size: int) -> np.ndarray:
    """`inputs` (one flat input or a list of them, as the schema allows) as float32 rows of `size`
    numbers; anything else is a ValueError with one line naming the field and what was expected."""
    rows = inputs if inputs and isinstance(inputs[0], list) else [inputs]
    widths = sorted({len(r) for r in rows})
    if widths != [size]:  # checked before numpy sees ragged rows (it would refuse them with a 500)
        got = f"rows of {widths} numbers" if len(widths) > 1 else str(widths[0])
        raise ValueError(
            f"inputs: each input must have {size} numbers (the flattened model input), got {got}"
        )
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("inputs: numbers must be finite (no NaN or Infinity)")
    if np.abs(x).max() > FLOAT32_MAX:  # would become inf in float32
        raise ValueError(
            f"inputs: numbers must be within +-{FLOAT32_MAX:.4g} (the models compute in float32)"
        )
    return x.astype(np.float32)


_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII only: \d would take any script's digits


def personal_id(user_id: str | None) -> str | None:
    """The id of the user's personalized model, or None. Only the canonical ASCII decimal spelling
    selects one ("0", "42"; not "042", "+42", " 42", "٤٢" or "²", which `str.isdigit` or `int`
    accept), so that no other spelling reaches a model, least of all another user's. Any other id
    is an ordinary id: it still picks an A/B arm, and the ensemble answers it as it answers a user
    without a model (no error: ids are opaque to clients)."""
    return user_id if user_id is not None and _DECIMAL.fullmatch(user_id) else None


def finite_answer(probs: np.ndarray) -> np.ndarray:
    """Finite inputs can still overflow a model (e.g. 1e38 times a weight): that is the inputs'
    fault, and a NaN could not be written as JSON."""
    if not np.isfinite(probs).all():
        raise HTTPException(
            422, "inputs: the model's output is not finite for these inputs (values too large)"
        )
    return probs


def replica_reason(e: Exception) -> str:
    """What the router said, one line: Ray wraps the exception a replica raised (`cause`)."""
    cause = getattr(e, "cause", None) or e
    return _printable(cause.args[0] if cause.args else type(cause).__name__, 500)
