"""Where files live: local paths and URIs as pyarrow filesystems, reached with the recipe's ``storage``
settings (``configure_storage``; each process of a run applies them: the driver and every unit of
work), and the run lock of a run directory on S3.

* ``s3://`` uses the settings' endpoint and region (else AWS_ENDPOINT_URL[_S3] and AWS_REGION /
  AWS_DEFAULT_REGION from the environment, else the bucket's own region on AWS), unsigned requests
  when ``anonymous``; writes of small files are one PUT each (``allow_delayed_open``), large ones
  multipart uploads. ``gs://`` uses the endpoint and ``anonymous``. A URI with its own query string
  (``s3://b/p?endpoint_override=...``) is taken as pyarrow reads it; schemes pyarrow lacks (hf://,
  http(s)://, memory://) go through fsspec.
* The run lock on S3 is a lock object ``OUT/.lock`` created with a conditional put (If-None-Match: *):
  a second writer gets 412 and a one-line error. Its holder renews it (If-Match on its ETag) every
  ``LOCK_LEASE_SECONDS / 3``; a lock not renewed for ``lease_seconds`` (its holder was killed with
  -9) is taken over, again conditionally. It needs boto3 (pyarrow has no conditional writes) and a
  store that honours conditional writes (AWS S3 since 2024, MinIO, R2; checked when the lock is taken:
  a store that ignores them gets a warning); elsewhere (GCS, other fsspec stores, S3 without boto3)
  there is no run lock and the run says so once.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.schemas.storage import StorageSpec

log = logging.getLogger(__name__)

_SETTINGS = StorageSpec()
LOCK_LEASE_SECONDS = 60.0


class RunLockedError(RuntimeError):
    pass


def configure_storage(spec: StorageSpec | None) -> None:
    """Use ``spec`` for every URI this process resolves from now on."""
    global _SETTINGS
    _SETTINGS = spec or StorageSpec()


def storage_settings() -> StorageSpec:
    return _SETTINGS


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_endpoint(settings: StorageSpec | None = None) -> str | None:
    """The S3 endpoint in use: the settings', else the environment's (None: AWS)."""
    return (settings or _SETTINGS).endpoint or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=64)
def _s3_filesystem(settings: StorageSpec, bucket: str, endpoint: str | None, env_region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"anonymous": settings.anonymous, "allow_bucket_creation": settings.create_bucket,
                              "allow_delayed_open": True}
    if endpoint:
        scheme, host = endpoint.split("://", 1)
        kwargs.update(endpoint_override=host, scheme=scheme, region=settings.region or env_region or "us-east-1")
    else:
        region = settings.region
        if region is None:
            try:
                region = pafs.resolve_s3_region(bucket)
            except (OSError, pa.ArrowException):
                region = env_region
        if region:
            kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=16)
def _gcs_filesystem(settings: StorageSpec) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {"anonymous": settings.anonymous}
    if settings.endpoint:
        scheme, host = settings.endpoint.split("://", 1)
        kwargs.update(endpoint_override=host, scheme=scheme)
    return pafs.GcsFileSystem(**kwargs)


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if "?" not in rest and scheme in ("s3", "gs"):
        path = rest.rstrip("/")
        if scheme == "s3":
            env_region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
            return _s3_filesystem(_SETTINGS, path.split("/", 1)[0], s3_endpoint(), env_region), path
        return _gcs_filesystem(_SETTINGS), path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        if "Unrecognized filesystem type" not in str(err) and "not supported" not in str(err).lower():
            raise
        return _fsspec_filesystem(uri)


def display_uri(uri: str, path: str) -> str:
    """``path`` (inside the filesystem of ``uri``) as the user would type it: with the scheme."""
    if "://" not in uri:
        return path
    scheme = uri.split("://", 1)[0]
    return f"{scheme}://{path.lstrip('/')}" if scheme != "file" else f"file://{path}"


def ensure_bucket(uri: str) -> None:
    """The bucket an output URI names exists, or is created when ``storage.create_bucket`` says so;
    otherwise a one-line input error."""
    from mmbalance.schemas.contract import InputError

    if not uri.startswith(("s3://", "gs://")) or "?" in uri:
        return
    fs, path = resolve_filesystem(uri)
    bucket = path.split("/", 1)[0]
    scheme = uri.split("://", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as err:
        raise InputError(f"{scheme}://{bucket}: cannot reach the bucket ({str(err).splitlines()[0]})") from None
    if found:
        return
    if not _SETTINGS.create_bucket:
        raise InputError(f"{scheme}://{bucket}: bucket does not exist; create it, or set storage.create_bucket: true "
                         "in the recipe to have it created")
    try:
        fs.create_dir(bucket)
    except OSError as err:
        raise InputError(f"{scheme}://{bucket}: cannot create the bucket ({str(err).splitlines()[0]})") from None


# -- the run lock on S3 -------------------------------------------------------------------------------


def _s3_client():
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED) if _SETTINGS.anonymous else None
    return boto3.client("s3", endpoint_url=s3_endpoint(), region_name=_SETTINGS.region or _env("AWS_REGION", "AWS_DEFAULT_REGION"),
                        config=config)


def _error_code(err) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class S3RunLock:
    """The lock object of one run directory on S3 (see the module docstring)."""

    def __init__(self, uri: str, bucket: str, key: str):
        self.uri, self.bucket, self.key = uri, bucket, key
        self.client = _s3_client()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "lease_seconds": LOCK_LEASE_SECONDS}).encode()

    def _put(self, **condition) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as err:
            if _error_code(err) not in _CONFLICT:
                raise
            self.etag = self._take_over_stale()
        try:  # a store that ignores the condition would let this second create through
            self._put(IfNoneMatch="*")
            log.warning("%s: this store ignores conditional writes, so the run lock cannot keep a second "
                        "writer out; run one mmbalance per output directory", self.uri)
            self.etag = self.client.head_object(Bucket=self.bucket, Key=self.key)["ETag"]
        except ClientError as err:
            if _error_code(err) not in _CONFLICT:
                raise
        self._thread = threading.Thread(target=self._renew, name="mmbalance-run-lock", daemon=True)
        self._thread.start()

    def _take_over_stale(self) -> str:
        from botocore.exceptions import ClientError

        held = self.client.get_object(Bucket=self.bucket, Key=self.key)
        try:
            info = json.loads(held["Body"].read())
        except ValueError:
            info = {}
        now = email.utils.parsedate_to_datetime(held["ResponseMetadata"]["HTTPHeaders"]["date"])  # the store's clock
        age = (now - held["LastModified"]).total_seconds()
        lease = float(info.get("lease_seconds", LOCK_LEASE_SECONDS))
        if age <= lease:
            raise RunLockedError(
                f"{self.uri}: another mmbalance run is writing to this directory (lock object {self.uri}/.lock held by "
                f"{info.get('owner', 'unknown')}, renewed {age:.0f} s ago; it lapses {lease:.0f} s after its holder stops)")
        try:
            return self._put(IfMatch=held["ETag"])
        except ClientError as err:
            if _error_code(err) in _CONFLICT:
                raise RunLockedError(f"{self.uri}: another mmbalance run took over its lapsed run lock first") from None
            raise

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(LOCK_LEASE_SECONDS / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except ClientError as err:
                if _error_code(err) in _CONFLICT:
                    self.lost = True
                    log.error("%s: the run lock was taken over by another run", self.uri)
                    return
            except BotoCoreError:  # a transient network error: the next renewal retries within the lease
                continue

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        try:
            current = self.client.head_object(Bucket=self.bucket, Key=self.key)["ETag"]
            if current == self.etag:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except (ClientError, BotoCoreError) as err:  # gone already, or unreachable: it lapses on its own
            log.warning("%s: could not remove the run lock object (%s); it lapses after %.0f s", self.uri, err,
                        LOCK_LEASE_SECONDS)


@contextmanager
def object_store_lock(uri: str, root: str) -> Iterator[None]:
    """One writer per run directory on an object store (see the module docstring)."""
    lock = None
    if uri.startswith("s3://") and "?" not in uri and _SETTINGS.lock:
        try:
            import boto3  # noqa: F401
        except ImportError:
            log.warning("%s: no run lock (it needs boto3: pip install 'mmbalance[s3]'); run one mmbalance per "
                        "output directory", uri)
        else:
            bucket, _, prefix = root.partition("/")
            lock = S3RunLock(uri.rstrip("/"), bucket, f"{prefix.rstrip('/')}/.lock" if prefix else ".lock")
    elif _SETTINGS.lock:
        log.warning("%s: no run lock on this store (conditional writes are used on S3 only); run one mmbalance per "
                    "output directory", uri)
    if lock is None:
        yield
        return
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
    if lock.lost:
        raise RunLockedError(f"{uri}: another run took over the run lock while this one was writing; check the run "
                             "and rerun to finish it")
