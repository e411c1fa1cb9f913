from collections.abc import Callable
from typing import Any

__all__ = ["NATIVE", "guard_forks", "serve", "serve_batch", "watch_lifeline"]

NATIVE: bool

def serve(
    fd: int,
    slot: Any,
    unpack: Callable[[Any], Any],
    handler: Any,
    on_error: Callable[[int, bytes], Any],
    on_bad_frame: Callable[[int, bytes, Exception], Any],
    chunk: int = 1048576,
) -> None: ...
def serve_batch(
    data: Any,
    slot: Any,
    unpack: Callable[[Any], Any],
    handler: Any,
    on_error: Callable[[int, bytes], Any],
    on_bad_frame: Callable[[int, bytes, Exception], Any],
    stamps: Any,
) -> int: ...
def watch_lifeline(fd: int) -> None: ...
def guard_forks(data_fd: int, ret_fd: int) -> None: ...
