"""The OpenAPI document: error responses, request bodies (JSON and multipart, parsed by hand so FastAPI does not
see them) and this deployment's text limit."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.dependencies import API_KEY_HEADER, BEARER
from service.schemas import (
    IMAGE_ID_MAX,
    REQUEST_MODELS,
    TOP_K_MAX,
    ErrorResponse,
)
from service.settings import Settings

TEXT_FIELDS = {
    "VQARequest": "question",
    "EntailmentRequest": "hypothesis",
    "ReasoningRequest": "statement",
    "VQASearchRequest": "question",
    "EntailmentSearchRequest": "hypothesis",
    "ReasoningSearchRequest": "statement",
}

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API keys are configured and none (or a wrong one) was given."},
    404: {
        "model": ErrorResponse,
        "description": "Unknown image id, no model loaded for this task, or (search) a bundle without search files.",
    },
    413: {"model": ErrorResponse, "description": "The body is over DIDE_MAX_BODY_BYTES."},
    415: {"model": ErrorResponse, "description": "The body is not JSON (or multipart where accepted)."},
    422: {"model": ErrorResponse, "description": "Malformed JSON, a missing/extra/mistyped field, bad text or image."},
    503: {
        "model": ErrorResponse,
        "description": "Not ready, overloaded (queue full) or past the request deadline; retry later.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
}

# The key schemes `guard` reads (service/dependencies.py), declared on every guarded route (in its openapi_extra).
SCHEMES = (API_KEY_HEADER, BEARER)
SECURITY: dict[str, Any] = {"security": [{scheme.scheme_name: []} for scheme in SCHEMES]}

_FORM_IMAGE = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}


def form_schema(title: str, text_field: str | None = None) -> dict[str, Any]:
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


def request_body(model: type[BaseModel], form: dict[str, Any] | None = None) -> dict[str, Any]:
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
    """Add the request models (parsed by hand, so FastAPI does not see them), the key schemes (read by hand) and
    this deployment's limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            models: list[tuple[type[BaseModel], Literal["validation"]]] = [(m, "validation") for m in REQUEST_MODELS]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {})["securitySchemes"] = {
                s.scheme_name: jsonable_encoder(s.model, by_alias=True, exclude_none=True) for s in SCHEMES
            }
            components = schema["components"].setdefault("schemas", {})
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
