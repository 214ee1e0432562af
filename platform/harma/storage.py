"""The only module that knows local paths from `s3://` URIs.

Everything else reads and writes through these functions, by URI. S3 access goes through
pyarrow's `S3FileSystem`; its settings come from the environment, as every AWS tool's do:

* `AWS_ENDPOINT_URL` (or `HARMA_S3_ENDPOINT`): endpoint of an S3-compatible store, e.g.
  `http://127.0.0.1:8333`; unset = AWS itself.
* `AWS_REGION` / `AWS_DEFAULT_REGION`: region (default us-east-1).
* credentials: the standard AWS chain (environment, shared credentials file, instance role).
  Credentials are never logged or put in error messages.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A storage URI could not be read or written; the message names the URI."""


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for S3 (no secrets held here; pyarrow reads the AWS chain)."""

    endpoint: str | None
    region: str

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("HARMA_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint=endpoint or None, region=region)

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict = {"region": self.region}
        if self.endpoint:
            parsed = urlparse(self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "http"
            # S3-compatible stores on a custom endpoint generally need path-style addressing.
            kwargs["force_virtual_addressing"] = False
        access_key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if access_key and secret_key:
            kwargs["access_key"] = access_key
            kwargs["secret_key"] = secret_key
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        return S3Settings.from_env().filesystem(), path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def absolute(uri: str | Path) -> str:
    """s3:// URIs unchanged; local paths made absolute (other processes have other working dirs)."""
    uri = str(uri)
    return uri if is_s3(uri) else str(Path(uri).expanduser().absolute())


def ray_storage(uri: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train/Tune run configs: our S3 settings for
    s3:// URIs, Ray's own default for local folders."""
    fs, path = resolve(uri)
    return (path, fs) if is_s3(str(uri)) else (path, None)


def from_ray_path(path: str, like: str | Path) -> str:
    """A path Ray reports (no scheme) as a URI of the same storage as `like`."""
    return f"s3://{path}" if is_s3(str(like)) else path


def join(base: str | Path, *parts: str) -> str:
    """Join URI parts with '/' for S3 and the OS separator locally."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def read_bytes(uri: str | Path) -> bytes:
    """Whole content of a file by URI."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as err:
        raise StorageError(f"{uri}: cannot read ({_short(err)})") from None


def read_table(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file by URI, fetched whole (one GET on S3) and parsed from memory (an Arrow buffer:
    through a Python file object such as io.BytesIO, pyarrow took 2-8x longer)."""
    return pq.read_table(pa.BufferReader(read_bytes(uri)), columns=columns)


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write a file by URI, creating parent folders (atomically for local files)."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as err:
        raise StorageError(f"{uri}: cannot write ({_short(err)})") from None


def write_json(uri: str | Path, value: Any) -> None:
    """`value` as indented JSON at `uri` (non-JSON values as their str), e.g. a benchmark's result."""
    write_bytes(uri, json.dumps(value, indent=1, default=str).encode())


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(f"{uri}: cannot check ({_short(err)})") from None


def size(uri: str | Path) -> int:
    """A file's size in bytes (StorageError if it does not exist)."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{uri}: cannot check ({_short(err)})") from None
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: no such file")
    return int(info.size)


def read_head(uri: str | Path, nbytes: int) -> bytes:
    """The first `nbytes` of a file (fewer if it is shorter), without reading the rest."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read(nbytes)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as err:
        raise StorageError(f"{uri}: cannot read ({_short(err)})") from None


def makedirs(uri: str | Path) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    # S3 has no folders: prefixes exist once an object is written under them.


def _short(err: OSError) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:300]


def list_files(prefix: str | Path, suffix: str = "") -> list[str]:
    """URIs of the files under `prefix` (recursively) ending in `suffix`, sorted."""
    fs, path = resolve(prefix)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{prefix}: cannot list ({_short(err)})") from None
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if is_s3(str(prefix)):
        return [f"s3://{p}" for p in found]
    return found


def preflight(uri: str | Path, write: bool = False) -> None:
    """Fail fast, before any worker starts, when `uri` cannot be used.

    For s3:// URIs this asks the store for the bucket with boto3 and turns the usual failures into
    one clear sentence: endpoint unreachable, bucket missing, credentials rejected. Local paths
    must exist (or, with `write`, be creatable).
    """
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if write:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"{uri}: cannot create ({err.strerror})") from None
        elif not path.exists():
            raise StorageError(f"{uri}: no such file or folder")
        return
    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config

    settings = S3Settings.from_env()
    bucket = uri[len("s3://") :].split("/", 1)[0]
    # A fresh session: boto3's default one keeps the credentials it first found.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}),
    )
    where = settings.endpoint or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except bex.EndpointConnectionError:
        raise StorageError(f"{uri}: cannot reach the S3 endpoint {where}") from None
    except bex.NoCredentialsError:
        raise StorageError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY or an AWS profile)") from None
    except bex.ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {where}") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise StorageError(f"{uri}: the S3 credentials were rejected by {where} "
                               f"(bucket {bucket!r}, error {code})") from None
        raise StorageError(f"{uri}: S3 error {code} at {where}") from None
