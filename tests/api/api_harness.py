"""What the Batch API tests share beside their fixtures (a module of its own: `conftest` names a different module
depending on which test directories a run collects)."""
import socket

KEYS = ("sk-tenant-a-0123456789", "sk-tenant-b-9876543210")
MAX_UPLOAD_BYTES = 64 * 1024
SHARD_SIZE = 2


def free_port() -> int:
    """A loopback TCP port nothing listens on (just now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
