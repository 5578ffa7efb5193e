"""Service settings, read from the environment with the prefix DIDE_ (pydantic-settings)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_commas(value: object) -> object:
    """Split "a, b,,c" into ["a", "b", "c"]; lists pass through (for Settings(...) built in code)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can set; preprocessing parameters travel in the bundle, never here."""

    model_config = SettingsConfigDict(env_prefix="DIDE_", extra="ignore", frozen=True)

    bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Bundle directories, comma-separated, at most one per task."
    )
    store: Path = Field(default=Path("artifacts/store"), description="Embedding store root (created if missing).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted API keys, comma-separated; empty = no authentication."
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order of preference; empty = CUDA if available, else CPU.",
    )
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    max_text_chars: int = Field(default=500, gt=0, description="Longest accepted question / hypothesis / statement.")
    batch_max: int = Field(default=32, ge=1, le=1024, description="Largest micro-batch for the text tower and head.")
    batch_wait_ms: float = Field(
        default=1.0, ge=0.0, le=1000.0, description="Longest wait for a micro-batch to fill while others are in flight."
    )
    inline_max_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=1000.0,
        description="A lone request runs on the event loop, without a thread hop each way, when the model's last "
        "single-request call took less than this and nothing finished for that long (idle); 0 = always in a worker "
        "thread.",
    )
    queue_max: int = Field(
        default=256, ge=1, description="Requests waiting per model beyond which the service sheds load."
    )
    request_timeout_s: float = Field(default=10.0, gt=0.0, description="Deadline for one request; past it, 503.")
    text_cache_size: int = Field(default=4096, ge=0, description="Text embeddings kept per model (LRU); 0 = no cache.")
    batching: bool = Field(default=True, description="Coalesce concurrent requests into micro-batches.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS, comma-separated; empty = CORS off."
    )
    threads: int = Field(
        default_factory=lambda: min(8, (os.cpu_count() or 1) + 1),
        ge=1,
        description="Worker threads for model calls, image decoding and store access.",
    )
    intra_op_threads: int = Field(
        default=1,
        ge=0,
        description="ONNX Runtime threads inside one model call; 0 = its default (one per physical core, spinning "
        "between calls). One leaves the cores to concurrent calls and the event loop: on 2 cores at 32 clients, "
        "1,145 vs 878 req/s with micro-batching, side by side (README, Results).",
    )
    overlay_max: int = Field(
        default=100_000,
        ge=1,
        description="New vectors kept in memory until committed (e.g. while a cache build holds the store's lock).",
    )
    verify_store: bool = Field(
        default=True,
        description="Check every stored row against its commit log's sha256 at start-up and refuse a damaged store "
        "(reads the whole store once: about 1 s per GB).",
    )
    store_refresh_s: float = Field(
        default=30.0, ge=0.0, description="How often to pick up rows another process committed; 0 = never."
    )
    retry_after_s: int = Field(default=1, ge=0, description="The Retry-After header sent with 503 responses.")
    log_level: str = Field(default="INFO", description="Logging level for dide-serve.")

    @field_validator("bundles", "api_keys", "providers", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment, read once per process."""
    return Settings()
