"""The HTTP endpoints: each parses its request, asks the engine, and shapes the engine's answer as the response."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from service.bodies import M, parse_body
from service.dependencies import EngineDep, MetricsDep, guard
from service.engine import Engine
from service.errors import error_response
from service.openapi import ERRORS, SECURITY, form_schema, request_body
from service.schemas import (
    EXAMPLE_SHA,
    IMAGE_ID_MAX,
    Answer,
    EntailmentRequest,
    EntailmentResponse,
    EntailmentSearchRequest,
    ErrorResponse,
    HealthResponse,
    ImageStatus,
    ImageUploadRequest,
    ImageUploadResponse,
    ModelInfo,
    ReadyResponse,
    ReasoningRequest,
    ReasoningResponse,
    ReasoningSearchRequest,
    SearchFilters,
    SearchHit,
    SearchResponse,
    VQARequest,
    VQAResponse,
    VQASearchRequest,
)

VQA_FORM = form_schema("VQAForm", "question")
ENTAILMENT_FORM = form_schema("EntailmentForm", "hypothesis")
ENTAILMENT_SUMMARY = "Does the image entail, contradict or leave open the hypothesis?"

router = APIRouter()
guarded = [Depends(guard)]


def task_route(
    path: str, body: type[BaseModel], response: type[BaseModel], summary: str, form: dict[str, Any] | None = None
) -> Callable:
    """POST `path` for one task: guarded, the shared error responses, a JSON body (or `form`) documented."""
    return router.post(
        path,
        response_model=response,
        responses=ERRORS,
        dependencies=guarded,
        openapi_extra=request_body(body, form) | SECURITY,
        summary=summary,
    )


async def task_request(request: Request, task: str, model: type[M], *, multipart: bool) -> tuple[Engine, M]:
    """The engine, and the body validated into `model`. The engine and settings come from app state, not as
    dependencies: a guarded route solves only `guard` (service/dependencies.py)."""
    engine: Engine = request.app.state.engine
    engine.model(task)  # a task not served is a 404 before the body is read
    return engine, await parse_body(request, model, request.app.state.settings, multipart=multipart)


@task_route("/vqa", VQARequest, VQAResponse, "Answer a question about an image", VQA_FORM)
async def vqa(request: Request):
    engine, req = await task_request(request, "vqa", VQARequest, multipart=True)
    a = await engine.vqa(req.question, req.ref(), req.top_k)
    answers = [Answer(answer=label, score=score) for label, score in a.answers]
    return VQAResponse(answers=answers, image_id=a.image.sha256, cached=a.image.cached, model_id=a.model_id)


@task_route("/entailment", EntailmentRequest, EntailmentResponse, ENTAILMENT_SUMMARY, ENTAILMENT_FORM)
async def entailment(request: Request):
    engine, req = await task_request(request, "entailment", EntailmentRequest, multipart=True)
    a = await engine.entailment(req.hypothesis, req.ref())
    return EntailmentResponse(
        label=a.label, scores=a.scores, image_id=a.image.sha256, cached=a.image.cached, model_id=a.model_id
    )


@task_route("/reasoning", ReasoningRequest, ReasoningResponse, "Is the statement true of the pair of images?")
async def reasoning(request: Request):
    engine, req = await task_request(request, "reasoning", ReasoningRequest, multipart=False)
    a = await engine.reasoning(req.statement, [ref.ref() for ref in req.images])
    return ReasoningResponse(
        label=a.label,
        score=a.score,
        image_ids=[im.sha256 for im in a.images],
        cached=[im.cached for im in a.images],
        model_id=a.model_id,
    )


async def search(request: Request, task: str, model: type[SearchFilters]) -> SearchResponse:
    engine, req = await task_request(request, task, model, multipart=False)
    text, wanted, pair = req.query()
    a = await engine.search(task, text, wanted, req.k, ids=req.ids, prefix=req.prefix, **pair)
    return SearchResponse(
        results=[SearchHit(image_id=h.image_id, names=h.names, score=h.score) for h in a.hits],
        wanted=wanted,
        scanned=a.scanned,
        collection=a.collection,
        unknown_ids=a.unknown_ids,
        model_id=a.model_id,
    )


SEARCH_SUMMARIES = {
    "vqa": "Rank every cached image by how likely the model gives the wanted answer to a question about it",
    "entailment": "Rank every cached image by how likely it entails (contradicts, leaves open) a hypothesis",
    "reasoning": "Rank every cached image, paired with a given one, by how likely a statement is true (false) of them",
}


@task_route("/search/vqa", VQASearchRequest, SearchResponse, SEARCH_SUMMARIES["vqa"])
async def search_vqa(request: Request):
    return await search(request, "vqa", VQASearchRequest)


@task_route("/search/entailment", EntailmentSearchRequest, SearchResponse, SEARCH_SUMMARIES["entailment"])
async def search_entailment(request: Request):
    return await search(request, "entailment", EntailmentSearchRequest)


@task_route("/search/reasoning", ReasoningSearchRequest, SearchResponse, SEARCH_SUMMARIES["reasoning"])
async def search_reasoning(request: Request):
    return await search(request, "reasoning", ReasoningSearchRequest)


@router.post(
    "/images",
    response_model=ImageUploadResponse,
    responses=ERRORS | {409: {"model": ErrorResponse, "description": "The name already names another image."}},
    dependencies=guarded,
    openapi_extra=request_body(ImageUploadRequest, form_schema("ImageUploadForm", None)) | SECURITY,
    summary="Upload an image: encode it once for every model and keep it in the store",
)
async def upload_image(request: Request):
    req = await parse_body(request, ImageUploadRequest, request.app.state.settings, multipart=True)
    sha, cached, model_ids = await request.app.state.engine.upload(req.image_bytes(), req.name)
    return ImageUploadResponse(image_id=sha, cached=cached, model_ids=model_ids)


@router.get(
    "/images/{image_id}",
    response_model=ImageStatus,
    responses=ERRORS,
    dependencies=guarded,
    openapi_extra=SECURITY,
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
        models={task: ModelInfo(**asdict(summary)) for task, summary in engine.summaries().items()},
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
