"""Files of the Batch API: uploaded batch inputs and the output / error files batches produce.

Content lives under the storage root (local directory or pyarrow filesystem URI) as `files/<id>`, where the id
is generated here: no client string (file name, purpose) ever becomes part of a path. Metadata lives in Redis
beside the job store, per tenant, so another key's file id is simply not found.
"""
import posixpath
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Literal

import pyarrow.fs as pafs
from pydantic import BaseModel

from batchgen.jobs.paths import filesystem

FilePurpose = Literal["batch", "batch_output"]
COPY_CHUNK = 1 << 20


class FileObject(BaseModel):
    """OpenAI's file object, as its client parses it."""
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than the limit of {limit:,} bytes (BATCHGEN_API_MAX_UPLOAD_BYTES)")
        self.limit = limit


def storage_location(storage: str, *names: str) -> str:
    """A location under the storage root, as a local path or a URI with the root's query (its options) kept."""
    base, sep, query = storage.partition("?") if "://" in storage else (storage, "", "")
    return posixpath.join(base, *names) + sep + query


class FileStore:
    """Files of every tenant: content through a pyarrow filesystem, metadata in Redis."""

    def __init__(self, redis, prefix: str, storage: str, clock: Callable[[], float] = time.time):
        self.redis = redis
        self.prefix = f"{prefix}:api"
        self.fs, self.root = filesystem(storage)
        self.storage = storage
        self.clock = clock
        self.fs.create_dir(posixpath.join(self.root, "files"), recursive=True)

    def location(self, file_id: str) -> str:
        """The file's content as a location batchgen's readers open (a local path or a URI)."""
        return storage_location(self.storage, "files", file_id)

    def content_path(self, file_id: str) -> str:
        return posixpath.join(self.root, "files", file_id)

    def upload(self, tenant: str, source: BinaryIO, filename: str, purpose: FilePurpose, max_bytes: int) -> FileObject:
        """Copy an upload into storage chunk by chunk; refuse it (and keep nothing) past max_bytes."""
        file_id = "file-" + secrets.token_hex(12)
        path = self.content_path(file_id)
        size = 0
        try:
            with self.fs.open_output_stream(path) as sink:
                while chunk := source.read(COPY_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    sink.write(chunk)
        except BaseException:
            self.fs.delete_file(path)
            raise
        return self._register(tenant, file_id, filename, purpose, size)

    def write_lines(self, tenant: str, lines: Iterable[bytes], filename: str) -> FileObject | None:
        """A batch_output file from lines (each ending in a newline); None when there are none."""
        file_id = "file-" + secrets.token_hex(12)
        path = self.content_path(file_id)
        size = 0
        with self.fs.open_output_stream(path) as sink:
            for line in lines:
                sink.write(line)
                size += len(line)
        if size == 0:
            self.fs.delete_file(path)
            return None
        return self._register(tenant, file_id, filename, "batch_output", size)

    def get(self, tenant: str, file_id: str) -> FileObject | None:
        """The tenant's file, or None (unknown, deleted, or another tenant's)."""
        raw = self.redis.hget(self._key(file_id), tenant)
        return FileObject.model_validate_json(raw) if raw else None

    def page(self, tenant: str, purpose: str | None, after: str | None, limit: int) -> tuple[list[FileObject], bool]:
        """The tenant's files, newest first, starting after the id `after`; and whether more follow."""
        ids = self.redis.zrevrange(self._index(tenant), 0, -1)
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        found = []
        for file_id in ids:
            file = self.get(tenant, file_id)
            if file is not None and (purpose is None or file.purpose == purpose):
                found.append(file)
                if len(found) > limit:
                    break
        return found[:limit], len(found) > limit

    def open(self, file_id: str) -> Iterator[bytes]:
        """The content, in chunks."""
        with self.fs.open_input_stream(self.content_path(file_id)) as source:
            while chunk := source.read(COPY_CHUNK):
                yield chunk

    def delete(self, tenant: str, file_id: str) -> bool:
        if not self.redis.hdel(self._key(file_id), tenant):
            return False
        self.redis.zrem(self._index(tenant), file_id)
        try:
            self.fs.delete_file(self.content_path(file_id))
        except FileNotFoundError:
            pass
        return True

    def exists(self, file_id: str) -> bool:
        return self.fs.get_file_info(self.content_path(file_id)).type == pafs.FileType.File

    def _register(self, tenant: str, file_id: str, filename: str, purpose: FilePurpose, size: int) -> FileObject:
        created = int(self.clock())
        file = FileObject(id=file_id, bytes=size, created_at=created, filename=filename, purpose=purpose)
        # the id is the hash key and the tenant its one field: a lookup by another tenant finds nothing
        self.redis.hset(self._key(file_id), tenant, file.model_dump_json())
        self.redis.zadd(self._index(tenant), {file_id: self.redis.incr(f"{self.prefix}:sequence")})
        return file

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.prefix}:files:{tenant}"
