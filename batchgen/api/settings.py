"""What a `batchgen serve` deployment is configured with; read from the environment once at start.

  BATCHGEN_API_KEYS           comma-separated bearer keys; each key is a tenant of its own
  BATCHGEN_API_KEYS_FILE      a file of keys, one a line (# comments), read with or instead of BATCHGEN_API_KEYS
  BATCHGEN_API_STORAGE        where uploaded files and batch outputs live: a local directory or a pyarrow
                              filesystem URI (default: ~/.cache/batchgen/api, or under $BATCHGEN_CACHE)
  BATCHGEN_API_MAX_UPLOAD_BYTES   largest file accepted (default 200 MB, as OpenAI)
  BATCHGEN_API_MAX_REQUESTS   most lines in one batch file (default 50,000, as OpenAI)
  BATCHGEN_API_MODELS         comma-separated model names served besides the live workers' --model values
  BATCHGEN_API_MODEL_ALIASES  name=model pairs, comma-separated (gpt-4o-mini=default): a batch file may name
                              the alias; its job runs on the model
  BATCHGEN_API_SHARD_SIZE     rows per shard of a batch's job (default: the job default)
"""
import hashlib
import os
from dataclasses import dataclass, field

from batchgen.jobs.spec import DEFAULT_SHARD_SIZE

DEFAULT_MAX_UPLOAD_BYTES = 200 * 1000 * 1000
DEFAULT_MAX_REQUESTS = 50_000


@dataclass(frozen=True)
class ApiSettings:
    keys: tuple[str, ...]
    storage: str
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_requests: int = DEFAULT_MAX_REQUESTS
    models: tuple[str, ...] = ()
    model_aliases: dict[str, str] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE

    @classmethod
    def from_env(cls) -> "ApiSettings":
        keys = _split(os.environ.get("BATCHGEN_API_KEYS", ""))
        keys_file = os.environ.get("BATCHGEN_API_KEYS_FILE")
        if keys_file:
            with open(keys_file) as lines:
                keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        aliases = {}
        for pair in _split(os.environ.get("BATCHGEN_API_MODEL_ALIASES", "")):
            alias, sep, model = pair.partition("=")
            if not sep or not alias.strip() or not model.strip():
                raise ValueError(f"BATCHGEN_API_MODEL_ALIASES: {pair!r} is not name=model")
            aliases[alias.strip()] = model.strip()
        return cls(keys=tuple(keys), storage=os.environ.get("BATCHGEN_API_STORAGE") or _default_storage(),
                   max_upload_bytes=int(os.environ.get("BATCHGEN_API_MAX_UPLOAD_BYTES") or DEFAULT_MAX_UPLOAD_BYTES),
                   max_requests=int(os.environ.get("BATCHGEN_API_MAX_REQUESTS") or DEFAULT_MAX_REQUESTS),
                   models=tuple(_split(os.environ.get("BATCHGEN_API_MODELS", ""))), model_aliases=aliases,
                   shard_size=int(os.environ.get("BATCHGEN_API_SHARD_SIZE") or DEFAULT_SHARD_SIZE))


def tenant_of(key: str) -> str:
    """The name a key's files and batches are kept under: a digest, so the key itself is stored nowhere."""
    return hashlib.sha256(b"batchgen-tenant\0" + key.encode()).hexdigest()[:24]


def cache_salt_of(key: str) -> str:
    """The prefix-cache salt of a key's jobs: its own blocks are never served to another key's requests.
    Derived apart from the tenant name, so neither reveals the other or the key."""
    return hashlib.sha256(b"batchgen-cache-salt\0" + key.encode()).hexdigest()


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default_storage() -> str:
    from batchgen.default_model import cache_dir

    return str(cache_dir() / "api")
