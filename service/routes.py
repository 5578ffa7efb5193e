"""The HTTP endpoints: request parsing (JSON or multipart), auth, readiness, and response shaping."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import Engine
from service.metrics import Metrics
from service.schemas import (
    EXAMPLE_SHA,
    IMAGE_ID_MAX,
    TOP_K_MAX,
    Answer,
    EntailmentRequest,
    EntailmentResponse,
    ErrorResponse,
    HealthResponse,
    ImageStatus,
    ImageUploadRequest,
    ImageUploadResponse,
    ModelInfo,
    ReadyResponse,
    ReasoningRequest,
    ReasoningResponse,
    VQARequest,
    VQAResponse,
)
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)

# Bodies past this size are parsed and validated in a worker thread rather than on the event loop.
PARSE_INLINE_MAX = 64 * 1024
TEXT_FIELDS = {"VQARequest": "question", "EntailmentRequest": "hypothesis", "ReasoningRequest": "statement"}
TRUE_LABELS = ("true", "yes", "1")


class ApiError(Exception):
    """An error answered as JSON {"code", "message"} with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def validation_message(errors: list[Any], limit: int = 5) -> str:
    """Pydantic / FastAPI errors -> one readable line, without echoing the input (it may be megabytes)."""
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


# --- dependencies ------------------------------------------------------------------------------------------
# All async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per dependency per request.


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (when keys are configured).")
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token (when keys are configured).")


async def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """With DIDE_API_KEYS set, a request needs one of them (X-API-Key or Authorization: Bearer)."""
    if not settings.api_keys:
        return
    given = api_key if api_key is not None else bearer.credentials if bearer is not None else None
    if given is None:
        raise ApiError(401, "unauthorized", "this service needs an API key: send X-API-Key or Authorization: Bearer")
    given_b = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in settings.api_keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given_b, key.get_secret_value().encode("utf-8"))
    if not ok:
        raise ApiError(401, "unauthorized", "the API key is not valid")


async def require_ready(request: Request, engine: EngineDep) -> None:
    if not engine.ready:
        raise ApiError(
            503,
            "not_ready",
            "the service is loading or warming its models; retry shortly",
            {"Retry-After": str(request.app.state.settings.retry_after_s)},
        )


# --- request bodies ----------------------------------------------------------------------------------------


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


# --- response shaping -------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _true_index(labels: list[str]) -> int:
    for i, label in enumerate(labels):
        if label.strip().lower() in TRUE_LABELS:
            return i
    return len(labels) - 1


# --- OpenAPI ----------------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API keys are configured and none (or a wrong one) was given."},
    404: {"model": ErrorResponse, "description": "Unknown image id, or no model loaded for this task."},
    413: {"model": ErrorResponse, "description": "The body is over DIDE_MAX_BODY_BYTES."},
    415: {"model": ErrorResponse, "description": "The body is not JSON (or multipart where accepted)."},
    422: {"model": ErrorResponse, "description": "Malformed JSON, a missing/extra/mistyped field, bad text or image."},
    503: {
        "model": ErrorResponse,
        "description": "Not ready, overloaded (queue full) or past the request deadline; retry later.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
}

_FORM_IMAGE = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}


def _form_schema(title: str, text_field: str | None = None) -> dict[str, Any]:
    """The multipart form: an 'image' file part (or an image_id field), the text, and top_k for VQA;
    for /images (no text field) the image file and an optional name."""
    if text_field is None:
        props: dict[str, Any] = {
            "image": _FORM_IMAGE,
            "name": {"type": "string", "minLength": 1, "maxLength": IMAGE_ID_MAX},
        }
        return {
            "title": title,
            "type": "object",
            "properties": props,
            "required": ["image"],
            "additionalProperties": False,
        }
    props = {
        "image": _FORM_IMAGE,
        "image_id": {"type": "string", "minLength": 1, "maxLength": IMAGE_ID_MAX},
        text_field: {"type": "string", "minLength": 1, "pattern": r"\S"},
    }
    if text_field == "question":
        props["top_k"] = {"type": "integer", "minimum": 1, "maximum": TOP_K_MAX, "default": 5}
    return {
        "title": title,
        "type": "object",
        "properties": props,
        "required": [text_field],
        "oneOf": [{"required": ["image"]}, {"required": ["image_id"]}],
        "additionalProperties": False,
    }


def _body(model: type[BaseModel], form: dict[str, Any] | None = None) -> dict[str, Any]:
    examples = model.model_json_schema().get("examples", [])
    content: dict[str, Any] = {
        "application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
            "examples": {f"example{i + 1}": {"value": ex} for i, ex in enumerate(examples)},
        }
    }
    if form is not None:
        content["multipart/form-data"] = {"schema": form, "encoding": {"image": {"contentType": "image/*"}}}
    return {"requestBody": {"required": True, "content": content}}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Add the request models (parsed by hand, so FastAPI does not see them) and this deployment's limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            models: list[tuple[type[BaseModel], Literal["validation"]]] = [
                (m, "validation") for m in (VQARequest, EntailmentRequest, ReasoningRequest, ImageUploadRequest)
            ]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            for name, field in TEXT_FIELDS.items():
                components[name]["properties"][field]["maxLength"] = settings.max_text_chars
            for op in schema["paths"].values():
                for method in op.values():
                    form = method.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                    if form is not None:
                        for field in TEXT_FIELDS.values():
                            if field in form["schema"]["properties"]:
                                form["schema"]["properties"][field]["maxLength"] = settings.max_text_chars
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- endpoints --------------------------------------------------------------------------------------------

router = APIRouter()
guarded = [Depends(require_api_key), Depends(require_ready)]


@router.post(
    "/vqa",
    response_model=VQAResponse,
    responses=ERRORS,
    dependencies=guarded,
    openapi_extra=_body(VQARequest, _form_schema("VQAForm", "question")),
    summary="Answer a question about an image",
)
async def vqa(request: Request, engine: EngineDep, settings: SettingsDep):
    model = engine.model("vqa")
    req = await parse_body(request, VQARequest, settings, multipart=True)
    logits, (image,) = await engine.predict("vqa", req.question, [req.ref()])
    probs = _sigmoid(logits)
    top = np.argsort(-logits, kind="stable")[: min(req.top_k, len(logits))]
    labels = model.bundle.labels
    return VQAResponse(
        answers=[Answer(answer=labels[i], score=float(probs[i])) for i in top],
        image_id=image.sha256,
        cached=image.cached,
        model_id=model.space.model_id,
    )


@router.post(
    "/entailment",
    response_model=EntailmentResponse,
    responses=ERRORS,
    dependencies=guarded,
    openapi_extra=_body(EntailmentRequest, _form_schema("EntailmentForm", "hypothesis")),
    summary="Does the image entail, contradict or leave open the hypothesis?",
)
async def entailment(request: Request, engine: EngineDep, settings: SettingsDep):
    model = engine.model("entailment")
    req = await parse_body(request, EntailmentRequest, settings, multipart=True)
    logits, (image,) = await engine.predict("entailment", req.hypothesis, [req.ref()])
    probs = _softmax(logits)
    labels = model.bundle.labels
    return EntailmentResponse(
        label=labels[int(np.argmax(logits))],
        scores={label: float(p) for label, p in zip(labels, probs, strict=True)},
        image_id=image.sha256,
        cached=image.cached,
        model_id=model.space.model_id,
    )


@router.post(
    "/reasoning",
    response_model=ReasoningResponse,
    responses=ERRORS,
    dependencies=guarded,
    openapi_extra=_body(ReasoningRequest),
    summary="Is the statement true of the pair of images?",
)
async def reasoning(request: Request, engine: EngineDep, settings: SettingsDep):
    model = engine.model("reasoning")
    req = await parse_body(request, ReasoningRequest, settings, multipart=False)
    refs = [ref.ref() for ref in req.images]
    logits, images = await engine.predict("reasoning", req.statement, refs)
    if len(logits) == 1:
        p_true = float(_sigmoid(logits)[0])
        label = p_true >= 0.5
    else:
        i_true = _true_index(model.bundle.labels)
        p_true = float(_softmax(logits)[i_true])
        label = int(np.argmax(logits)) == i_true
    return ReasoningResponse(
        label=label,
        score=p_true,
        image_ids=[im.sha256 for im in images],
        cached=[im.cached for im in images],
        model_id=model.space.model_id,
    )


@router.post(
    "/images",
    response_model=ImageUploadResponse,
    responses=ERRORS | {409: {"model": ErrorResponse, "description": "The name already names another image."}},
    dependencies=guarded,
    openapi_extra=_body(ImageUploadRequest, _form_schema("ImageUploadForm", None)),
    summary="Upload an image: encode it once for every model and keep it in the store",
)
async def upload_image(request: Request, engine: EngineDep, settings: SettingsDep):
    req = await parse_body(request, ImageUploadRequest, settings, multipart=True)
    sha, cached, model_ids = await engine.upload(req.image_bytes(), req.name)
    return ImageUploadResponse(image_id=sha, cached=cached, model_ids=model_ids)


@router.get(
    "/images/{image_id}",
    response_model=ImageStatus,
    responses=ERRORS,
    dependencies=guarded,
    summary="Say whether (and for which models) an image is cached",
)
async def image_status(
    image_id: Annotated[str, Path(min_length=1, max_length=IMAGE_ID_MAX, examples=[EXAMPLE_SHA])],
    engine: EngineDep,
):
    sha, model_ids, tasks = await engine.status(image_id)
    return ImageStatus(image_id=sha, cached=bool(model_ids), model_ids=model_ids, tasks=tasks)


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz():
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: ERRORS[503]},
    summary="Readiness: every model loaded and warm (says which execution provider is active)",
)
async def readyz(engine: EngineDep):
    if not engine.ready:
        retry = {"Retry-After": str(engine.settings.retry_after_s)}
        return error_response(503, "not_ready", "the service is loading or warming its models", retry)
    return ReadyResponse(
        status="ready",
        provider=engine.provider,
        models={
            task: ModelInfo(
                model_id=m.space.model_id, provider=m.bundle.provider, labels=len(m.bundle.labels), dim=m.bundle.dim
            )
            for task, m in engine.models.items()
        },
        batching=engine.settings.batching,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(m: MetricsDep):
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
