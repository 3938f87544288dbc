"""The TAP client: pyvo async jobs, run in a thread so the event loop never blocks.

pyvo's own `run_async` waits without an overall deadline (a job stuck in QUEUED hangs it) and gives up
on the first ReadTimeout while polling (pyvo #713). So the job is driven here: submit, RUN, poll the
UWS job with our own deadline, fetch, delete. Whole jobs are retried (tenacity) on transient failures
- connection errors, 5xx or HTML pages instead of VOTables (pyvo #403), transient ERROR phases - and
pyvo/requests exceptions are translated into `engine.exceptions` at this boundary.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import requests
import tenacity
from astropy.table import Table
from pyvo.dal import TAPService
from pyvo.dal.exceptions import DALFormatError, DALQueryError, DALServiceError
from pyvo.io import uws
from pyvo.utils.http import create_session

from engine.exceptions import TapJobError, TapTimeoutError, TapUnavailableError, TessMirrorError
from engine.plan.adql import columns_query
from engine.redact import redact
from engine.settings import MAST_TAP_URL, TapSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

FINAL_PHASES = frozenset({"COMPLETED", "ERROR", "ABORTED", "ARCHIVED"})
URL_HINT = "check tap.url / --tap-url"
# An ERROR phase whose message says the query itself is wrong will fail the same way again.
_QUERY_FAULT = re.compile(
    r"(?i)syntax|pars(e|ing)|unknown|not found|no such|invalid|ambiguous|adql|column|table"
)
# An answer that says "busy", not "wrong URL", in pyvo's /capabilities failure lines.
_BUSY_STATUS = re.compile(r": (429|5\d\d)\b")
# Consecutive failed status polls tolerated before the job counts as lost (pyvo #713: flaky polls).
POLL_FAILURES_ALLOWED = 3
# Tries for a job that ran out of time (stuck QUEUED, or EXECUTING forever): a fresh job may find a
# shorter queue, but every try costs a whole tap.job_timeout, so not `tap.retries` of them.
TIMEOUT_TRIES = 2


class _Transient(Exception):
    """A failure another try may cure; `error` is what to raise when the tries run out.

    `max_tries` caps the tries for this kind of failure below `tap.retries + 1` (None: no cap).
    """

    def __init__(self, error: TessMirrorError, *, max_tries: int | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.max_tries = max_tries


class _Cancelled(Exception):
    pass


class TapClient:
    """Runs ADQL on one TAP service. All methods are coroutines; pyvo runs in worker threads."""

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
        self._executor = executor
        self._session = session or create_session()
        self._backoff = backoff  # first wait between tries, seconds; doubles up to 60 s
        self._service_obj: TAPService | None = None
        self._hardlimit: int | None = None
        self._hardlimit_known = False
        self._columns: dict[str, set[str] | None] = {}

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

    async def has_columns(self, table: str, columns: set[str]) -> bool:
        """True when `table` exists and has every one of `columns` (compared case-insensitively)."""
        present = await self.columns(table)
        return present is not None and {c.lower() for c in columns} <= present

    # -- threads and retries ------------------------------------------------------------------------
    async def _in_thread(self, call: Callable[[threading.Event], T]) -> T:
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, call, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()  # the thread notices, aborts its job and returns soon
            # Nobody awaits the thread's answer any more; retrieve it so asyncio does not log
            # "Future exception was never retrieved" with a traceback at the user.
            future.add_done_callback(_discard_result)
            raise

    def _with_retries(self, attempt: Callable[..., T], *args: Any) -> T:
        cancel: threading.Event = args[-1]
        tries = self.settings.retries + 1

        def stop(state: tenacity.RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            cap = getattr(exc, "max_tries", None)
            return state.attempt_number >= (min(tries, cap) if cap else tries)

        retrying = tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=self._backoff, max=60),
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
            return retrying(attempt, *args)
        except _Transient as err:
            raise err.error from None
        except _Cancelled:
            raise TapJobError("the TAP job was cancelled") from None

    # -- one try -----------------------------------------------------------------------------------
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
        except Exception as err:  # an unparseable capabilities document: not a TAP service
            raise TapUnavailableError(
                f"the TAP service at {redact(self.url)} is not a TAP service: bad /capabilities ({err})",
                hint=URL_HINT,
            ) from None
        try:
            limit = service.hardlimit
        except DALServiceError:
            return None  # the service does not declare one
        try:
            return int(limit) if limit is not None and int(limit) > 0 else None
        except (TypeError, ValueError):
            return None

    def _run_once(self, query: str, maxrec: int | None, cancel: threading.Event) -> Table:
        service = self._service()
        try:
            job = service.submit_job(query, maxrec=maxrec)
        except DALServiceError as err:
            raise self._translate(err, "submitting a job") from None
        except requests.RequestException as err:
            raise self._translate(DALServiceError.from_except(err, self.url), "submitting a job") from None
        try:
            try:
                job.run()
            except DALServiceError as err:
                raise self._translate(err, "starting the job") from None
            phase = self._wait(job, cancel)
            if phase == "COMPLETED":
                return self._fetch(job, maxrec)
            raise self._job_failed(job, phase)
        finally:
            _delete_quietly(job)

    def _wait(self, job: Any, cancel: threading.Event) -> str:
        """Poll the job until a final phase, the deadline (TapTimeoutError) or cancellation."""
        settings = self.settings
        deadline = time.monotonic() + settings.job_timeout
        phase, failures, pause = "PENDING", 0, 0.1
        while True:
            if cancel.is_set():
                _abort_quietly(job)
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
                            f"the TAP service at {redact(self.url)} stopped answering about its job: {err}",
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
        response = self._session.get(job.url, params=params, timeout=timeout)
        if response.status_code >= 400:
            raise requests.HTTPError(f"HTTP {response.status_code} from the job's status", response=response)
        try:
            info = uws.parse_job(io.BytesIO(response.content))
        except Exception as err:  # HTML or garbage instead of a UWS document
            raise ValueError(f"the job status is not a UWS document ({err})") from None
        return str(info.phase or "UNKNOWN").upper()

    def _fetch(self, job: Any, maxrec: int | None) -> Table:
        try:
            job.phase  # noqa: B018 - refreshes the job document so its result URI is known
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # overflow is reported in meta, not as a warning
                results = job.fetch_result()
                table = results.to_table()
        except DALQueryError as err:
            raise self._query_error(str(err)) from None
        except DALFormatError as err:
            raise _Transient(
                TapJobError(
                    f"the TAP service at {redact(self.url)} answered a result that is not a VOTable: {err}"
                )
            ) from None
        except DALServiceError as err:
            raise self._translate(err, "fetching the result") from None
        except requests.RequestException as err:
            raise self._translate(DALServiceError.from_except(err, self.url), "fetching the result") from None
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
        except (DALServiceError, requests.RequestException):
            pass
        if phase == "ERROR":
            return self._query_error(message or "<no message from the server>")
        return _Transient(TapJobError(f"the TAP job at {redact(job.url)} ended {phase}: {redact(message)}"))

    def _query_error(self, message: str) -> Exception:
        error = TapJobError(
            f"the TAP service at {redact(self.url)} could not run the query: {redact(message)}",
            hint="if the query looks right, the service may be failing; try again later",
        )
        # A query fault fails again on every try; anything else may be the server's passing trouble.
        return error if _QUERY_FAULT.search(message) else _Transient(error)

    def _capabilities_error(self, err: DALServiceError) -> Exception:
        """pyvo reports a failed /capabilities without a code: one "- <url>: <why>" line per URL tried.

        Read those lines to tell "nothing answers" (retried) from "something answers, but it is not a
        TAP service" (a wrong URL: not retried).
        """
        if err.code:
            return self._translate(err, "reading /capabilities")
        tried = [line[2:].strip() for line in str(err).splitlines() if line.startswith("- ")]
        detail = redact("; ".join(tried) if tried else (str(err).splitlines() or [type(err).__name__])[0])
        where = f"the TAP service at {redact(self.url)}"
        if any("Connection failed" in line or "timed out" in line for line in tried):
            return _Transient(TapUnavailableError(f"{where} does not answer: {detail}", hint=URL_HINT))
        if any(_BUSY_STATUS.search(line) for line in tried):
            return _Transient(TapUnavailableError(f"{where} is unavailable: {detail}", hint=URL_HINT))
        return TapUnavailableError(
            f"{redact(self.url)} is not a TAP service: {detail}",
            hint="check tap.url / --tap-url: it should be the TAP base URL, e.g. " + MAST_TAP_URL,
        )

    def _translate(self, err: DALServiceError, doing: str) -> Exception:
        """DALServiceError -> our error, wrapped in _Transient when another try may help."""
        cause = getattr(err, "cause", None)
        code = err.code or 0
        where = f"the TAP service at {redact(self.url)}"
        text = redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        if isinstance(cause, requests.Timeout):
            return _Transient(TapUnavailableError(f"{where} timed out while {doing}: {text}", hint=URL_HINT))
        if isinstance(cause, requests.ConnectionError) or (not code and cause is not None):
            return _Transient(TapUnavailableError(f"{where} does not answer: {text}", hint=URL_HINT))
        if code == 429 or code >= 500:
            return _Transient(
                TapUnavailableError(f"{where} answered HTTP {code} while {doing}", hint=URL_HINT)
            )
        if code in (400, 422):
            return TapJobError(f"{where} refused the query (HTTP {code}): {text}")
        if code:
            return TapUnavailableError(
                f"{where} does not answer as a TAP service (HTTP {code} while {doing})", hint=URL_HINT
            )
        return TapUnavailableError(f"{where} does not answer: {text}", hint=URL_HINT)


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


def _discard_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
