"""The Celery app: Redis as broker and result backend, JSON messages only, late acks, one queue per model.

Settings come from the environment, so the CLI, workers, beat and tests agree without passing them around:
  BATCHGEN_REDIS_URL           redis://[:password@]host:port/db or rediss://... (default redis://127.0.0.1:6379/0)
  BATCHGEN_PREFIX              namespace of every Redis key (job store and Celery's own) and so of the queues:
                               two deployments (or test sessions) on one Redis never see each other (default
                               "batchgen")
  BATCHGEN_VISIBILITY_TIMEOUT  seconds after which Redis hands a message that a worker took and never acknowledged
                               to another worker; a live worker renews the messages it holds with every heartbeat,
                               so this bounds how long a dead worker's shards wait, not how long a shard may run
                               (default 300)
  BATCHGEN_HEARTBEAT_TTL       seconds a worker counts as alive after its last heartbeat (it beats every third of
                               that); a running shard whose worker falls silent this long is put back on the queue
                               (default 30)
"""
import base64
import hashlib
import json
import os
import re
import ssl
from functools import lru_cache
from urllib.parse import parse_qsl, urlsplit

from celery import Celery

from batchgen.jobs.store import DEFAULT_PREFIX, RedisJobStore, redis_url

DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
DEFAULT_HEARTBEAT_TTL_S = 30.0
KOMBU_RESTORE_PERIOD_S = 100.0       # kombu's Redis transport looks for expired messages this often by default
SHARD_TASK = "batchgen.run_shard"
FIRE_SCHEDULE_TASK = "batchgen.fire_schedule"
_QUEUE_CHARS = re.compile(r"[^a-z0-9_.-]+")


def key_prefix() -> str:
    return os.environ.get("BATCHGEN_PREFIX") or DEFAULT_PREFIX


def heartbeat_ttl_s() -> float:
    return float(os.environ.get("BATCHGEN_HEARTBEAT_TTL") or DEFAULT_HEARTBEAT_TTL_S)


def job_store() -> RedisJobStore:
    """The job registry this deployment shares (same Redis and prefix as the queues); one client per process."""
    return _job_store(redis_url(), key_prefix())


@lru_cache(maxsize=4)
def _job_store(url: str, prefix: str) -> RedisJobStore:
    return RedisJobStore(url, prefix=prefix)


def queue_name(model: str) -> str:
    """The queue a model's shards wait on: workers started with --model M consume only M's queue. The model id
    (a name or a path) is made safe for a queue name; when that changed it, a hash of the id keeps two ids
    that clean up alike ("a/b", "a-b") apart."""
    model_id = model.strip().rstrip("/") or model
    safe = _QUEUE_CHARS.sub("-", model_id.lower()).strip("-.")[-48:].lstrip("-.") or "model"
    if safe != model_id:
        safe += "-" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return f"batchgen.model.{safe}"


def make_app(url: str | None = None, prefix: str | None = None, visibility_timeout_s: float | None = None) -> Celery:
    url = url or redis_url()
    prefix = prefix or key_prefix()
    visibility = visibility_timeout_s or float(os.environ.get("BATCHGEN_VISIBILITY_TIMEOUT")
                                               or DEFAULT_VISIBILITY_TIMEOUT_S)
    app = Celery("batchgen", broker=url, backend=url, include=["batchgen.workers.tasks"])
    app.conf.update(
        # Never pickle: a message that isn't JSON is refused before anything reads it.
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        # A shard's message is acknowledged only after its part is written, and given back if the worker dies;
        # each worker thread holds one message at a time, so a busy worker doesn't sit on shards others could run.
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        broker_transport_options=_transport_options(visibility, prefix),
        result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    if urlsplit(url).scheme == "rediss":
        # The broker ignores the URL's TLS options and Celery insists on an explicit certificate policy:
        # verify the server unless the URL's ssl_cert_reqs says otherwise.
        asked = dict(parse_qsl(urlsplit(url).query)).get("ssl_cert_reqs", "required").upper()
        policy = getattr(ssl, asked if asked.startswith("CERT_") else f"CERT_{asked}", ssl.CERT_REQUIRED)
        app.conf.broker_use_ssl = app.conf.redis_backend_use_ssl = {"ssl_cert_reqs": policy}
    return app


def _transport_options(visibility_timeout_s: float, prefix: str) -> dict:
    options = {"visibility_timeout": visibility_timeout_s, "global_keyprefix": f"{prefix}:"}
    if visibility_timeout_s < 5 * KOMBU_RESTORE_PERIOD_S:   # look for expired messages at least 5 times per timeout
        options |= {"unacked_restore_interval": max(1.0, visibility_timeout_s / 5), "unacked_restore_throttle": 1}
    return options


def queue_length(queue: str) -> int:
    """Messages waiting on a queue (not those a worker holds): the queue depth `/metrics` reports."""
    with app.connection_for_read() as connection:
        return connection.default_channel.queue_declare(queue).message_count


def visibility_timeout_s() -> float:
    """BATCHGEN_VISIBILITY_TIMEOUT, as this process's app was made with."""
    return float(app.conf.broker_transport_options["visibility_timeout"])


def broker_key(name: str) -> str:
    """The Redis key of a queue, or of one of kombu's own lists: the transport puts its `global_keyprefix`
    before each name."""
    return f"{key_prefix()}:{name}"


def unacked_index_key() -> str:
    """Kombu's Redis transport keeps each unacknowledged message's delivery tag here, scored with the time it
    was taken; once that is older than the visibility timeout, the message goes back to its queue."""
    return broker_key("unacked_index")


def shards_on_broker(queue: str, pending: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of the `pending` (job id, shard index) pairs have a message waiting on `queue` or held
    unacknowledged by a worker, read in one snapshot. The queue itself is read only when it holds fewer
    messages than the pending shards that no worker holds, since a long queue costs every worker a read per
    heartbeat TTL; until then all count as there (a stale message, a duplicate or a cancelled job's, can
    hide a lost one until the workers drain it)."""
    redis = job_store().redis
    held, length = redis.pipeline().hvals(broker_key("unacked")).llen(broker_key(queue)).execute()
    found = pending & {_shard_of(json.loads(value)[0]) for value in held}
    if length >= len(pending - found):
        return pending
    held, waiting = redis.pipeline().hvals(broker_key("unacked")).lrange(broker_key(queue), 0, -1).execute()
    return pending & {_shard_of(message) for message in [json.loads(value)[0] for value in held]
                      + [json.loads(value) for value in waiting]}


def _shard_of(message: dict) -> tuple[str, int] | None:
    """(job id, shard index) of a shard task's message as kombu stores it in Redis; None for another task."""
    if message.get("headers", {}).get("task") != SHARD_TASK:
        return None
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    (job_id, shard_index), _, _ = json.loads(body)
    return job_id, shard_index


app = make_app()
