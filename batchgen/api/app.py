"""The HTTP server of `batchgen serve`: OpenAI's Files and Batches API for the job service, its dashboard and
its Prometheus metrics, in one FastAPI app. Like the CLI it is a client of the job store and the queue;
the workers do the work.

Every /v1 route needs a bearer key (`ApiSettings.keys`); each key is a tenant that sees only its own files
and batches (another tenant's id answers 404, as an unknown one does). Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, which its client turns into its exception classes.
"""
import hmac
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchgen.api.batches import Batches, BatchRefused
from batchgen.api.files import FileStore, FileTooLarge
from batchgen.api.metrics import metrics_router
from batchgen.api.pages import pages_router, static_files
from batchgen.api.settings import ApiSettings, cache_salt_of, tenant_of
from batchgen.jobs.store import RedisJobStore

log = logging.getLogger("batchgen.api")

MULTIPART_OVERHEAD = 64 * 1024      # a declared body this much over the file limit is refused unread
REFRESH_INTERVAL_S = 1.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass(frozen=True)
class Tenant:
    name: str
    cache_salt: str


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)   # OpenAI's limits


def create_app(settings: ApiSettings, store: RedisJobStore, clock: Callable[[], float] = time.time,
               refresh_interval_s: float = REFRESH_INTERVAL_S) -> FastAPI:
    """The app over a job store (its Redis keeps the API's records too, under the same prefix). `clock`
    (seconds since the epoch) decides timestamps and expiry, so a test can move time on."""
    if not settings.keys:
        raise ValueError("no API keys: set BATCHGEN_API_KEYS or BATCHGEN_API_KEYS_FILE")
    tenants = {key: Tenant(tenant_of(key), cache_salt_of(key)) for key in settings.keys}
    files = FileStore(store.redis, store.prefix.rstrip(":"), settings.storage, clock)
    batches = Batches(settings, files, store, lambda: {w.model for w in store.live_workers() if w.model}, clock)
    stop_refreshing = threading.Event()

    def refresh_open_batches() -> None:
        """Batches move on (validate, finish, expire) without anyone asking about them."""
        while not stop_refreshing.wait(refresh_interval_s):
            try:
                for batch_id in batches.open_batch_ids():
                    batches.validate_and_submit(batch_id)
                    batches.refresh(batch_id)
            except Exception:  # Redis away: try again next round
                log.exception("refreshing open batches failed")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        refresher = threading.Thread(target=refresh_open_batches, name="batchgen-api-refresh", daemon=True)
        refresher.start()
        yield
        stop_refreshing.set()
        refresher.join(timeout=5)

    app = FastAPI(title="batchgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.store, app.state.files, app.state.batches = settings, store, files, batches

    app.include_router(metrics_router(store))
    app.include_router(pages_router(store, lambda job_id: ApiError(404, f"No job {job_id}.")))
    app.mount("/static", static_files(), name="static")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return ApiError(400, f"{param or 'request'}: {first['msg']}", param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    def tenant(request: Request) -> Tenant:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
        found = None
        for known, owner in tenants.items():      # compare with every key, in constant time each
            if hmac.compare_digest(known.encode(), key.strip().encode()):
                found = owner
        if found is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return found

    # -- files ------------------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload_file(request: Request, owner: Tenant = Depends(tenant)) -> dict:
        limit = settings.max_upload_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + MULTIPART_OVERHEAD:
            raise _too_large(FileTooLarge(limit))
        async with request.form(max_files=1, max_fields=4) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose != "batch":
                raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", "purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "send the file as the multipart field 'file'", "file")
            try:
                file = await run_in_threadpool(files.upload, owner.name, upload.file, upload.filename or "upload",
                                               "batch", limit)
            except FileTooLarge as exc:
                raise _too_large(exc) from None
        return file.model_dump()

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                   owner: Tenant = Depends(tenant)) -> dict:
        found, more = files.page(owner.name, purpose, after, limit)
        return _page([f.model_dump() for f in found], more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, owner: Tenant = Depends(tenant)) -> dict:
        return _file(files, owner, file_id).model_dump()

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, owner: Tenant = Depends(tenant)) -> StreamingResponse:
        file = _file(files, owner, file_id)
        return StreamingResponse(files.open(file.id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, owner: Tenant = Depends(tenant)) -> dict:
        if not files.delete(owner.name, file_id):
            raise _no_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------------------------
    @app.post("/v1/batches")
    def create_batch(request: CreateBatch, background: BackgroundTasks, owner: Tenant = Depends(tenant)) -> dict:
        try:
            batch = batches.create(owner.name, owner.cache_salt, request.input_file_id, request.endpoint,
                                   request.completion_window, request.metadata)
        except BatchRefused as exc:
            raise ApiError(400, str(exc), exc.param) from None
        background.add_task(batches.validate_and_submit, batch.id)
        return batch.model_dump()

    @app.get("/v1/batches")
    def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                     owner: Tenant = Depends(tenant)) -> dict:
        found, more = batches.page(owner.name, after, limit)
        return _page([b.model_dump() for b in found], more)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str, owner: Tenant = Depends(tenant)) -> dict:
        batch = batches.get(owner.name, batch_id)
        if batch is None:
            raise _no_batch(batch_id)
        return batch.model_dump()

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, owner: Tenant = Depends(tenant)) -> dict:
        try:
            batch = batches.cancel(owner.name, batch_id)
        except BatchRefused as exc:
            raise ApiError(409, str(exc)) from None
        if batch is None:
            raise _no_batch(batch_id)
        return batch.model_dump()

    return app


def _file(files: FileStore, owner: Tenant, file_id: str):
    file = files.get(owner.name, file_id)
    if file is None:
        raise _no_file(file_id)
    return file


def _page(data: list[dict[str, Any]], has_more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _too_large(exc: FileTooLarge) -> ApiError:
    return ApiError(413, f"File too large: {exc}.", "file", "file_too_large")


def _no_file(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", "id")


def _no_batch(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
