"""Where a run store lives: a local directory, or an object store reached through fsspec.

`store:` in a config (and `--store` on the command line) is either
    a plain path or `file://` URL   the local run store (guided_ab/store.py): append-only fsync'd journal, flock
    `s3://bucket/prefix`            S3 and S3-compatible servers, through s3fs (a dependency)
    `gs://bucket/prefix`            Google Cloud Storage, through gcsfs (`pip install guided-ab[gcs]`)
    `az://container/prefix`         Azure Blob Storage / ADLS Gen2, through adlfs (`pip install guided-ab[azure]`)
An object store has no append and no rename: its runs use guided_ab/storage_object.py (immutable
journal parts plus a manifest, a lease lock object). This module only names schemes, opens the
filesystem and turns the libraries' many error types into one ConfigError that names the URL and
what failed, so a bad store stops a command with exit 2 before anything starts.

Credentials and endpoints come from each library's own environment, never from the config (which
is copied into the run): for S3 the AWS variables or profile (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...),
and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible server such as MinIO; for GCS
GOOGLE_APPLICATION_CREDENTIALS; for Azure AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME
and its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from guided_ab.errors import ConfigError

# scheme -> (fsspec protocol's package, the guided-ab extra that installs it)
OBJECT_SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", ""),  # a dependency: no extra
    "s3a": ("s3fs", ""),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}
LOCAL_SCHEMES = ("", "file")


def store_scheme(store: str | os.PathLike[str]) -> str:
    """'' for a plain path, else the URL's scheme in lower case ('file', 's3', ...). A Windows drive
    letter (`C:\\runs`) is a path, not a scheme."""
    text = os.fspath(store)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_object_store(store: str | os.PathLike[str]) -> bool:
    return store_scheme(store) not in LOCAL_SCHEMES


def local_store_path(store: str | os.PathLike[str]) -> Path:
    """The directory of a local store: a plain path, or the path of a `file://` URL."""
    text = os.fspath(store)
    if store_scheme(text) == "file":
        return Path(urlsplit(text).path)
    return Path(text)


def check_store_url(store: str) -> str:
    """The `store` value, checked without touching the network: a known scheme whose library is
    installed, and an object store URL that names a bucket. ConfigError (naming the URL) otherwise."""
    scheme = store_scheme(store)
    if scheme in LOCAL_SCHEMES:
        if scheme == "file" and not urlsplit(store).path:
            raise ConfigError(f"store: {store!r} has no path; write file:///absolute/path or a plain directory")
        return store
    if scheme not in OBJECT_SCHEMES:
        known = ", ".join(f"{s}://" for s in ("file", "s3", "gs", "az"))
        raise ConfigError(f"store: {store!r} has an unknown scheme {scheme!r}: use a directory or one of {known}")
    bucket = urlsplit(store).netloc
    if not bucket:
        raise ConfigError(f"store: {store!r} names no bucket: write {scheme}://<bucket>/<prefix>")
    _filesystem_class(store, scheme)
    return store


def _filesystem_class(store: str, scheme: str) -> Any:
    import fsspec

    package, extra = OBJECT_SCHEMES[scheme]
    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError:
        how = f"pip install 'guided-ab[{extra}]'" if extra else f"pip install {package}"
        raise ConfigError(f"store: {store!r} needs the {package} package, which is not installed: {how}") from None


def open_filesystem(store: str) -> tuple[Any, str]:
    """(the fsspec filesystem, the store's root path inside it) for an object store URL.

    Listings are never cached: several processes (Prefect workers on other machines) write the same
    run, and a cached listing would hide their journal parts.
    """
    scheme = store_scheme(store)
    cls = _filesystem_class(store, scheme)
    options: dict[str, Any] = {}
    if cls.__module__.startswith("s3fs"):
        # fail fast on an unreachable endpoint: botocore's defaults retry for minutes; s3fs retries
        # its own transient errors (throttling, 5xx) on top of this
        options = {"use_listings_cache": False, "skip_instance_cache": True,
                   "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3, "mode": "standard"}}}
        if os.environ.get("AWS_ENDPOINT_URL_S3"):  # botocore reads AWS_ENDPOINT_URL itself; s3fs may pass its own default
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL_S3"]
        elif os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    else:
        options = {"use_listings_cache": False, "skip_instance_cache": True}
    # one filesystem per process and credentials: making an S3 client costs ~1 s (botocore loads its
    # service models), and a phase opens the run many times. Keyed by the environment the libraries
    # read their credentials and endpoints from, so changed credentials get a new client.
    key = (cls, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIAL_ENV))))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        try:
            fs = _FILESYSTEMS[key] = cls(**options)
        except Exception as err:  # noqa: BLE001 - each library has its own credential errors: name the URL
            raise store_error(store, "cannot open it", err) from None
    return fs, cls._strip_protocol(store).rstrip("/")


_CREDENTIAL_ENV = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")
_FILESYSTEMS: dict[tuple, Any] = {}


def probe_store(store: str, under: str = "") -> None:
    """Write and delete a small object under the store (or `under` inside it): a missing bucket,
    missing credentials, no write permission or an unreachable endpoint is a ConfigError naming the
    URL, before anything starts. A local store is probed by RunStore itself (mkdir)."""
    import secrets

    if not is_object_store(store):
        return
    fs, base = open_filesystem(check_store_url(store))
    probe = "/".join(p for p in (base, under, f".write-probe-{secrets.token_hex(4)}") if p)
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001 - every library's own error types: one message naming the URL
        raise store_error(store, "cannot write and delete a probe object", err) from None


def store_error(store: object, doing: str, err: BaseException) -> ConfigError:
    """One message for the many ways an object store refuses: names the URL, what was being done
    and what to check, never a traceback."""
    name = type(err).__name__
    text = str(err).strip()[:300] or name
    if name in {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"} or "credentials" in text.lower():
        hint = "no usable credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (gs: GOOGLE_APPLICATION_CREDENTIALS; az: AZURE_STORAGE_CONNECTION_STRING)"
    elif isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = "permission denied: the credentials need read, write and delete on this bucket and prefix"
    elif isinstance(err, FileNotFoundError) or "NoSuchBucket" in text:
        hint = "the bucket does not exist (or is not visible to these credentials)"
    elif name in {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"} \
            or isinstance(err, ConnectionError | TimeoutError) or "connect" in text.lower():
        hint = "the store cannot be reached: check the network and AWS_ENDPOINT_URL (for an S3-compatible server)"
    else:
        hint = f"{name}"
    return ConfigError(f"store {store}: {doing}: {hint} ({text})")
