"""One engine, many callers: a thread runs the step loop while caller threads (a worker's shard tasks) hand it
work and wait for their own results. The next shard's requests join the running batch while the current
shard's last ones finish, so the GPU never drains between shards.

Only the loop thread steps the engine and adds or aborts its requests; callers talk to it through two lists
under a lock. Caller threads use the engine only to check and build their requests and to read their finished
outputs (`LLM.run_requests`), and the tokenizer, which is safe to share (batchgen.tokenizer).
"""
import logging
import threading
from collections.abc import Callable, Sequence

from batchgen.engine.errors import Cancelled
from batchgen.engine.request import Request
from batchgen.outputs import RequestOutput
from batchgen.sampling_params import SamplingParams

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5


class _Call:
    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.unfinished = len(requests)
        self.done = threading.Event()
        self.error: BaseException | None = None


class EngineLoop:
    def __init__(self, llm):
        self.llm = llm
        self._lock = threading.Condition()
        self._new_calls: list[_Call] = []
        self._cancelled_calls: list[_Call] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run_forever, name="batchgen-engine", daemon=True)
        self._thread.start()

    def generate_tokens(self, prompts: Sequence[list[int] | Exception],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        cache_salt: str | None = None) -> list[RequestOutput]:
        """`LLM.generate_tokens`, safe to call from several threads at once. Raises Cancelled when
        `should_stop()` turns true before the results are in."""
        return self.llm.run_requests(prompts, sampling_params, lambda requests: self._run(requests, should_stop),
                                     cache_salt)

    def close(self) -> None:
        """Stop the loop thread (calls still in flight fail) and close the engine (its grammar threads)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join()
        self.llm.close()

    def _run(self, requests: list[Request], should_stop: Callable[[], bool] | None) -> None:
        call = _Call(requests)
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine loop was closed")
            self._new_calls.append(call)
            self._lock.notify()
        while not call.done.wait(CANCEL_POLL_S):
            if should_stop is not None and should_stop():
                with self._lock:
                    self._cancelled_calls.append(call)
                    self._lock.notify()
                call.done.wait()
                raise Cancelled()
        if call.error is not None:
            raise call.error

    def _run_forever(self) -> None:
        engine = self.llm.engine
        owners: dict[Request, _Call] = {}
        while True:
            with self._lock:
                while not (self._new_calls or self._cancelled_calls or engine.has_unfinished() or self._closing):
                    self._lock.wait()
                if self._closing:
                    self._fail(set(owners.values()) | set(self._new_calls), RuntimeError("the engine loop was closed"))
                    return
                new_calls, self._new_calls = self._new_calls, []
                cancelled_calls, self._cancelled_calls = self._cancelled_calls, []
            for call in new_calls:
                for request in call.requests:
                    owners[request] = call
                    engine.add_request(request)
                if not call.requests:
                    call.done.set()
            for call in cancelled_calls:
                engine.abort(call.requests)
                for request in call.requests:
                    owners.pop(request, None)
                call.done.set()
            if not engine.has_unfinished():
                continue
            try:
                finished = engine.step()
            except Exception as exc:   # EngineBroken, or a bug: step isolates per-request failures itself
                log.exception("engine step failed; failing every call in flight")
                self._fail(set(owners.values()), exc)
                owners.clear()
                continue
            for request in finished:
                call = owners.pop(request, None)
                if call is not None:
                    call.unfinished -= 1
                    if call.unfinished == 0:
                        call.done.set()

    def _fail(self, calls: set[_Call], error: BaseException) -> None:
        for call in calls:
            self.llm.engine.abort(call.requests)
            call.error = error
            call.done.set()
