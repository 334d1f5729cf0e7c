"""The job service's tests run against the real Redis on 127.0.0.1:6379 in a key namespace of their own
(BATCHGEN_PREFIX, which also prefixes Celery's queues), set before batchgen.workers is imported. The same
guard sits in tests/e2e/conftest.py: whichever directory loads first names the session's namespace."""
import os
import uuid

import pytest

os.environ["BATCHGEN_REDIS_URL"] = "redis://127.0.0.1:6379/0"
if not os.environ.get("BATCHGEN_PREFIX", "").startswith("bgtest-"):
    os.environ["BATCHGEN_PREFIX"] = f"bgtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session", autouse=True)
def _clean_redis_namespace():
    """Drop every key this session wrote (job store and Celery's) when it ends."""
    yield
    import redis

    client = redis.Redis.from_url(os.environ["BATCHGEN_REDIS_URL"])
    keys = list(client.scan_iter(match=os.environ["BATCHGEN_PREFIX"] + ":*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
