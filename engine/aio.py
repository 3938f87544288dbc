"""Event-loop plumbing shared by the CLI and the blocking API."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

from engine.redact import describe_error, redact

log = logging.getLogger(__name__)


def quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log an error the loop caught outside any task as one line; the traceback only at DEBUG.

    asyncio's default handler prints a traceback for, say, a MemoryError raised while a transport
    read from its socket. The transfer that owned the socket fails on its own and is retried or
    recorded with its reason, so the user needs one line, never a traceback.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The loop that caught the error.
    context : dict
        asyncio's context: ``message`` and, usually, ``exception``.
    """
    err = context.get("exception")
    message = context.get("message") or "error in the event loop"
    try:
        if err is None:
            log.warning("%s", message)
        else:
            log.warning("%s: %s", message, describe_error(err))
            log.debug("traceback of the error above", exc_info=err)
    except MemoryError:
        pass  # nothing can be logged; the run stops with its one-line error once memory is back


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop whose uncaught errors are logged as one line (`quiet_exception_handler`)."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(quiet_exception_handler)
    return loop


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """An exception in a finalizer (`__del__`, a generator closed late): one line, never a traceback."""
    err = unraisable.exc_value
    try:
        shown = describe_error(err) if err is not None else "?"
        log.warning("ignored in %s: %s", redact(repr(unraisable.object))[:200], shown)
        log.debug("traceback of the error above", exc_info=err)
    except MemoryError:
        pass


def _quiet_thread_error(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread of ours: one line naming the thread; traceback at DEBUG."""
    if args.exc_type is SystemExit:
        return
    err = args.exc_value
    name = args.thread.name if args.thread is not None else "?"
    try:
        shown = describe_error(err) if err is not None else args.exc_type.__name__
        log.warning("thread %s stopped: %s", name, shown)
        log.debug("traceback of the error above", exc_info=err)
    except MemoryError:
        pass


def quiet_process_hooks() -> None:
    """Route the interpreter's last-resort error printers through `logging` as one line each.

    For the command-line tool only (a library must not take over a notebook's hooks): an error in a
    finalizer or a thread is otherwise printed with a traceback on stderr, where the user was promised
    one line per problem.
    """
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_thread_error
