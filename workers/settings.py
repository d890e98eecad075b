"""Settings read from the environment (pydantic-settings).

Every value a worker needs comes from here, so that a cluster is configured only
through environment variables (see README: "Configuration").
"""
from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    broker_url: str = Field("redis://127.0.0.1:6379/0", alias="CELERY_BROKER_URL")
    result_backend: str | None = Field(None, alias="CELERY_RESULT_BACKEND")

    serpapi_api_key: SecretStr | None = Field(None, alias="SERPAPI_API_KEY")
    serpapi_base_url: str = Field("https://serpapi.com", alias="SERPAPI_BASE_URL")
    serpapi_timeout: float = Field(30.0, alias="SERPAPI_TIMEOUT")

    store_url: str = Field("./atscale-data", alias="ATSCALE_STORE")
    cache_dir: str = Field("~/.cache/atscale", alias="ATSCALE_CACHE_DIR")
    allowed_networks: str = Field("", alias="ATSCALE_ALLOWED_NETWORKS")
    download_threads: int = Field(32, alias="ATSCALE_DOWNLOAD_THREADS", ge=1, le=512)
    user_agent: str = Field(
        "atscale/0.1 (image dataset builder; +https://github.com/atscale/atscale)",
        alias="ATSCALE_USER_AGENT",
    )

    # fault handling (see README "Faults")
    stall_seconds: float = Field(300.0, alias="ATSCALE_STALL_SECONDS", gt=0)
    sweep_interval: float = Field(30.0, alias="ATSCALE_SWEEP_INTERVAL", gt=0)
    max_deliveries: int = Field(5, alias="ATSCALE_MAX_DELIVERIES", ge=1)

    def result_backend_url(self) -> str:
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
