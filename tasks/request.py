"""The arguments of `collect_breeds`, validated before anything is queued."""
from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.names import checked_slug, slugify
from workers.train import TrainSpec

AMERICAN_BREEDS = [
    "American Hairless Terrier", "Alaskan Malamute", "American Eskimo Dog", "Australian Shepherd",
    "Boston Terrier", "Boykin Spaniel", "Chesapeake Bay Retriever", "Catahoula Leopard Dog", "Toy Fox Terrier",
]
_DOMAIN_RE = re.compile(r"^google\.[a-z]{2,3}(\.[a-z]{2})?$")
_SIZE_RE = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")


class CollectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(default_factory=lambda: list(AMERICAN_BREEDS), min_length=1, max_length=10000)
    chips_name: str = Field("dog", min_length=1, max_length=100)
    pages: int = Field(2, ge=1, le=100)
    size: str = "500x500"
    google_domain: str = "google.com"
    engine: str = "google_images"
    dataset: str | None = None
    no_cache: bool = False
    on_missing_chip: str = "unfiltered"
    val_percent: int = Field(20, ge=1, le=50)
    train: bool = True
    spec: TrainSpec = Field(default_factory=TrainSpec)

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: list[str]) -> list[str]:
        out, seen = [], set()
        for q in v:
            q = " ".join(str(q).split())
            if not q or len(q) > 200:
                raise ValueError(f"query {q!r} must be 1-200 characters")
            if not slugify(q):
                raise ValueError(f"query {q!r} has no letters or digits to name its class by")
            if slugify(q) in seen:
                raise ValueError(f"query {q!r} repeats another query (same class name {slugify(q)!r})")
            seen.add(slugify(q))
            out.append(q)
        return out

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not _SIZE_RE.match(v):
            raise ValueError(f"size {v!r} must look like 500x500")
        return v

    @field_validator("google_domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"google_domain {v!r} must look like google.com or google.co.uk")
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in ("google_images", "google"):
            raise ValueError("engine must be 'google_images' (current API, uds tokens) or 'google' (legacy tbm=isch, chips)")
        return v

    @field_validator("on_missing_chip")
    @classmethod
    def _missing(cls, v: str) -> str:
        if v not in ("unfiltered", "skip", "fail"):
            raise ValueError("on_missing_chip must be 'unfiltered' (default), 'skip' or 'fail'")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        return None if v is None else checked_slug(v, "dataset")

    @model_validator(mode="after")
    def _name(self) -> "CollectRequest":
        if self.dataset is None:
            self.dataset = f"{slugify(self.chips_name) or 'images'}-{self.digest()}"
        return self

    def digest(self) -> str:
        key = json.dumps({"q": sorted(self.queries), "chips": self.chips_name.lower(), "pages": self.pages,
                          "size": self.size, "domain": self.google_domain, "engine": self.engine}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    @property
    def size_max_side(self) -> int:
        w, h = (int(x) for x in self.size.split("x"))
        return max(w, h)

    def labels(self) -> list[str]:
        return [slugify(q) for q in self.queries]


def parse_request(kwargs: dict) -> CollectRequest:
    """Validate; raise ValueError with one readable line per problem."""
    try:
        return CollectRequest(**kwargs)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "arguments"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
        raise ValueError("invalid collect_breeds arguments:\n  " + "\n  ".join(lines)) from None
