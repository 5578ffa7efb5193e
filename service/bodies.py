"""Request bodies: a JSON body, or a multipart form where the endpoint takes one, validated into a request model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ApiError, validation_message
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)

# Bodies past this size are parsed and validated in a worker thread rather than on the event loop.
PARSE_INLINE_MAX = 64 * 1024


async def parse_body(request: Request, model: type[M], settings: Settings, *, multipart: bool) -> M:
    """Validate a JSON body (or, where allowed, a multipart form) into `model`; ApiError 415/422 otherwise."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    context: dict[str, Any] = {"max_text_chars": settings.max_text_chars}
    if content_type == "multipart/form-data" and multipart:
        data = await _read_form(request, settings, context)
        return _validate(lambda: model.model_validate(data, strict=False, context=context))
    if content_type != "application/json" and not content_type.endswith("+json"):
        accepted = "application/json or multipart/form-data" if multipart else "application/json"
        raise ApiError(415, "unsupported_media_type", f"the body is {content_type}; send {accepted}")
    body = await request.body()
    if not body:
        raise ApiError(422, "invalid_json", "the request body is empty; send a JSON object")

    def parse() -> M:
        return model.model_validate_json(body, context=context)

    if len(body) > PARSE_INLINE_MAX:
        return await run_in_threadpool(_validate, parse)
    return _validate(parse)


def _validate(parse: Callable[[], M]) -> M:
    """Run a pydantic parse; its errors become one 422 (json_invalid ones say so in the code)."""
    try:
        return parse()
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        code = "invalid_json" if any(err["type"] == "json_invalid" for err in errors) else "invalid_request"
        raise ApiError(422, code, validation_message(errors)) from None


async def _read_form(request: Request, settings: Settings, context: dict[str, Any]) -> dict[str, Any]:
    """A multipart form -> plain fields; the 'image' file part goes to the validation context."""
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=settings.max_body_bytes)
    except StarletteHTTPException as e:  # malformed multipart
        raise ApiError(422, "invalid_form", f"the multipart body cannot be parsed: {e.detail}") from None
    data: dict[str, Any] = {}
    for key in form:
        values = form.getlist(key)
        if len(values) != 1:
            raise ApiError(422, "invalid_form", f"the form field {key!r} is given {len(values)} times")
        value = values[0]
        if isinstance(value, UploadFile):
            if key != "image":
                raise ApiError(422, "invalid_form", f"only the 'image' field may be a file, not {key!r}")
            context["upload"] = await value.read()
        else:
            data[key] = value
    await form.close()
    return data
