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
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, atomic_write_bytes, is_uri, location, temp_sibling

_LOCAL = pafs.LocalFileSystem()
_BUCKET_SCHEMES = ("s3", "gs", "gcs")
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


@functools.lru_cache(maxsize=16)
def _remote(prefix: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    """The filesystem of `scheme://bucket[?query]`, built once per prefix and AWS environment."""
    try:
        return pafs.FileSystem.from_uri(prefix)[0]
    except (pa.ArrowException, OSError) as exc:
        raise TokenJourneyError(f"cannot open {prefix} ({str(exc).splitlines()[0][:160]}); check the URI in "
                                "paths.activations and the storage credentials (AWS_* variables)") from exc


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
    return fs.get_file_info(path)


def is_file(where: Location) -> bool:
    return _info(where).type == pafs.FileType.File


def is_dir(where: Location) -> bool:
    """True for a folder (on object storage: a prefix with at least one object under it)."""
    return _info(where).type == pafs.FileType.Directory


def file_names(folder: Location) -> list[str]:
    """Names of the files directly in `folder`, sorted ([] when there is no such folder)."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
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
    fs.delete_file(path)


def read_bytes(where: Location) -> bytes:
    fs, path = filesystem(where)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(where: Location, data: bytes) -> int:
    """Write a whole file: locally a temporary sibling renamed into place, on object storage one upload."""
    if is_local(where):
        return atomic_write_bytes(where, data)
    fs, path = filesystem(where)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
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
    pq.write_table(table, path, filesystem=fs, **options)


def open_input(where: Location) -> pa.NativeFile:
    """A random-access reader of a file (for Parquet); close it, e.g. in a `with` block."""
    fs, path = filesystem(where)
    return fs.open_input_file(path)


def sha256(where: Location) -> str:
    """The sha256 hex digest of a file, streamed through its filesystem in 1 MiB blocks."""
    fs, path = filesystem(where)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_size(where: Location) -> int:
    return int(_info(where).size or 0)


def free_bytes(where: Location) -> int | None:
    """Free bytes of the local filesystem that `where` is (or will be) on: `shutil.disk_usage` of its
    nearest existing ancestor. None for object storage, which has no such figure."""
    if not is_local(where):
        return None
    probe = Path(where).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)
