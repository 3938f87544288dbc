"""The TAP client: pyvo async jobs, run in worker threads so the event loop never blocks.

Why our own UWS driver and not pyvo's `run_async`: pyvo >= 1.8.1 gives `run_async(timeout=)` (an
overall wait) and 1.8 `fetch_result(max_retries=)`, but neither bounds each HTTP request, and neither
can be cancelled from outside while it waits. So the job is driven here: submit, RUN, poll the UWS job
with our own deadline, fetch, delete. Whole jobs are retried (tenacity) on transient failures -
connection errors, timeouts, 429/5xx, HTML pages or cut-off documents instead of VOTables (pyvo
#403), transient ERROR phases - and pyvo/requests/parser exceptions are translated into
`engine.exceptions` at this boundary, so nothing else ever reaches the CLI (exit 3, never 70).

Timeouts: every request pyvo or we send goes through `TapHttpSession`, which gives it a connect
timeout and a read (idle) timeout of `tap.request_timeout` seconds; pyvo's own shorter timeouts are
kept, longer ones are cut to ours. A service that accepts connections and never answers therefore
costs at most `request_timeout` per request, and the whole job at most `tap.retries + 1` tries.

Cancellation: the coroutines return at once when cancelled; the worker thread sees the cancel event
at its next request or poll and gives up (a request already in flight ends within its timeout).
Worker threads are daemon threads (`DaemonExecutor`), so the interpreter never waits for a thread
stuck on a silent service at exit; `TapClient.close()` cancels everything in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import requests
import tenacity
import urllib3.exceptions
from astropy.table import Table
from pyvo.dal import TAPService
from pyvo.dal.exceptions import DALFormatError, DALQueryError, DALServiceError
from pyvo.io import uws
from pyvo.utils.http import create_session

from engine.exceptions import TapJobError, TapTimeoutError, TapUnavailableError, TessMirrorError
from engine.plan.adql import columns_query
from engine.redact import describe_error, redact
from engine.settings import MAST_TAP_URL, TapSettings

try:  # pyvo >= 1.8.1 raises this for HTTP 429, with the server's Retry-After
    from pyvo.dal.exceptions import DALRateLimitError
except ImportError:  # pragma: no cover - older pyvo: a 429 is a plain DALServiceError with code 429

    class DALRateLimitError(DALServiceError):  # type: ignore[no-redef]  # stands in for pyvo's own
        retry_after_seconds: float | None = None


log = logging.getLogger(__name__)
T = TypeVar("T")

FINAL_PHASES = frozenset({"COMPLETED", "ERROR", "ABORTED", "ARCHIVED"})
URL_HINT = "check tap.url / --tap-url"
BUSY_HINT = "the service is failing or overloaded: try again later, or raise tap.request_timeout"
# An ERROR phase whose message says the query itself is wrong will fail the same way again. pyvo has
# no exception type for this (an ERROR phase is always DALQueryError), so the server's text decides.
_QUERY_FAULT = re.compile(
    r"(?i)syntax|pars(e|ing)|unknown|not found|no such|invalid|ambiguous|adql|column|table"
)
# pyvo reports a failed /capabilities as one "- <url>: <why>" line per URL tried, without a code;
# a 429 there is a DALRateLimitError, other statuses only appear in these lines.
_BUSY_STATUS = re.compile(r": (?:HTTP Code: )?(5\d\d)\b")
# Consecutive failed status polls tolerated before the job counts as lost (pyvo #713: flaky polls).
POLL_FAILURES_ALLOWED = 3
# Tries for a job that ran out of time (stuck QUEUED, or EXECUTING forever): a fresh job may find a
# shorter queue, but every try costs a whole tap.job_timeout, so not `tap.retries` of them.
TIMEOUT_TRIES = 2
# Tries for a /capabilities document that does not parse: one more cures an answer cut short, and a
# wrong URL (an HTML page) is not worth `tap.retries` of them.
GARBLED_CAPABILITIES_TRIES = 2
RETRY_AFTER_MAX = 120.0  # never wait longer than this on a server's Retry-After
DEFAULT_WORKERS = 4  # TAP calls in flight at once per client: the planner asks a few at a time


class _Transient(Exception):
    """A failure another try may cure; `error` is what to raise when the tries run out.

    `max_tries` caps the tries for this kind of failure below `tap.retries + 1` (None: no cap);
    `retry_after` is the server's own wait (Retry-After), seconds.
    """

    def __init__(
        self, error: TessMirrorError, *, max_tries: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.max_tries = max_tries
        self.retry_after = retry_after


class _Cancelled(Exception):
    pass


# -- the HTTP session --------------------------------------------------------------------------------
_current = threading.local()  # .cancel: the threading.Event of the TAP call this thread runs


class TapHttpSession(requests.Session):
    """A requests.Session whose every request has connect and read timeouts, and stops when cancelled.

    Parameters
    ----------
    timeout
        Seconds for connecting and for each wait on the socket (an idle timeout, not a total one).

    A request without a timeout gets ``(timeout, timeout)``; a number (pyvo's own poll defaults) is
    cut to `timeout`; a ``(connect, read)`` tuple is used as given (our UWS polls, which the server
    may hold for WAIT seconds). A request made by a thread whose TAP call was cancelled is not sent.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = float(timeout)
        self.headers["User-Agent"] = create_session().headers["User-Agent"]  # pyvo's IVOA softid agent

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        cancel: threading.Event | None = getattr(_current, "cancel", None)
        if cancel is not None and cancel.is_set():
            raise _Cancelled()
        timeout = kwargs.get("timeout")
        if timeout is None:
            kwargs["timeout"] = (self.timeout, self.timeout)
        elif isinstance(timeout, (int, float)):
            kwargs["timeout"] = (self.timeout, min(float(timeout), self.timeout))
        return super().request(method, url, *args, **kwargs)


# -- the threads -------------------------------------------------------------------------------------
class DaemonExecutor(Executor):
    """A small thread pool of daemon threads.

    Why not ThreadPoolExecutor: its threads are joined when the interpreter exits, so one thread
    blocked on a silent service would hold the process after the CLI has finished. Daemon threads
    are not waited for; `shutdown(wait=False, cancel_futures=True)` drops the queued calls.
    """

    def __init__(self, max_workers: int = DEFAULT_WORKERS, *, name: str = "tap") -> None:
        self._max_workers = max(int(max_workers), 1)
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._guard = threading.Lock()
        self._idle = 0  # workers waiting for a call
        self._pending = 0  # calls queued, not yet taken
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._guard:
            if self._shutdown:
                raise RuntimeError("cannot schedule new TAP calls after shutdown")
            self._work.put((future, functools.partial(fn, *args, **kwargs)))
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _worker(self) -> None:
        while True:
            with self._guard:
                if self._shutdown:
                    return
                self._idle += 1
            item = self._work.get()
            with self._guard:
                self._idle -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:
                return
            future, call = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as err:
                    future.set_exception(err)
            del future, call  # drop references before waiting for the next call

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class TapClient:
    """Runs ADQL on one TAP service. All methods are coroutines; pyvo runs in worker threads.

    Parameters
    ----------
    url
        The TAP base URL.
    settings
        Retries, deadlines and `request_timeout` (connect and idle timeout of every request).
    executor
        Where the blocking pyvo calls run; default: a `DaemonExecutor` of this client's own, shut down
        by `close()`.
    session
        The requests session for every request; default: a `TapHttpSession` with the timeouts.
    backoff
        The first wait between tries, seconds; it doubles up to 60 s.
    """

    def __init__(
        self,
        url: str,
        *,
        settings: TapSettings,
        executor: Executor | None = None,
        session: requests.Session | None = None,
        backoff: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.settings = settings
        self._own_executor = executor is None
        self._executor: Executor = executor or DaemonExecutor(name="tap")
        self._session = session or TapHttpSession(settings.request_timeout)
        self._backoff = backoff
        self._service_obj: TAPService | None = None
        self._hardlimit: int | None = None
        self._hardlimit_known = False
        self._columns: dict[str, set[str] | None] = {}
        self._in_flight: set[threading.Event] = set()
        self._closed = False

    # -- public coroutines ------------------------------------------------------------------------
    async def run(self, query: str, *, maxrec: int | None = None) -> Table:
        """Run `query` as an async TAP job and return its result table.

        `table.meta["overflow"]` is True when the service marked the result QUERY_STATUS=OVERFLOW
        (there may be more rows than returned); `table.meta["maxrec"]` is the maxrec asked for.
        """
        return await self._in_thread(functools.partial(self._with_retries, self._run_once, query, maxrec))

    async def hardlimit(self) -> int | None:
        """The service's hard row limit from /capabilities, or None when it does not say. Cached."""
        if not self._hardlimit_known:
            self._hardlimit = await self._in_thread(
                functools.partial(self._with_retries, self._read_hardlimit)
            )
            self._hardlimit_known = True
        return self._hardlimit

    async def columns(self, table: str) -> set[str] | None:
        """Lower-cased column names of `table` from TAP_SCHEMA.columns; None when it has none. Cached."""
        if table not in self._columns:
            result = await self.run(columns_query(table))
            names = {str(name).lower() for name in result["column_name"]} if len(result) else None
            self._columns[table] = names
        return self._columns[table]

    def close(self) -> None:
        """Cancel every call in flight and stop this client's threads without waiting for them.

        Safe from any thread and idempotent. A thread blocked in a request ends within
        `tap.request_timeout`; being a daemon thread it never holds the process at exit meanwhile.
        """
        self._closed = True
        for cancel in list(self._in_flight):
            cancel.set()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- threads and retries ------------------------------------------------------------------------
    async def _in_thread(self, call: Callable[[threading.Event], T]) -> T:
        if self._closed:
            raise TapJobError("the TAP client was closed")
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        self._in_flight.add(cancel)  # before the thread starts, so a fast call cannot leave it behind
        try:
            work = self._executor.submit(_bound_to, cancel, call)
        except RuntimeError as err:
            self._in_flight.discard(cancel)
            if "can't start new thread" in str(err):
                raise  # the machine is out of threads or address space: the run maps it to exit 4
            # The executor was shut down under us: the run is ending.
            raise TapJobError("the TAP client was closed") from None

        def relay(done: Future[T]) -> None:
            # In the worker thread. The loop may be closed by now (the CLI finished without this
            # thread): then nobody waits for the answer, and it is dropped without a word.
            self._in_flight.discard(cancel)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_copy_outcome, done, answer)

        work.add_done_callback(relay)
        try:
            return await answer
        except asyncio.CancelledError:
            cancel.set()  # the thread notices at its next request or poll, and returns
            raise

    def _with_retries(self, attempt: Callable[..., T], *args: Any) -> T:
        cancel: threading.Event = args[-1]
        tries = self.settings.retries + 1

        def stop(state: tenacity.RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            cap = getattr(exc, "max_tries", None)
            return state.attempt_number >= (min(tries, cap) if cap else tries)

        exponential = tenacity.wait_exponential(multiplier=self._backoff, max=60)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            asked = getattr(exc, "retry_after", None)
            return max(exponential(state), min(asked, RETRY_AFTER_MAX) if asked else 0.0)

        def checked(*call_args: Any) -> T:
            try:
                return attempt(*call_args)
            except (_Transient, _Cancelled, TessMirrorError):
                raise
            except Exception:
                # pyvo turns anything, even our refusal to send a request, into its own errors.
                if cancel.is_set():
                    raise _Cancelled() from None
                raise
            finally:
                if cancel.is_set():
                    raise _Cancelled()

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=lambda seconds: _sleep_unless(cancel, seconds),
            before_sleep=lambda state: log.warning(
                "TAP: %s; trying again (%d of %d)",
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number,
                self.settings.retries,
            ),
            reraise=True,
        )
        try:
            return retrying(checked, *args)
        except _Transient as err:
            raise err.error from None
        except _Cancelled:
            raise TapJobError("the TAP job was cancelled") from None

    # -- one try -----------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"the TAP service at {redact(self.url)}"

    def _service(self) -> TAPService:
        if self._service_obj is None:
            try:
                self._service_obj = TAPService(self.url, session=self._session)
            except DALServiceError as err:
                raise self._translate(err, "connecting") from None
        return self._service_obj

    def _read_hardlimit(self, cancel: threading.Event) -> int | None:
        service = self._service()
        try:
            service.capabilities  # noqa: B018 - fetches /capabilities; fails for a non-TAP URL
        except DALServiceError as err:
            raise self._capabilities_error(err) from None
        except (_Cancelled, TessMirrorError):
            raise
        except Exception as err:  # a document that does not parse: garbage, or cut short
            raise _Transient(
                TapUnavailableError(
                    f"{self._where()} is not a TAP service or sent a broken answer: "
                    f"bad /capabilities ({describe_error(err)})",
                    hint=URL_HINT,
                ),
                max_tries=GARBLED_CAPABILITIES_TRIES,
            ) from None
        try:
            limit = service.hardlimit
        except DALServiceError:
            return None  # the service does not declare one
        try:
            return int(limit) if limit is not None and int(limit) > 0 else None
        except (TypeError, ValueError):
            return None

    def _call(self, doing: str, action: Callable[[], T]) -> T:
        """Run one pyvo step, translating whatever it raises into our errors."""
        try:
            return action()
        except (_Transient, _Cancelled, TessMirrorError):
            raise
        except DALQueryError as err:
            raise self._query_error(str(err).removeprefix("Query Error: ")) from None
        except DALServiceError as err:
            raise self._translate(err, doing) from None
        except requests.RequestException as err:
            raise self._translate(DALServiceError.from_except(err, self.url), doing) from None
        except Exception as err:  # a cut connection mid-document, or a document that does not parse
            raise self._broken(err, doing) from None

    def _run_once(self, query: str, maxrec: int | None, cancel: threading.Event) -> Table:
        service = self._service()
        job = self._call("submitting a job", lambda: service.submit_job(query, maxrec=maxrec))
        try:
            self._call("starting the job", job.run)
            phase = self._wait(job, cancel)
            if phase == "COMPLETED":
                return self._fetch(job, maxrec)
            raise self._job_failed(job, phase)
        finally:
            if not cancel.is_set():
                _delete_quietly(job)  # cancelled: no further request; the service expires the job

    def _wait(self, job: Any, cancel: threading.Event) -> str:
        """Poll the job until a final phase, the deadline (TapTimeoutError) or cancellation."""
        settings = self.settings
        deadline = time.monotonic() + settings.job_timeout
        phase, failures, pause = "PENDING", 0, 0.1
        while True:
            if cancel.is_set():
                raise _Cancelled()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _abort_quietly(job)
                raise _Transient(
                    TapTimeoutError(
                        f"the TAP job at {redact(job.url)} was still {phase} after "
                        f"{settings.job_timeout:g} s",
                        hint="the service is busy; try again later, or raise tap.job_timeout",
                    ),
                    max_tries=TIMEOUT_TRIES,
                )
            # Ask the server to hold the poll (UWS 1.1 WAIT) for less than our read timeout, so a
            # slow answer is not mistaken for a lost connection.
            wait = int(min(settings.poll_timeout / 2, remaining))
            started = time.monotonic()
            try:
                phase = self._poll(job, wait=wait, timeout=max(0.05, min(settings.poll_timeout, remaining)))
                failures = 0
            except (requests.RequestException, ValueError) as err:
                failures += 1
                if failures > POLL_FAILURES_ALLOWED:
                    raise _Transient(
                        TapUnavailableError(
                            f"{self._where()} stopped answering about its job: {describe_error(err)}",
                            hint=URL_HINT,
                        )
                    ) from None
            if phase in FINAL_PHASES:
                return phase
            # A server that ignores WAIT answers at once: back off instead of spinning.
            if time.monotonic() - started < max(wait, 0.05) / 2:
                _sleep_unless(cancel, min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 1.5, 5.0)

    def _poll(self, job: Any, *, wait: int, timeout: float) -> str:
        params = {"WAIT": str(wait)} if wait >= 1 else None
        connect = min(self.settings.request_timeout, timeout)
        try:
            response = self._session.get(job.url, params=params, timeout=(connect, timeout))
        except requests.RequestException:
            raise
        except Exception as err:  # urllib3/http.client errors that requests does not wrap
            raise ValueError(describe_error(err)) from None
        if response.status_code >= 400:
            raise requests.HTTPError(f"HTTP {response.status_code} from the job's status", response=response)
        try:
            info = uws.parse_job(io.BytesIO(response.content))
        except Exception as err:  # HTML or garbage instead of a UWS document
            raise ValueError(f"the job status is not a UWS document ({describe_error(err)})") from None
        return str(info.phase or "UNKNOWN").upper()

    def _fetch(self, job: Any, maxrec: int | None) -> Table:
        def fetch() -> tuple[Any, Table]:
            job.phase  # noqa: B018 - refreshes the job document so its result URI is known
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # overflow is reported in meta, not as a warning
                results = job.fetch_result()
                return results, results.to_table()

        try:
            results, table = self._call("fetching the result", fetch)
        except DALFormatError as err:  # pragma: no cover - _call turns it into a broken answer
            raise self._broken(err, "fetching the result") from None
        status = str(results.query_status or getattr(results, "_status", ("",))[0] or "").upper()
        table.meta["overflow"] = status == "OVERFLOW"
        table.meta["maxrec"] = maxrec
        return table

    def _job_failed(self, job: Any, phase: str) -> Exception:
        message = ""
        try:
            job.phase  # noqa: B018 - refresh, to read the error summary
            job.raise_if_error()
        except DALQueryError as err:
            message = str(err).removeprefix("Query Error: ")
        except _Cancelled:
            raise
        except Exception as err:  # the summary is a courtesy: any failure to read it leaves it empty
            log.debug("TAP: could not read the error summary of %s: %s", redact(job.url), err)
        if phase == "ERROR":
            return self._query_error(message or "<no message from the server>")
        return _Transient(TapJobError(f"the TAP job at {redact(job.url)} ended {phase}: {redact(message)}"))

    def _query_error(self, message: str) -> Exception:
        error = TapJobError(
            f"{self._where()} could not run the query: {redact(message)}",
            hint="if the query looks right, the service may be failing; try again later",
        )
        # A query fault fails again on every try; anything else may be the server's passing trouble.
        # The planner reads the same verdict from `query_fault`, never by parsing this message again.
        error.query_fault = bool(_QUERY_FAULT.search(message))
        return error if error.query_fault else _Transient(error)

    def _broken(self, err: BaseException, doing: str) -> _Transient:
        """A cut connection or an answer that does not parse (HTML, half a VOTable): retried."""
        if _is_timeout(err):
            return _Transient(
                TapUnavailableError(
                    f"{self._where()} did not answer within {self.settings.request_timeout:g} s "
                    f"while {doing}",
                    hint=BUSY_HINT,
                )
            )
        return _Transient(
            TapUnavailableError(
                f"{self._where()} sent a broken answer while {doing}: {describe_error(err)}", hint=BUSY_HINT
            )
        )

    def _capabilities_error(self, err: DALServiceError) -> Exception:
        """pyvo reports a failed /capabilities without a code: one "- <url>: <why>" line per URL tried.

        Read those lines to tell "nothing answers" (retried) from "something answers, but it is not a
        TAP service" (a wrong URL: not retried). A 429 comes as pyvo's DALRateLimitError.
        """
        if isinstance(err, DALRateLimitError) or err.code:
            return self._translate(err, "reading /capabilities")
        tried = [line[2:].strip() for line in str(err).splitlines() if line.startswith("- ")]
        detail = redact("; ".join(tried) if tried else (str(err).splitlines() or [type(err).__name__])[0])
        where = self._where()
        if tried and all("timed out" in line for line in tried):
            return _Transient(
                TapUnavailableError(
                    f"{where} did not answer within {self.settings.request_timeout:g} s "
                    "while reading /capabilities",
                    hint=BUSY_HINT,
                )
            )
        if any("Connection failed" in line or "timed out" in line for line in tried):
            return _Transient(TapUnavailableError(f"{where} does not answer: {detail}", hint=URL_HINT))
        if any(_BUSY_STATUS.search(line) for line in tried):
            return _Transient(TapUnavailableError(f"{where} is unavailable: {detail}", hint=URL_HINT))
        if not tried:  # pyvo wrapped something it met on the way: a cut or garbled answer
            return self._broken(err, "reading /capabilities")
        return TapUnavailableError(
            f"{redact(self.url)} is not a TAP service: {detail}",
            hint="check tap.url / --tap-url: it should be the TAP base URL, e.g. " + MAST_TAP_URL,
        )

    def _translate(self, err: DALServiceError, doing: str) -> Exception:
        """DALServiceError -> our error, wrapped in _Transient when another try may help."""
        cause = getattr(err, "cause", None)
        code = err.code or 0
        where = self._where()
        text = redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        if isinstance(err, DALRateLimitError) or code == 429:
            wait = getattr(err, "retry_after_seconds", None)
            return _Transient(
                TapUnavailableError(
                    f"{where} answered HTTP 429 (too many requests) while {doing}", hint=BUSY_HINT
                ),
                retry_after=float(wait) if isinstance(wait, (int, float)) and wait > 0 else None,
            )
        if isinstance(cause, requests.Timeout):
            return _Transient(
                TapUnavailableError(
                    f"{where} did not answer within {self.settings.request_timeout:g} s while {doing}",
                    hint=BUSY_HINT,
                )
            )
        if isinstance(cause, requests.ConnectionError):
            return _Transient(TapUnavailableError(f"{where} does not answer: {text}", hint=URL_HINT))
        if not code and cause is not None:
            return self._broken(cause, doing)
        if code >= 500:
            return _Transient(
                TapUnavailableError(f"{where} answered HTTP {code} while {doing}", hint=URL_HINT)
            )
        if code in (400, 422):
            refused = TapJobError(f"{where} refused the query (HTTP {code}): {text}")
            refused.query_fault = True
            return refused
        if code:
            return TapUnavailableError(
                f"{where} does not answer as a TAP service (HTTP {code} while {doing})", hint=URL_HINT
            )
        # No code and no cause: pyvo's own complaint about what it received (e.g. no result URI).
        return _Transient(
            TapUnavailableError(f"{where} sent a broken answer while {doing}: {text}", hint=BUSY_HINT)
        )


def _bound_to(cancel: threading.Event, call: Callable[[threading.Event], T]) -> T:
    """Run `call(cancel)` with `cancel` visible to TapHttpSession in this thread."""
    _current.cancel = cancel
    try:
        return call(cancel)
    finally:
        _current.cancel = None


def _is_timeout(err: BaseException | None) -> bool:
    """True when `err`, or an exception it was raised from, is a socket, urllib3 or requests timeout."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _sleep_unless(cancel: threading.Event, seconds: float) -> None:
    if cancel.wait(seconds):
        raise _Cancelled()


def _abort_quietly(job: Any) -> None:
    try:
        job.abort()
    except Exception as err:  # best effort: the job is being abandoned anyway
        log.debug("TAP: could not abort %s: %s", redact(job.url), err)


def _delete_quietly(job: Any) -> None:
    try:
        if job.url:
            job.delete()
    except Exception as err:  # best effort: the service expires jobs itself
        log.debug("TAP: could not delete a job: %s", err)


def _copy_outcome(done: Future[T], answer: asyncio.Future[T]) -> None:
    """Pass a worker's outcome to the coroutine waiting for it (in the loop's thread)."""
    if answer.cancelled():
        return  # the caller gave up; the outcome (a result or an error) is not anyone's concern
    if done.cancelled():  # dropped from the queue by close(): the caller was not cancelled, the client was
        answer.set_exception(TapJobError("the TAP client was closed"))
    elif (error := done.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())
