"""LocalArchive: the MAST-shaped archive (CAOM TAP + file downloads) on 127.0.0.1.

    async with LocalArchive(ArchiveOptions(sectors=[1], targets=200, file_size="small")) as archive:
        archive.tap_url, archive.catalog, archive.request_log

`ArchiveThread` runs one in a background thread for synchronous callers and tests; `serve_forever`
runs one until SIGINT/SIGTERM for the CLI's `tessmirror archive serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.archive.catalog import Catalog, Shape, build_catalog
from engine.archive.columns import INDEXED_COLUMNS, OBSCORE_META
from engine.archive.faults import FaultPlan
from engine.archive.ffigen import ffi_dims
from engine.archive.files import FileServer, FileStore, RequestRecord, S3Shape
from engine.archive.fitsgen import cadences_for

if TYPE_CHECKING:  # tap.py pulls in astropy's VOTable writer; __aenter__ imports it when needed
    from engine.archive.tap import TapOptions
    from engine.archive.tapdb import TapDatabase

TAP_PATH = "/vo-tap/api/v0.1/caom"


@dataclass
class ArchiveOptions:
    """What the archive holds and how it misbehaves. See `catalog.build_catalog` for the content."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    sectors: Sequence[int] = range(1, 14)
    # TIC targets, spread evenly over every CCD of every sector. sectors=[1] with targets=40_000 puts
    # ~2,500 light curves in sector 1 / camera 1 / CCD 2, the notebook's count; the default is lighter.
    targets: int = 2_000
    file_size: str | int = "full"  # "full" (2,039,040-byte light curves), "small", or a cadence count
    seed: int = 0
    data_dir: Path | None = None  # where files are materialised; None: a temporary directory
    faults: FaultPlan = field(default_factory=FaultPlan)
    tap_default_maxrec: int = 100_000
    tap_hard_limit: int = 100_000
    tap_max_wait: float = 30.0
    # False: the TAP database has no dbo.caomplane / dbo.caomartifact (tables, TAP_SCHEMA rows, /tables),
    # as on a service that only publishes ObsCore; clients must fall back to access_estsize. The file
    # server and `catalog` (the truth) are unchanged.
    artifacts: bool = True
    # True: add light curves with hostile file names / obs_ids (catalog.HOSTILE_NAMES, HOSTILE_OBS_IDS)
    # inside the notebook's footprint; the file server answers them with ordinary bytes.
    hostile_names: bool = False
    # (sector, camera, ccd): place every target in that one footprint (a dense notebook query
    # without generating the whole sky). Other sectors whose footprints hold them still list them.
    focus: tuple[int, int, int] | None = None

    # -- the real service's shapes (docs/MAST_MODEL.md). The defaults have MAST's many FFI exposures per
    # CCD and keep the rest of the first release's shape; `ArchiveOptions.mast_like()` gives all of
    # MAST's (per-product rows, redirects, chunked answers, NULLs). --
    # FFI observations per (sector, camera, CCD): one CAOM observation + ObsCore row per exposure,
    # obs_ids a cadence apart (30 min in sectors 1-26, 10 min in 27-55, 200 s after), polygons
    # shifted by up to a few arcsec; the middle one (n // 2 in obs_id order) is the CCD footprint
    # the targets were placed in. MAST: ~1,300 per CCD at 30 min; here 1-10,000.
    exposures_per_ccd: int = 300
    # True: every FFI exposure has `<obs_id>_ffic.fits` and `_ffir.fits` (planes, artifacts, files).
    ffi_files: bool = False
    # FFI file size: "small" (16x16 pixels: 17,280 bytes for ffic), "full" (2136x2078, ~35 MB), or
    # a side in pixels.
    ffi_file_size: str | int = "small"
    # True: one ivoa.obscore row per product file (lc, tp, dvt; ffic, ffir), same obs_id, each with
    # its own access_url and access_estsize. False: one row per observation (the light curve).
    obscore_per_product: bool = False
    # access_url form: "uri" ({base}/api/v0.1/Download/file?uri=mast:TESS/product/FILE) or "path"
    # ({base}/files/tess/tid/s0001/.../FILE, archive.stsci.edu's tree). Both are always served.
    url_form: str = "uri"
    # True: the Download API answers 302 to a second host:port (`archive.s3_url`) that serves
    # /stpubdata/tess/public/... with the md5 as ETag, as MAST redirects to S3.
    redirect_to_s3: bool = False
    # True: the second host also acts as the bucket for clients that go to it directly (`--source s3`):
    # it is started even without redirects, answers S3's XML errors for keys left out, and the API host
    # serves MAST's path_lookup (see files.S3Shape). The knobs below shape it.
    s3: bool = False
    s3_multipart_fraction: float = 0.0  # objects whose ETag is multipart-style (`<hex>-<parts>`)
    s3_missing_fraction: float = 0.0  # files left out of the bucket (a coin by seed and name)
    s3_missing_names: tuple[str, ...] = ()  # and these file names
    s3_missing_error: str = "NoSuchKey"  # what a missing key answers: NoSuchKey (404) or AccessDenied (403)
    path_lookup: bool = True  # with s3: serve /api/v0.1/path_lookup/ (False: 404, as other archives)
    path_lookup_disagrees: bool = False  # path_lookup names other keys than the bucket's layout
    # Fraction of files (a coin fixed by seed and name) always sent without Content-Length.
    chunked_fraction: float = 0.0
    # Fractions of artifact rows whose contentChecksum / contentLength are NULL (by seed and name).
    null_checksum_fraction: float = 0.0
    null_length_fraction: float = 0.0
    # A sync query running longer than this many seconds answers HTTP 504 (MAST's gateway: ~60 s).
    sync_timeout: float | None = None
    # An async job running longer than this many seconds ends in ERROR, saying why (MAST: ~10 min).
    async_abort_after: float | None = None
    # Seconds a query that joins dbo.caomartifact spends before it runs: a deterministic slow join.
    slow_join: float = 0.0

    @classmethod
    def mast_like(cls, **overrides: Any) -> ArchiveOptions:
        """Options shaped like the real MAST service (docs/MAST_MODEL.md), with `overrides` applied.

        300 FFI exposures per CCD with their files, one ObsCore row per product, Download API URLs
        redirected to a second host, a fifth of the files chunked, ~10% NULL checksums and ~5% NULL
        lengths, a 60 s sync gateway timeout and async jobs aborted after 10 minutes.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown ArchiveOptions field(s): {', '.join(unknown)}")
        shape: dict[str, Any] = dict(
            exposures_per_ccd=300,
            ffi_files=True,
            obscore_per_product=True,
            url_form="uri",
            redirect_to_s3=True,
            chunked_fraction=0.2,
            null_checksum_fraction=0.1,
            null_length_fraction=0.05,
            sync_timeout=60.0,
            async_abort_after=600.0,
        )
        return cls(**{**shape, **overrides})

    def s3_shape(self) -> S3Shape:
        """The S3-shaped host's knobs (validated)."""
        return S3Shape(
            multipart_fraction=self.s3_multipart_fraction,
            missing_fraction=self.s3_missing_fraction,
            missing_names=frozenset(self.s3_missing_names),
            missing_error=self.s3_missing_error,
            path_lookup=self.s3 and self.path_lookup,
            path_lookup_disagrees=self.path_lookup_disagrees,
        )

    def shape(self) -> Shape:
        """The catalogue-shaping part of these options (validated)."""
        return Shape(
            exposures_per_ccd=self.exposures_per_ccd,
            ffi_files=self.ffi_files,
            ffi_dims=ffi_dims(self.ffi_file_size),
            obscore_per_product=self.obscore_per_product,
            url_form=self.url_form,
            null_checksum_fraction=self.null_checksum_fraction,
            null_length_fraction=self.null_length_fraction,
        )


ARTIFACT_TABLES = ("dbo.caomplane", "dbo.caomartifact")
# The join paths (mast-facts: "Join keys"), declared in TAP_SCHEMA.keys so clients can discover them.
JOIN_KEYS = (
    ("ivoa.obscore", "obs_id", "dbo.caomobservation", "observationID"),
    ("dbo.caomplane", "observationTID", "dbo.caomobservation", "observationTID"),
    ("dbo.caomartifact", "planeTID", "dbo.caomplane", "planeTID"),
)


def load_database(catalog: Catalog, *, artifacts: bool = True) -> TapDatabase:
    """A TapDatabase holding the catalogue's tables, with their join keys indexed.

    `artifacts=False` leaves out ARTIFACT_TABLES, like an ObsCore-only service.
    """
    from engine.archive.tapdb import ColumnDef, TapDatabase

    db = TapDatabase()
    for key, table in catalog.tables.items():
        if not artifacts and key in ARTIFACT_TABLES:
            continue
        indexed = set(INDEXED_COLUMNS.get(key, ()))
        meta = OBSCORE_META if key == "ivoa.obscore" else {}
        columns = []
        for name, datatype in table.columns:
            utype, ucd, unit = meta.get(name, ("", "", ""))
            columns.append(
                ColumnDef(name, datatype, unit=unit, ucd=ucd, indexed=name in indexed, utype=utype)
            )
        db.add_table(table.schema, table.name, columns, table.rows)
    for from_table, from_column, target_table, target_column in JOIN_KEYS:
        if artifacts or not {from_table, target_table} & set(ARTIFACT_TABLES):
            db.add_key(from_table, target_table, [(from_column, target_column)])
    return db


class LocalArchive:
    """The archive as an async context manager; see the module docstring."""

    def __init__(self, options: ArchiveOptions | None = None) -> None:
        self.options = options or ArchiveOptions()
        self._faults = self.options.faults
        self._runner: web.AppRunner | None = None
        self._s3_runner: web.AppRunner | None = None
        self._files: FileServer | None = None
        self._tap_options: TapOptions | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self.catalog: Catalog | None = None
        self.base_url = ""
        self.s3_url = ""  # the second host's base URL (redirect_to_s3 or s3), e.g. http://127.0.0.1:PORT
        self.data_dir: Path | None = None

    @property
    def tap_url(self) -> str:
        return self.base_url + TAP_PATH

    @property
    def request_log(self) -> list[RequestRecord]:
        return self._files.request_log if self._files else []

    @property
    def faults(self) -> FaultPlan:
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        """Swap the fault plan (e.g. between test runs); file attempt counters start over."""
        self._faults = plan
        if self._files is not None:
            self._files.attempts.clear()
        if self._tap_options is not None:
            self._tap_options.faults = plan.tap_faults()

    async def __aenter__(self) -> LocalArchive:
        from engine.archive.tap import TapOptions, TapService

        options = self.options
        cadences = cadences_for(options.file_size)
        shape = options.shape()
        for name in ("sync_timeout", "async_abort_after"):
            value = getattr(options, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} {value} must be > 0 seconds (or None for no limit)")
        if options.slow_join < 0:
            raise ValueError(f"slow_join {options.slow_join} must be >= 0 seconds")
        sock = _listening_socket(options.host, options.port)
        s3_sock = None
        try:
            # Bind first: the catalogue's access_url needs the port.
            self.base_url = f"http://{options.host}:{sock.getsockname()[1]}"
            s3_shape = options.s3_shape()
            if options.redirect_to_s3 or options.s3:
                s3_sock = _listening_socket(options.host, 0)
                self.s3_url = f"http://{options.host}:{s3_sock.getsockname()[1]}"
            self.catalog = await asyncio.to_thread(
                build_catalog,
                sectors=options.sectors,
                targets=options.targets,
                cadences=cadences,
                seed=options.seed,
                base_url=self.base_url,
                focus=options.focus,
                hostile_names=options.hostile_names,
                shape=shape,
            )
            db = await asyncio.to_thread(load_database, self.catalog, artifacts=options.artifacts)
            if options.data_dir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="tessmirror-archive-")
                self.data_dir = Path(self._tempdir.name)
            else:
                self.data_dir = Path(options.data_dir)
                self.data_dir.mkdir(parents=True, exist_ok=True)
            self._tap_options = TapOptions(
                default_maxrec=options.tap_default_maxrec,
                hard_limit=options.tap_hard_limit,
                max_wait=options.tap_max_wait,
                faults=self._faults.tap_faults(),
                sync_timeout=options.sync_timeout,
                async_abort_after=options.async_abort_after,
                slow_join=options.slow_join,
            )
            app = web.Application()
            TapService(db, self._tap_options).add_routes(app, TAP_PATH)
            self._files = FileServer(
                self.catalog,
                FileStore(self.catalog, self.data_dir),
                lambda: self._faults,
                chunked_fraction=options.chunked_fraction,
                s3_base=(lambda: self.s3_url) if s3_sock is not None else None,
                redirect=options.redirect_to_s3,
                s3=s3_shape,
            )
            self._files.add_routes(app)
            # handler_cancellation: a client that hangs up stops its (possibly stalled) handler.
            self._runner = web.AppRunner(
                app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
            )
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            if s3_sock is not None:
                s3_app = web.Application()
                self._files.add_s3_routes(s3_app)
                self._s3_runner = web.AppRunner(
                    s3_app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
                )
                await self._s3_runner.setup()
                await web.SockSite(self._s3_runner, s3_sock).start()
        except BaseException:
            sock.close()
            if s3_sock is not None:
                s3_sock.close()
            await self._cleanup()
            raise
        return self

    @property
    def s3_endpoint(self) -> str:
        """What `fetch.s3_endpoint` should be to use this archive's bucket ("" without a second host)."""
        return self.s3_url

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._files is not None:
            self._files.closing.set()
        for runner in (self._s3_runner, self._runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._s3_runner = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As any server: a port whose last connections linger in TIME_WAIT can be bound again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_forever(options: ArchiveOptions, *, on_ready: Callable[[LocalArchive], None]) -> None:
    """Run the archive until SIGINT or SIGTERM, then stop cleanly (blocking)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with LocalArchive(options) as archive:
                on_ready(archive)
                await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    asyncio.run(main())


class ArchiveThread:
    """A LocalArchive in a background thread with its own event loop (for tests and sync code).

    with ArchiveThread(ArchiveOptions(...)) as running:
        running.archive.tap_url
    """

    def __init__(self, options: ArchiveOptions | None = None, *, start_timeout: float = 120.0) -> None:
        self.options = options or ArchiveOptions()
        self.start_timeout = start_timeout
        self.archive: LocalArchive | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                async with LocalArchive(self.options) as archive:
                    self.archive = archive
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as err:
                self._error = err
                self._ready.set()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def start(self) -> LocalArchive:
        self._thread = threading.Thread(target=self._run, name="local-archive", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError(f"the local archive did not start within {self.start_timeout} s")
        if self._error is not None:
            raise self._error
        assert self.archive is not None
        return self.archive

    def call(self, function: Callable[[], object]) -> None:
        """Run `function` on the archive's loop (e.g. to swap its faults) and wait for it."""
        assert self._loop is not None

        async def run() -> None:
            function()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may already be gone
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> ArchiveThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
