"""Work ahead: the host prepares the next call's inputs while the model runs this one.

A call's host work (decoding its images, the processor, tokenizing) takes seconds at 160 rows, as
long as its prefill; done in turn, the GPU waits for it before every call. `Ahead` does it in one
worker thread, in the order the calls will be made, so it overlaps the model's work on the call
before. One thread: the work is done in order and never twice at once, on a processor of its own
(`VLMAdapter.thread_copy`). What a call computes is unchanged; only when its inputs are made.

    with Ahead(lambda key: encode(key), enabled=True) as ahead:
        for k, key in enumerate(keys):
            inputs = ahead.get(key, then=keys[k + 1] if k + 1 < len(keys) else None)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Ahead(Generic[K, V]):
    """fn(key) for the key asked for now, with fn(then) started in the worker for the next one.

    enabled=False: fn runs in the caller's thread when asked, nothing ahead. An error raised by fn
    is raised by the `get` that asks for its key, as if fn had run there.
    """

    def __init__(self, fn: Callable[[K], V], enabled: bool = True) -> None:
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmloc-ahead") if enabled else None
        self._pending: dict[K, Future[V]] = {}

    def get(self, key: K, then: K | None = None) -> V:
        if self._pool is None:
            return self._fn(key)
        # asked for before the worker started it: it goes first in the worker's queue, then `then`
        now = self._pending.pop(key, None) or self._pool.submit(self._fn, key)
        for stale in [k for k in self._pending if k != then]:  # no longer coming (a batch split in a retry)
            self._pending.pop(stale).cancel()
        if then is not None and then not in self._pending:
            self._pending[then] = self._pool.submit(self._fn, then)
        return now.result()

    def close(self) -> None:
        """Drop work not yet started; wait for the one running (it may hold the processor)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()

    def __enter__(self) -> Ahead[K, V]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
