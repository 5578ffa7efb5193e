"""Request and response models of the HTTP API, with their limits and OpenAPI examples."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

# A 1x1 white PNG, the base64 every example uses.
EXAMPLE_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
EXAMPLE_SHA = "3f1c2e5d9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d"
IMAGE_ID_MAX = 256
TOP_K_MAX = 100
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,")
_WHITESPACE = re.compile(rb"\s+")


def decode_base64(value: str) -> bytes:
    """Standard base64 (whitespace and a `data:image/...;base64,` prefix allowed) to bytes."""
    value = _DATA_URL.sub("", value, count=1)
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("the image is not base64: it contains non-ASCII characters") from None
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image is not valid base64 (standard alphabet, padded with '=')") from None
    if not data:
        raise ValueError("the image is empty")
    return data


def check_text(value: str, info: ValidationInfo) -> str:
    """Non-blank, valid Unicode, within the configured length (passed as validation context)."""
    limit = (info.context or {}).get("max_text_chars")
    if limit is not None and len(value) > limit:
        raise ValueError(f"the text is {len(value)} characters long, the limit is {limit}")
    if not value.strip():
        raise ValueError("the text is blank")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode (lone surrogate)") from None
    return value


# A request's free text: non-blank (also in the schema), within the configured length, valid Unicode.
Text = Annotated[str, Field(min_length=1, pattern=r"\S"), AfterValidator(check_text)]


def _no_default(schema: dict[str, Any]) -> None:
    """Drop `"default": null` from an optional field's schema: null is not an accepted value."""
    schema.pop("default", None)


_BASE64_SCHEMA = {"contentEncoding": "base64", "contentMediaType": "image/*"}


def _optional_base64(schema: dict[str, Any]) -> None:
    _no_default(schema)
    schema.update(_BASE64_SCHEMA)


def _optional(description: str, **constraints: Any) -> Any:
    """An optional field: absent means None; an explicit null is refused (_reject_null), no null default is shown."""
    return Field(None, description=description, json_schema_extra=_no_default, **constraints)


def _reject_null(value: object) -> object:
    if value is None:
        raise ValueError("must be a string, not null")
    return value


def _upload(info: ValidationInfo) -> bytes | None:
    """The bytes of a multipart file part, which the route passes as validation context."""
    upload = (info.context or {}).get("upload")
    if upload is not None and not upload:
        raise ValueError("the uploaded image file is empty")
    return upload


def _one_image(*examples: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for 'exactly one of image_id and image', plus the model's examples."""
    return {"oneOf": [{"required": ["image_id"]}, {"required": ["image"]}], "examples": list(examples)}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    """A model's config showing these bodies as its OpenAPI examples."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class StrictModel(BaseModel):
    """Unknown fields and type coercions are refused: a misspelt field is a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OneImage(StrictModel):
    """An image given by `image_id` (a sha256 or a user id in the store) or by `image` (base64 bytes)."""

    image_id: str | SkipJsonSchema[None] = _optional(
        "The sha256 of a stored image, or a user id the store maps to one.", min_length=1, max_length=IMAGE_ID_MAX
    )
    image: str | SkipJsonSchema[None] = Field(
        None,
        min_length=1,
        description="The image file's bytes, base64 (standard alphabet); a data: URL prefix is accepted.",
        json_schema_extra=_optional_base64,
    )

    _data: bytes | None = PrivateAttr(None)
    _nonnull = field_validator("image_id", "image", mode="before")(_reject_null)

    @model_validator(mode="after")
    def _exactly_one(self, info: ValidationInfo) -> Self:
        upload = _upload(info)
        if (self.image_id is not None) + (self.image is not None) + (upload is not None) != 1:
            raise ValueError("give exactly one of 'image_id' and 'image'")
        self._data = upload if upload is not None else None if self.image is None else decode_base64(self.image)
        return self

    def ref(self) -> str | bytes:
        """The image bytes (decoded base64 or the uploaded file), or else the image id."""
        if self._data is not None:
            return self._data
        assert self.image_id is not None  # the validator guarantees one of the two
        return self.image_id


class ImageRef(OneImage):
    """One image of a /reasoning pair."""

    model_config = ConfigDict(json_schema_extra=_one_image({"image_id": EXAMPLE_SHA}, {"image": EXAMPLE_PNG_B64}))


class VQARequest(OneImage):
    """A question about one image."""

    model_config = ConfigDict(
        json_schema_extra=_one_image(
            {"image_id": "img_00042", "question": "what color is the shape?", "top_k": 3},
            {"image": EXAMPLE_PNG_B64, "question": "what shape is in the image?"},
        )
    )
    question: Text = Field(description="The question, in plain text.")
    top_k: int = Field(5, ge=1, le=TOP_K_MAX, description="How many ranked answers to return.")


class EntailmentRequest(OneImage):
    """Does the image (the premise) entail, contradict or leave open the hypothesis?"""

    model_config = ConfigDict(
        json_schema_extra=_one_image(
            {"image_id": EXAMPLE_SHA, "hypothesis": "there is a red circle to the left of a square"},
            {"image": EXAMPLE_PNG_B64, "hypothesis": "the image shows two triangles"},
        )
    )
    hypothesis: Text = Field(description="The hypothesis, in plain text.")


class ReasoningRequest(StrictModel):
    """Is the statement true of the pair of images (NLVR2 style)?"""

    model_config = _examples(
        {
            "images": [{"image_id": "left_001"}, {"image": EXAMPLE_PNG_B64}],
            "statement": "there are more circles in the left image than in the right image",
        }
    )
    images: list[ImageRef] = Field(
        min_length=2, max_length=2, description="[left, right], each {'image_id': ...} or {'image': base64}."
    )
    statement: Text = Field(description="The statement, in plain text.")


class ImageUploadRequest(StrictModel):
    """An image to encode once and keep in the store of every loaded model."""

    model_config = ConfigDict(
        json_schema_extra={"required": ["image"], "examples": [{"image": EXAMPLE_PNG_B64, "name": "catalogue-0042"}]}
    )
    image: str | SkipJsonSchema[None] = Field(
        None,
        min_length=1,
        description="The image file's bytes, base64; a data: URL prefix is accepted.",
        json_schema_extra=_optional_base64,
    )
    name: str | SkipJsonSchema[None] = Field(
        None,
        min_length=1,
        max_length=IMAGE_ID_MAX,
        pattern=r"^[^/\s][^/]*$",
        description="An optional user id to refer to the image by (instead of its sha256).",
        json_schema_extra=_no_default,
    )

    _data: bytes = PrivateAttr(b"")
    _nonnull = field_validator("image", "name", mode="before")(_reject_null)

    @model_validator(mode="after")
    def _decode(self, info: ValidationInfo) -> Self:
        upload = _upload(info)
        if (self.image is None) == (upload is None):
            raise ValueError("give the image once: 'image' (base64) in JSON, or an 'image' file part in a form")
        self._data = decode_base64(self.image) if self.image is not None else upload or b""
        return self

    def image_bytes(self) -> bytes:
        return self._data


SEARCH_K_MAX = 1000
SEARCH_IDS_MAX = 10_000
ImageId = Annotated[str, Field(min_length=1, max_length=IMAGE_ID_MAX)]


class SearchFilters(StrictModel):
    """How many images to return, and which cached images to consider (default: all of them)."""

    k: int = Field(10, ge=1, le=SEARCH_K_MAX, description="How many images to return, best first.")
    ids: list[ImageId] | SkipJsonSchema[None] = _optional(
        "Only these images (sha256s or user ids); ids the store does not know are listed in the answer.",
        min_length=1,
        max_length=SEARCH_IDS_MAX,
    )
    prefix: str | SkipJsonSchema[None] = _optional(
        "Only images with a user id starting with this (combined with `ids`: both must hold).",
        min_length=1,
        max_length=IMAGE_ID_MAX,
    )
    _nonnull = field_validator("ids", "prefix", mode="before")(_reject_null)

    def query(self) -> tuple[str, str, dict[str, Any]]:
        """(the text, the wanted answer, label or verdict, the given image's arguments for reasoning)."""
        raise NotImplementedError


class VQASearchRequest(SearchFilters):
    """Which cached images would the model answer this question about with this answer?"""

    model_config = _examples(
        {"question": "is there a red circle in the image?", "answer": "yes", "k": 5},
        {"question": "what shape is in the image?", "answer": "triangle", "k": 3, "prefix": "10"},
    )
    question: Text = Field(description="The question, in plain text.")
    answer: str = Field(min_length=1, max_length=IMAGE_ID_MAX, description="The wanted answer (one of the model's).")

    def query(self) -> tuple[str, str, dict[str, Any]]:
        return self.question, self.answer, {}


class EntailmentSearchRequest(SearchFilters):
    """Which cached images entail (contradict, leave open) this hypothesis?"""

    model_config = _examples(
        {"hypothesis": "there is a red circle to the left of a square", "label": "entailment", "k": 5},
        {"hypothesis": "there are two blue triangles", "label": "contradiction", "ids": ["0", "1", "2"]},
    )
    hypothesis: Text = Field(description="The hypothesis, in plain text.")
    label: str = Field("entailment", min_length=1, max_length=64, description="The wanted label.")

    def query(self) -> tuple[str, str, dict[str, Any]]:
        return self.hypothesis, self.label, {}


class ReasoningSearchRequest(SearchFilters):
    """Which cached images, paired with the given image, make the statement true (or false)?"""

    model_config = _examples(
        {
            "statement": "both images contain a circle",
            "pair": {"image_id": "3"},
            "side": "left",
            "verdict": True,
            "k": 5,
        }
    )
    statement: Text = Field(description="The statement, in plain text.")
    pair: ImageRef = Field(description="The given image, {'image_id': ...} or {'image': base64}.")
    side: Literal["left", "right"] = Field(
        "left", description="Where the given image goes; each cached image takes the other side."
    )
    verdict: bool = Field(True, description="The wanted verdict: true (the statement holds) or false.")

    def query(self) -> tuple[str, str, dict[str, Any]]:
        return self.statement, "true" if self.verdict else "false", {"pair": self.pair.ref(), "side": self.side}


class SearchHit(BaseModel):
    image_id: str = Field(description="The image's sha256.")
    names: list[str] = Field(description="The user ids naming it (e.g. file stems from dide-cache build).")
    score: float = Field(description="The probability of the wanted answer, as the per-image endpoint gives it.")


class SearchResponse(BaseModel):
    model_config = _examples(
        {
            "results": [{"image_id": EXAMPLE_SHA, "names": ["42"], "score": 0.97}],
            "wanted": "yes",
            "scanned": 1000,
            "collection": 1000,
            "unknown_ids": [],
            "model_id": "a1b2c3d4e5f60718",
        }
    )
    results: list[SearchHit] = Field(description="The k best images, best first (ties: the earlier cached first).")
    wanted: str = Field(description="The answer, label or verdict scored.")
    scanned: int = Field(description="Cached images scored (after the filters).")
    collection: int = Field(description="Images cached for this task's model.")
    unknown_ids: list[str] = Field(description="Ids of the `ids` filter that name no cached image.")
    model_id: str


class Answer(BaseModel):
    answer: str
    score: float = Field(description="The answer's probability (sigmoid for VQA's multi-label head).")


class VQAResponse(BaseModel):
    model_config = _examples(
        {
            "answers": [{"answer": "red", "score": 0.97}, {"answer": "blue", "score": 0.02}],
            "image_id": EXAMPLE_SHA,
            "cached": True,
            "model_id": "a1b2c3d4e5f60718",
        }
    )
    answers: list[Answer] = Field(description="The top_k answers, best first.")
    image_id: str = Field(description="The sha256 of the image; pass it as image_id next time.")
    cached: bool = Field(description="Whether the image embedding came from the store (false: encoded now).")
    model_id: str = Field(description="The image-embedding space the answer was computed in.")


class EntailmentResponse(BaseModel):
    model_config = _examples(
        {
            "label": "entailment",
            "scores": {"entailment": 0.91, "neutral": 0.06, "contradiction": 0.03},
            "image_id": EXAMPLE_SHA,
            "cached": False,
            "model_id": "a1b2c3d4e5f60718",
        }
    )
    label: str = Field(description="The most probable label.")
    scores: dict[str, float] = Field(description="Probability of each label (softmax).")
    image_id: str
    cached: bool
    model_id: str


class ReasoningResponse(BaseModel):
    model_config = _examples(
        {
            "label": True,
            "score": 0.88,
            "image_ids": [EXAMPLE_SHA, EXAMPLE_SHA],
            "cached": [True, False],
            "model_id": "a1b2c3d4e5f60718",
        }
    )
    label: bool = Field(description="Whether the statement is judged true of the pair.")
    score: float = Field(description="The probability that the statement is true.")
    image_ids: list[str] = Field(description="The sha256 of the left and right images.")
    cached: list[bool] = Field(description="Per image, whether its embedding came from the store.")
    model_id: str


class ImageUploadResponse(BaseModel):
    model_config = _examples({"image_id": EXAMPLE_SHA, "cached": False, "model_ids": ["a1b2c3d4e5f60718"]})
    image_id: str = Field(description="The sha256 of the image bytes: use it as image_id in later requests.")
    cached: bool = Field(description="Whether every model already had the image before this upload.")
    model_ids: list[str] = Field(description="The models whose store now holds the image.")


class ImageStatus(BaseModel):
    model_config = _examples(
        {"image_id": EXAMPLE_SHA, "cached": True, "model_ids": ["a1b2c3d4e5f60718"], "tasks": ["vqa"]}
    )
    image_id: str = Field(description="The image's sha256.")
    cached: bool = Field(description="Whether at least one loaded model has the image's embedding.")
    model_ids: list[str] = Field(description="The models that have it.")
    tasks: list[str] = Field(description="The tasks that can answer about it without the image bytes.")


class ModelInfo(BaseModel):
    model_id: str
    provider: str
    labels: int
    dim: int


class ReadyResponse(BaseModel):
    model_config = _examples(
        {
            "status": "ready",
            "provider": "CPUExecutionProvider",
            "models": {
                "vqa": {
                    "model_id": "a1b2c3d4e5f60718",
                    "provider": "CPUExecutionProvider",
                    "labels": 13,
                    "dim": 128,
                }
            },
            "batching": True,
        }
    )
    status: str
    provider: str = Field(description="The execution provider actually active (the first model's).")
    models: dict[str, ModelInfo] = Field(description="Per task, the loaded model.")
    batching: bool


class HealthResponse(BaseModel):
    model_config = _examples({"status": "ok"})
    status: str


class ErrorResponse(BaseModel):
    """Every error: a machine-readable code and a human message."""

    model_config = _examples({"code": "image_not_found", "message": "no image 'cat-7' in the store"})
    code: str
    message: str


# Every request body the routes parse by hand (FastAPI does not see them): the OpenAPI document adds them.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    VQARequest,
    EntailmentRequest,
    ReasoningRequest,
    ImageUploadRequest,
    VQASearchRequest,
    EntailmentSearchRequest,
    ReasoningSearchRequest,
)
