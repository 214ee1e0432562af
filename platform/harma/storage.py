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

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


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


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(f"{uri}: cannot check ({_short(err)})") from None


def makedirs(uri: str | Path) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    # S3 has no folders: prefixes exist once an object is written under them.


def _short(err: OSError) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:300]
