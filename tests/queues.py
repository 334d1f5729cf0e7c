"""What the tests ask the broker: how many messages wait on a queue."""
from batchgen.workers.app import app


def queue_length(queue: str) -> int:
    """Messages waiting on a queue (not those a worker holds)."""
    with app.connection_for_read() as connection:
        return connection.default_channel.queue_declare(queue).message_count
