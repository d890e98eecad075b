"""Object store: one interface, two implementations.

- `LocalStore`: a directory (the embedded default, `./atscale-data`).
- `S3Store`: an S3 bucket through boto3 (MinIO in production; `AWS_ENDPOINT_URL_S3`).

Keys are relative, slash-separated paths made of safe characters; a key can never
name anything outside the store.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

_KEY_RE = re.compile(r"^[A-Za-z0-9_.=-]+(?:/[A-Za-z0-9_.=-]+)*$")


class StoreError(Exception):
    """The store could not be reached or refused an operation (worth a retry)."""


class NotFound(KeyError):
    """No object under that key."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise ValueError(f"invalid store key {key!r}")
    return key


class ObjectStore:
    """The interface. Subclasses implement the five primitives."""

    url: str

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """All keys that start with `prefix` (a folder, ending in '/'), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    # -- conveniences on top of the primitives ---------------------------------
    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_json_or(self, key: str, default: Any = None) -> Any:
        try:
            return self.get_json(key)
        except NotFound:
            return default

    def put_jsonl(self, key: str, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        self.put_bytes(key, text.encode(), "application/x-ndjson")

    def get_jsonl(self, key: str) -> list[dict]:
        return [json.loads(line) for line in self.get_bytes(key).decode().splitlines() if line.strip()]

    def download_to(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(self.get_bytes(key))
        os.replace(tmp, path)


class LocalStore(ObjectStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        try:  # the folder is there nearly always: no mkdir (it locks the parent folder, and every thread asks)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def exists(self, key):
        return self._path(key).is_file()

    def list(self, prefix):
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if prefix and not prefix.endswith("/"):
            check_key(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                out.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)


class S3Store(ObjectStore):
    """S3 / MinIO through boto3. The endpoint comes from `AWS_ENDPOINT_URL_S3`
    (boto3 reads it itself), credentials from the standard AWS variables."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, create_bucket: bool = True):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        cfg = Config(
            retries={"mode": "standard", "max_attempts": 8},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=64,
            s3={"addressing_style": "path"},
        )
        self._client = boto3.client(
            "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None, config=cfg
        )
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"cannot use bucket {self.bucket!r}: {exc}") from exc
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc2:
                if "BucketAlreadyOwnedByYou" not in str(exc2):
                    raise StoreError(f"cannot create bucket {self.bucket!r}: {exc2}") from exc2

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(kw.get("Key", "")) from None
            raise StoreError(f"S3 {fn.__name__} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 endpoint unreachable ({type(exc).__name__}): {exc}") from exc

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self._call(self._client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data, ContentType=content_type)

    def get_bytes(self, key):
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError as Urllib3Error

        resp = self._call(self._client.get_object, Bucket=self.bucket, Key=self._k(key))
        try:
            return resp["Body"].read()
        except (BotoCoreError, Urllib3Error, OSError) as exc:  # the connection broke mid-body
            raise StoreError(f"S3 read of {key} broke off ({type(exc).__name__}): {exc}") from exc

    def exists(self, key):
        try:
            self._call(self._client.head_object, Bucket=self.bucket, Key=self._k(key))
            return True
        except NotFound:
            return False

    def _iter(self, prefix: str) -> Iterator[str]:
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self._call(self._client.list_objects_v2, **kw)
            for obj in resp.get("Contents", []):
                yield obj["Key"][len(self.prefix):]
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def list(self, prefix):
        return sorted(self._iter(prefix))

    def delete(self, key):
        self._call(self._client.delete_object, Bucket=self.bucket, Key=self._k(key))


def open_store(url: str | None = None) -> ObjectStore:
    """`s3://bucket/prefix` -> S3Store; a path or `file:///path` -> LocalStore.
    Without `url`, the `ATSCALE_STORE` setting (default `./atscale-data`)."""
    if url is None:
        from workers.settings import get_settings

        url = get_settings().store_url
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"ATSCALE_STORE {url!r} names no bucket (expected s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"unsupported store URL {url!r}: use a directory path or s3://bucket/prefix")
    return LocalStore(url)


def retrying(fn, *args, attempts: int = 6, base_delay: float = 0.5, **kw):
    """Call a store operation, retrying StoreError with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kw)
        except StoreError:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay * (2 ** attempt))
