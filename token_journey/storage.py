"""Files under a root that may be local or on object storage, through `pyarrow.fs`.

A `Location` (see `token_journey.layout`) is a local `Path` or a `Uri` (`s3://bucket/prefix`);
`filesystem` gives the `pyarrow.fs` filesystem and path of either (LocalFileSystem for a local
path, `FileSystem.from_uri` for a URI, one instance per bucket and credentials). Local files keep
the rule of `layout`: written to a temporary sibling, then renamed, so the bytes and names are the
same as ever. Object stores have no rename, but a single upload is already atomic (an object
appears only once complete, and a multipart upload only at its completion), so an object is
written under its final key directly: a reader never sees half of one, and a killed writer
leaves nothing to clean up.

S3 endpoint and credentials come from the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws) or from the URI's query
(`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`).

Store faults. At cluster scale an object store throttles, answers 5xx or drops a connection now and
then, so every remote call here goes through `_remote_call`: `classify` sorts pyarrow's OSError by its
message, a transient fault (network, timeout, throttling, 5xx) is retried with exponential backoff
(a warning logged per retry: URI, attempt, cause), and whatever ends the retries, a fault that
lasts or a permanent one (no such bucket, access denied), becomes a `StorageError`, a
`TokenJourneyError` whose one line names the URI, the cause and the fix, which stages print as
`error: ...` (exit 2) instead of a traceback. An OSError that is not about the store (a missing
key's FileNotFoundError, bytes that are not Parquet) passes through unchanged for the caller to judge,
so a damaged shard is still reported as damaged and an unreachable store never is. The AWS SDK's own
retries are off (one attempt per request), so the bound below is the whole bound, set by:

    TOKEN_JOURNEY_STORAGE_RETRIES     attempts per operation, the first included (default 6; 1: no retry)
    TOKEN_JOURNEY_STORAGE_BACKOFF_S   the first wait in seconds, doubled after each failure, each wait at
                                      most 30 s and jittered down to half, so many workers spread out (default 1)
    TOKEN_JOURNEY_STORAGE_DEADLINE_S  no retry starts later than this after the first attempt (default 120)

With the defaults a store that stays down is given up after 6 attempts and at most 31 s of waits.
Retrying is safe: reads have no effect; an upload either appears whole or not at all, so a retried
write never leaves half an object; and the harvest writes a manifest only after all its shards, so an
outage leaves no manifest describing missing shards, and a rerun keeps the finished shards and writes
the rest. Local paths are never retried (a local I/O error is not transient in this sense).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from token_journey import diskspace
from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, atomic_write_bytes, is_uri, location, temp_sibling

log = logging.getLogger(__name__)

T = TypeVar("T")

_LOCAL = pafs.LocalFileSystem()
_BUCKET_SCHEMES = ("s3", "gs", "gcs")
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


class StorageError(TokenJourneyError):
    """An object-store operation that failed for good: retries exhausted, or a permanent fault.

    A subclass, so readers that turn a bad read into "this shard is damaged" can let a store fault
    through as what it is (the shard may be fine; the store was not)."""


@dataclass(frozen=True)
class Fault:
    """What an object-store OSError means: a short cause for the message, and whether to retry."""

    cause: str
    transient: bool


_PERMANENT = (
    ("bucket does not exist", r"NO_SUCH_BUCKET|NoSuchBucket"),
    (
        "access denied",
        r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH"
        r"|SignatureDoesNotMatch|Forbidden|HTTP status 403|EXPIRED_TOKEN|ExpiredToken|InvalidToken"
        r"|MISSING_AUTHENTICATION_TOKEN|InvalidClientTokenId|UNRECOGNIZED_CLIENT",
    ),
)
_TRANSIENT = (  # first match names the cause: a curl timeout also says "Failed to connect"
    ("throttled", r"SLOW_DOWN|SlowDown|THROTTL|TooManyRequests|HTTP status 429|REQUEST_LIMIT_EXCEEDED"),
    ("server error", r"HTTP status 5\d\d|INTERNAL_FAILURE|InternalError|SERVICE_UNAVAILABLE|ServiceUnavailable|BadGateway"),
    ("timed out", r"curlCode: 28|REQUEST_TIMEOUT|RequestTimeout|Timeout was reached|timed out"),
    ("connection refused", r"Could not connect|Connection refused|Failed to connect"),
    ("host name not resolved", r"Could not resolve"),
    ("connection lost", r"NETWORK_CONNECTION|curlCode|Connection reset|Broken pipe|Recv failure|Send failure"),
)
_OTHER_STORE_ERROR = re.compile(r"AWS Error|google::cloud|GCS Error")


def classify(message: str) -> Fault | None:
    """The fault an object-store OSError message describes, or None when it is not about the store.

    Built from what pyarrow (AWS SDK, curl) actually prints, e.g. "When listing objects under key 'a/' in
    bucket 'b': AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Could not connect
    to server; ..." or "... AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."
    (a HEAD has no body, so only the status tells throttling or 5xx). Permanent faults are checked first.
    Any other "AWS Error" is a permanent store error; everything else (a missing key, bad Parquet bytes)
    is the caller's business.
    """
    for cause, pattern in _PERMANENT:
        if re.search(pattern, message, re.IGNORECASE):
            return Fault(cause, transient=False)
    for cause, pattern in _TRANSIENT:
        if re.search(pattern, message, re.IGNORECASE):
            return Fault(cause, transient=True)
    if _OTHER_STORE_ERROR.search(message):
        return Fault("store error", transient=False)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How long a transient fault is retried (see the module docstring for the variables)."""

    attempts: int = 6
    backoff_s: float = 1.0
    deadline_s: float = 120.0
    max_wait_s: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Read at each operation, so a test or a job script can change it without a restart."""
        return cls(
            attempts=max(1, int(_env_number("TOKEN_JOURNEY_STORAGE_RETRIES", cls.attempts))),
            backoff_s=max(0.0, _env_number("TOKEN_JOURNEY_STORAGE_BACKOFF_S", cls.backoff_s)),
            deadline_s=max(0.0, _env_number("TOKEN_JOURNEY_STORAGE_DEADLINE_S", cls.deadline_s)),
        )

    def wait(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure: doubling, capped, jittered to [1/2, 1] of that."""
        return min(self.max_wait_s, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise TokenJourneyError(f"{name}={value!r} is not a number (see token_journey.storage)") from None


def _detail(message: str) -> str:
    """The informative part of a pyarrow S3 message, short: from "AWS Error" to before "; Details"."""
    first = message.splitlines()[0] if message else ""
    first = first[first.find("AWS Error") :] if "AWS Error" in first else first
    first = re.split(r"; Details:| \(Request ID:", first)[0]
    return first[:160]


def _bucket(uri: str) -> str:
    return urlsplit(uri).netloc


def _fault_error(uri: str, action: str, fault: Fault, message: str, attempts: int, seconds: float) -> StorageError:
    """The one line for a fault that ended the retries: the URI, the cause and what to fix."""
    detail = _detail(message)
    if fault.cause == "bucket does not exist":
        return StorageError(f"{uri}: bucket {_bucket(uri)!r} does not exist; create it or fix paths.activations")
    if fault.cause == "access denied":
        return StorageError(
            f"{uri}: access denied ({detail}); check the storage credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE) and the bucket's permissions"
        )
    if not fault.transient:
        return StorageError(f"cannot {action} {uri} ({detail}); check the URI in paths.activations and the store")
    return StorageError(
        f"cannot {action} {uri} ({fault.cause} after {attempts} attempt{'s' if attempts != 1 else ''} over {seconds:.1f} s: {detail}); "
        "check that the store is up and its endpoint (AWS_ENDPOINT_URL, or endpoint_override in the URI), "
        "or retry longer with TOKEN_JOURNEY_STORAGE_RETRIES / TOKEN_JOURNEY_STORAGE_BACKOFF_S"
    )


def _remote_call(where: Location | str, action: str, call: Callable[[], T]) -> T:
    """`call()`, retried while it fails with a transient store fault; local paths are called once, as ever.

    `action` is the verb of the message ("read", "list", ...). Each retry logs a warning; a fault
    that outlasts the policy, or a permanent one, raises `StorageError`; an OSError that is not a
    store fault is re-raised unchanged.
    """
    if is_local(where):
        return call()
    policy, start = RetryPolicy.from_env(), time.monotonic()
    attempt = 1
    while True:
        try:
            return call()
        except OSError as exc:
            fault = classify(str(exc))
            if fault is None:
                raise
            elapsed, pause = time.monotonic() - start, policy.wait(attempt)
            if not fault.transient or attempt >= policy.attempts or elapsed + pause > policy.deadline_s:
                raise _fault_error(str(where), action, fault, str(exc), attempt, elapsed) from exc
            log.warning("%s %s: %s (attempt %d of %d: %s); retrying in %.1f s", action, where, fault.cause, attempt, policy.attempts, _detail(str(exc)), pause)
        time.sleep(pause)
        attempt += 1


def _one_sdk_attempt(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same S3 filesystem with the AWS SDK's own retries off, so `_remote_call` alone bounds the time.

    The SDK's default (3 attempts, about 6 s per failing request) would multiply that bound and
    retry unseen. pyarrow gives an S3FileSystem's options only through pickling (`__reduce__`); should
    that ever change shape, the filesystem is kept as it is (SDK retries on, still bounded).
    """
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    try:
        options = dict(fs.__reduce__()[1][0])
        return pafs.S3FileSystem(**dict(options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1)))
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        log.debug("keeping the AWS SDK's retries: %s", exc)
        return fs


@functools.lru_cache(maxsize=16)
def _remote(prefix: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    """The filesystem of `scheme://bucket[?query]`, built once per prefix and AWS environment (the AWS SDK's
    retries off: see `_one_sdk_attempt`)."""
    try:
        return _one_sdk_attempt(_remote_call(prefix, "open", lambda: pafs.FileSystem.from_uri(prefix)[0]))
    except (pa.ArrowException, OSError) as exc:
        raise TokenJourneyError(
            f"cannot open {prefix} ({str(exc).splitlines()[0][:160]}); check the URI in paths.activations and the storage credentials (AWS_* variables)"
        ) from exc


def is_local(where: Location) -> bool:
    """True for a path on this machine's filesystem."""
    return not is_uri(where)


def filesystem(where: Location) -> tuple[pafs.FileSystem, str]:
    """The `pyarrow.fs` filesystem holding `where`, and `where`'s path on it."""
    where = location(where)
    if is_local(where):
        return _LOCAL, os.path.abspath(where)
    parts = urlsplit(str(where))
    prefix = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    fs = _remote(prefix, tuple(os.environ.get(k) for k in _AWS_ENV))
    if parts.scheme.lower() in _BUCKET_SCHEMES:
        return fs, (parts.netloc + parts.path).rstrip("/")
    return fs, pafs.FileSystem.from_uri(str(where))[1]


def _info(where: Location) -> pafs.FileInfo:
    fs, path = filesystem(where)
    return _remote_call(where, "look up", lambda: fs.get_file_info(path))


def is_file(where: Location) -> bool:
    return _info(where).type == pafs.FileType.File


def is_dir(where: Location) -> bool:
    """True for a folder (on object storage: a prefix with at least one object under it)."""
    return _info(where).type == pafs.FileType.Directory


def file_names(folder: Location) -> list[str]:
    """Names of the files directly in `folder`, sorted ([] when there is no such folder)."""
    fs, path = filesystem(folder)
    infos = _remote_call(folder, "list", lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def make_folder(folder: Location) -> None:
    """Create a local folder and its parents; object stores need none (keys are whole paths)."""
    if is_local(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def delete(where: Location, missing_ok: bool = False) -> None:
    if is_local(where):
        Path(where).unlink(missing_ok=missing_ok)
        return
    if missing_ok and not is_file(where):
        return
    fs, path = filesystem(where)
    _remote_call(where, "delete", _deleter(fs, path))


def _deleter(fs: pafs.FileSystem, path: str) -> Callable[[], None]:
    """`fs.delete_file(path)` for retrying: a retry that finds the object gone counts as done, since the
    attempt that failed may well have deleted it before its answer was lost."""
    tries = 0

    def delete_once() -> None:
        nonlocal tries
        tries += 1
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if tries == 1:
                raise

    return delete_once


class ReadCounter:
    """Bytes this process has read from storage (whole files, checksums, Parquet column chunks and footers).

    The training stage writes what one layer's SAEs cost in reads to its timings, so a family trained
    from one pass over the shards can be told from one that reads them once per member. Thread-safe:
    the loader reads in a background thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.total += count


BYTES_READ = ReadCounter()


def read_bytes(where: Location) -> bytes:
    fs, path = filesystem(where)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    data = _remote_call(where, "read", read)
    BYTES_READ.add(len(data))
    return data


def write_bytes(where: Location, data: bytes) -> int:
    """Write a whole file: locally a temporary sibling renamed into place, on object storage one upload."""
    if is_local(where):
        return atomic_write_bytes(where, data)
    fs, path = filesystem(where)

    def upload() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    _remote_call(where, "write", upload)
    return len(data)


def write_parquet(table: pa.Table, where: Location, **options) -> None:
    """`pq.write_table` of a whole file, made atomic the same way as `write_bytes`."""
    if is_local(where):
        tmp = temp_sibling(Path(where))
        with writing(where, table.nbytes, tmp):  # a failed write leaves no temporary; a full disk: one line
            pq.write_table(table, tmp, **options)
            os.replace(tmp, where)
        return
    fs, path = filesystem(where)
    _remote_call(where, "write", lambda: pq.write_table(table, path, filesystem=fs, **options))


def read_with(where: Location, read: Callable[[pa.NativeFile], T]) -> T:
    """`read(file)` on a random-access reader of `where`, the open and every read retried as one.

    A transient fault in the middle of a Parquet read starts the read over on a fresh file; an
    error that is no store fault (a bad page checksum) comes out unchanged, at once."""
    fs, path = filesystem(where)

    def open_and_read() -> T:
        with fs.open_input_file(path) as source:
            return read(source)

    return _remote_call(where, "read", open_and_read)


def sha256(where: Location) -> str:
    """The sha256 hex digest of a file, streamed through its filesystem in 1 MiB blocks."""
    fs, path = filesystem(where)

    def digest_once() -> str:
        digest = hashlib.sha256()  # a retry starts over
        with fs.open_input_stream(path) as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
                BYTES_READ.add(len(block))
        return digest.hexdigest()

    return _remote_call(where, "read", digest_once)


def file_size(where: Location) -> int:
    return int(_info(where).size or 0)


def free_bytes(where: Location) -> int | None:
    """Free bytes of the local filesystem that `where` is (or will be) on: `shutil.disk_usage` of its
    nearest existing ancestor. None for object storage, which has no such figure."""
    return diskspace.free_bytes(Path(where)) if is_local(where) else None
