"""The planner: selection -> TAP queries -> pages of PlanItems, clean at the source.

1. Footprints. MAST keeps one CAOM observation per FFI *exposure* (about 1,300 per sector/camera/CCD
   at a 30-minute cadence, up to about 10,000 at 200 s), each with an `s_region` that differs by
   arcseconds. So for each requested camera/CCD (small async jobs, at most FOOTPRINT_CONCURRENCY at
   once) the planner lists that CCD's exposure obs_ids only (short rows, keyset-paged, so any number of
   exposures fits), chooses in Python, and fetches the `s_region` of the chosen exposures only:
   - `middle` (the default): the middle exposure by obs_id (index n // 2 of the n sorted ids, the
     later of two middles when n is even), the same answer on every run; one polygon per CCD, as in
     MAST's notebook (which took `TOP 1`).
   - `composite`: the first, middle and last exposures' polygons. ADQL has no polygon union, so the
     inventory runs once per polygon and rows found twice are merged; a target near a CCD edge is not
     lost to pointing jitter, at three times the inventory queries.
   `middle` is the default because it is the notebook's answer and costs one inventory per CCD; the
   jitter within a sector moves a CCD's edge by arcseconds (less than one 21-arcsec TESS pixel), so
   only targets that close to an edge can differ.
2. Inventory: per region (or batch of target names), keyset pages ordered by (obs_id[, file name]).
   A page that overflowed or came back full may have more behind it; the next page starts *at* its
   last key, after dropping the rows that carry that key, so a key split by the page boundary is
   fetched whole exactly once. With the artifact join, each file is one CAOM artifact: its
   `productFileName` decides the file, and only a URL that names that file is used (built from its
   `dataURI` for MAST's `...?uri=` form); ObsCore's other rows of the observation (one per product on
   MAST) never lend their URL or size to it.
3. A join that errors or times out on the service (not a query fault) is retried sector by sector
   with smaller pages, then planning falls back to ObsCore only, with one warning. A query fault
   (syntax, unknown column) is raised at once: it would fail the same way again.
4. `--products ffic,ffir` plans the FFI files of every exposure of the chosen CCDs (artifact table
   where the service has it, else the exposures' ObsCore rows).
5. Every page goes through `engine.plan.invariants.PlanGuard`: one row per destination (duplicates
   merged), URLs that name their file, and every dropped row counted by reason.

Every ADQL statement is logged at DEBUG and kept, in order and without repeats, in
`Planner.statements` for the plan file's metadata.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiofiles
import numpy as np
from astropy.table import Table

from engine.config import parse_polygon
from engine.exceptions import (
    ConfigError,
    EmptySelectionError,
    IncompletePlanError,
    TapJobError,
    TapTimeoutError,
)
from engine.models import Clock, PlanItem, SystemClock
from engine.plan.adql import (
    ARTIFACT,
    PLANE,
    Keyset,
    Region,
    exposures_query,
    ffi_files_query,
    inventory_query,
    regions_query,
    sectors_query,
)
from engine.plan.invariants import GuardedPage, PlanGuard, url_problem
from engine.plan.table import filename_from_url, iter_input, product_of
from engine.plan.tap import TapClient
from engine.redact import redact
from engine.settings import Settings

log = logging.getLogger(__name__)

# Small enough that a page (parsed by pyvo into a Table) stays a few tens of MB, large enough that a
# whole sector (~20,000 light curves) takes two jobs; third-party loaders report 504s at 100k rows.
DEFAULT_PAGE_SIZE = 10_000
TARGET_BATCH = 200  # target names per IN (...) list: short enough for any service's query length
MAX_FILE_BYTES = 10**12  # a declared size above 1 TB is nonsense: treat it as unknown
FOOTPRINT_CONCURRENCY = 4  # footprint jobs in flight: 16 CCDs in four rounds, polite to the service
PIECE_DIVISOR = 10  # a join retried in pieces asks pages this many times smaller ...
MIN_PIECE_PAGE = 500  # ... but not smaller than this (unless the page size itself is)
URL_LIST_PAGE = 1000
MAX_LISTED_TARGETS = 100  # unmatched targets named in the warning; the rest are counted
FFI_PRODUCTS = ("ffic", "ffir")
_ARTIFACT_COLUMNS = {"planetid", "productfilename", "datauri", "contentlength", "contentchecksum"}
_PLANE_COLUMNS = {"planetid", "observationtid"}
_FFI_ID = re.compile(r"-s(\d{4})-(\d)-(\d)-")
_MD5 = re.compile(r"(?i)md5:([0-9a-f]{32})")
_UNSAFE_URL = re.compile(r"[\s\x00-\x1f\x7f]")
_TIC_ID = re.compile(r"(?i)(?:tic)?[\s:_-]*0*(\d+)")
# A query fault in the server's message (the same words engine.plan.tap uses not to retry a job).
_QUERY_FAULT = re.compile(
    r"(?i)syntax|pars(e|ing)|unknown|not found|no such|invalid|ambiguous|adql|column|table"
)


def normalise_target(name: str) -> str:
    """A target name as MAST stores it: TIC ids as an integer string without zero padding.

    `TIC 0025155310`, `tic25155310` and `0025155310` all become `25155310`; other names (`WASP-18`)
    are returned stripped, unchanged otherwise.
    """
    text = name.strip()
    match = _TIC_ID.fullmatch(text)
    return str(int(match.group(1))) if match else text


def choose_exposures(obs_ids: Iterable[str], mode: str) -> list[str]:
    """The exposures whose polygons make a CCD's footprint: see the module docstring.

    `middle`: [the middle obs_id, number n // 2 of n]; `composite`: [first, middle, last] without
    repeats. Deterministic:
    the ids are sorted here, whatever order the service sent them in.
    """
    ordered = sorted(set(obs_ids))
    if not ordered:
        raise ValueError("no exposures to choose from")
    middle = ordered[len(ordered) // 2]
    if mode == "middle":
        return [middle]
    if mode == "composite":
        return list(dict.fromkeys([ordered[0], middle, ordered[-1]]))
    raise ValueError(f"unknown footprint mode {mode!r}; use middle or composite")


@dataclass
class Detector:
    """One camera/CCD of the footprint sector: its exposures and the polygons chosen from them."""

    camera: int
    ccd: int
    exposures: int
    chosen: list[str]
    regions: list[Region] = field(default_factory=list)


@dataclass
class _Cursor:
    """Where a keyset-paged query stands: the `after` of the next page (None: the first page)."""

    after: Keyset | None = None


class Planner:
    """Turns `settings.selection` into pages of PlanItems, using `tap` for the queries.

    After (or during) `pages()`: `statements` (every ADQL text sent), `guard` (the invariants'
    counters), `last_page` (the `GuardedPage` behind the page just yielded: its dropped rows and
    fallback URLs, for a caller that records them), `detectors` (the footprint exposures chosen),
    `artifacts` (whether the artifact join was used), `join_fallback` (why planning fell back to
    ObsCore only, or ""), `unmatched_targets`.
    """

    def __init__(self, settings: Settings, tap: TapClient, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.tap = tap
        self.clock = clock or SystemClock()
        self.artifacts: bool | None = None  # whether the artifact join is used; known after the probe
        self.statements: list[str] = []  # every ADQL text sent, in order, without repeats
        self.guard = PlanGuard(settings.output.layout)
        self.last_page: GuardedPage | None = None
        self.detectors: list[Detector] = []
        self.join_fallback = ""
        self.unmatched_targets: list[str] = []
        self._statement_set: set[str] = set()
        self._targets_wanted: set[str] = set()
        self._targets_found: set[str] = set()
        self._warned: dict[str, int] = {}

    @property
    def queries(self) -> list[str]:
        """The ADQL statements sent so far (an alias of `statements`)."""
        return self.statements

    async def pages(self) -> AsyncIterator[list[PlanItem]]:
        """Yield each page of checked PlanItems as soon as it arrives (see `PlanGuard`).

        A page holds the downloads, then the rows that fail (unsafe names, conflicts), so that the
        consumer records them (a PlanGuard there fails them again, with the same reason). Merged
        duplicates and dropped rows are not in it; `guard` counts them and `last_page` lists them.
        A page may be empty when all its rows were dropped or merged, so that `last_page` is seen.
        """
        sel = self.settings.selection
        total = 0
        if sel.urls_file is not None:
            items = iter_input(sel.urls_file, key="selection.urls_file")
            while raw := list(itertools.islice(items, URL_LIST_PAGE)):
                page = self._checked(raw)
                total += len(page)
                if page or self._worth_reading(self.last_page):
                    yield page
        else:
            async for raw in self._inventory():
                page = self._checked(raw)
                total += len(page)
                if page or self._worth_reading(self.last_page):
                    yield page
        self._report()
        if total == 0:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.guard.dropped.items()))
            detail = f" ({self.guard.dropped_total} rows were dropped: {reasons})" if reasons else ""
            raise EmptySelectionError(
                f"the selection matched no files: {self.describe()}{detail}",
                hint="check --sectors, --products and --collection, or widen the region",
            )

    def describe(self) -> str:
        """The selection in words, for messages and the plan's metadata."""
        sel = self.settings.selection
        if sel.urls_file is not None:
            source = f"URLs from {sel.urls_file}"
        elif sel.targets_file is not None:
            source = f"targets from {sel.targets_file}"
        elif sel.polygon is not None:
            source = Region.polygon(sel.polygon).describe()
        elif sel.cone is not None:
            source = Region.circle(*sel.cone).describe()
        else:
            source = (
                f"sector {sel.sector} camera {_list(sel.cameras)} ccd {_list(sel.ccds)} "
                f"footprint ({sel.footprint})"
            )
        sectors = "all sectors" if not sel.sectors else f"sectors {_list(sel.sectors)}"
        collection = "" if sel.collection == "TESS" else f", collection {sel.collection}"
        return f"{source}, {sectors}, products {', '.join(sel.products)}{collection}"

    # -- the invariants -----------------------------------------------------------------------------
    def _checked(self, raw: list[PlanItem]) -> list[PlanItem]:
        """One page through the guard: merged rows and dropped rows leave; failures stay (to be recorded)."""
        guarded = self.guard.admit(raw)
        self.last_page = guarded
        for item, reason in guarded.dropped:
            self._note("dropped", f"dropped a row of {redact(item.obs_id) or 'the plan'}: {reason}")
        for item, reason in guarded.failed:
            self._note("failed", f"{item.filename or redact(item.url)}: {reason}")
        for relpath, urls in guarded.fallbacks.items():
            log.debug("%s: also offered at %s", relpath, ", ".join(redact(u) for u in urls))
        page = guarded.kept
        if self._targets_wanted:
            for item in page:
                name = normalise_target(item.target_name)
                if name in self._targets_wanted:
                    self._targets_found.add(name)
        return page

    @staticmethod
    def _worth_reading(guarded: GuardedPage | None) -> bool:
        return guarded is not None and bool(guarded.dropped or guarded.fallbacks)

    def _note(self, kind: str, message: str) -> None:
        """The first few drops/failures at WARNING, the rest at DEBUG (the summary counts them all)."""
        seen = self._warned.get(kind, 0)
        self._warned[kind] = seen + 1
        log.log(logging.WARNING if seen < 5 else logging.DEBUG, "plan: %s", message)

    def _report(self) -> None:
        guard = self.guard
        if guard.merged or guard.dropped or guard.conflicts or guard.unsafe:
            level = logging.WARNING if guard.dropped or guard.conflicts or guard.unsafe else logging.INFO
            log.log(level, "%s", guard.summary_line())
        if self._targets_wanted:
            missing = sorted(self._targets_wanted - self._targets_found, key=_target_order)
            self.unmatched_targets = missing
            if missing:
                shown = ", ".join(missing[:MAX_LISTED_TARGETS])
                more = (
                    f" and {len(missing) - MAX_LISTED_TARGETS} more"
                    if len(missing) > MAX_LISTED_TARGETS
                    else ""
                )
                log.warning(
                    "%d of %d targets matched no file (check the ids, --sectors and --products): %s%s",
                    len(missing),
                    len(self._targets_wanted),
                    shown,
                    more,
                )

    # -- the inventory ------------------------------------------------------------------------------
    async def _inventory(self) -> AsyncIterator[list[PlanItem]]:
        sel = self.settings.selection
        ffi = [p for p in sel.products if p in FFI_PRODUCTS]
        series = [p for p in sel.products if p not in FFI_PRODUCTS]
        footprint = sel.targets_file is None and sel.polygon is None and sel.cone is None
        if ffi and not footprint:
            raise ConfigError(
                "selection.products",
                f"{', '.join(ffi)} are planned per exposure of a sector's CCDs, not for a region or targets",
                hint="use --sector N (with --camera/--ccd) for full-frame images",
            )
        maxrec = await self._page_size()
        self.artifacts = await self._probe_artifacts()
        scopes: Iterable[dict[str, Any]]
        if sel.targets_file is not None:
            targets = await _read_targets(sel.targets_file)
            self._targets_wanted = set(targets)
            scopes = ({"targets": list(batch)} for batch in _batched(targets, TARGET_BATCH))
        elif sel.polygon is not None:
            scopes = [{"region": Region.polygon(sel.polygon)}]
        elif sel.cone is not None:
            scopes = [{"region": Region.circle(*sel.cone)}]
        else:
            self.detectors = await self._footprints(maxrec, regions=bool(series))
            scopes = [{"region": region} for d in self.detectors for region in d.regions]
        if series:
            for scope in scopes:
                scope = {**scope, "sectors": sel.sectors, "products": series, "collection": sel.collection}
                async for table in self._scope_tables(scope, maxrec):
                    yield self._rows_to_items(table, series)
        if ffi:
            assert sel.sector is not None, "config guarantees a sector for a footprint selection"
            for d in self.detectors:
                build = _ffi_builder(sel.sector, d.camera, d.ccd, ffi)
                async for table in self._joined_tables(build, maxrec, sectors=[sel.sector]):
                    yield self._rows_to_items(table, ffi)

    async def _run(self, query: str, maxrec: int) -> Table:
        """Run one ADQL statement, logged at DEBUG and kept in `statements`."""
        log.debug("ADQL: %s", query)
        if query not in self._statement_set:
            self._statement_set.add(query)
            self.statements.append(query)
        return await self.tap.run(query, maxrec=maxrec)

    async def _scope_tables(self, scope: dict[str, Any], maxrec: int) -> AsyncIterator[Table]:
        """The inventory of one region or target batch, page by page (see `_joined_tables`)."""

        def build(artifacts: bool, sectors: list[int] | None) -> Callable[[Keyset | None], str]:
            args = {**scope, "sectors": sectors, "artifacts": artifacts}
            return lambda after: inventory_query(**args, after=after)

        async def lookup() -> list[int]:
            query = sectors_query(**{k: v for k, v in scope.items() if k != "artifacts"})
            table = await self._run(query, maxrec)
            return sorted({n for row in table if (n := _number(row, "sector")) is not None})

        async for table in self._joined_tables(build, maxrec, sectors=scope.get("sectors"), lookup=lookup):
            yield table

    async def _joined_tables(
        self,
        build: Callable[[bool, list[int] | None], Callable[[Keyset | None], str]],
        maxrec: int,
        *,
        sectors: Sequence[int] | None,
        lookup: Callable[[], Any] | None = None,
    ) -> AsyncIterator[Table]:
        """Keyset pages of one query; with the artifact join, survive a join the service cannot run.

        `build(artifacts, sectors)` makes the query builder for a keyset position. When the join errors
        or times out (not a query fault), it is tried again one sector at a time with smaller pages,
        each piece continuing where the failed query stopped; if a piece fails too, the rest is planned
        from ObsCore only (one warning for the whole run). Rows already planned are not asked again.
        """
        wanted = list(sectors) if sectors else None
        if not self.artifacts:
            async for table in self._keyset_pages(build(False, wanted), False, maxrec, _Cursor()):
                yield table
            return
        cursor = _Cursor()
        try:
            async for table in self._keyset_pages(build(True, wanted), True, maxrec, cursor):
                yield table
            return
        except (TapJobError, TapTimeoutError) as err:
            if _is_query_fault(err):
                raise
            failure: Exception = err
        small = min(maxrec, max(MIN_PIECE_PAGE, maxrec // PIECE_DIVISOR))
        log.info(
            "the artifact join failed (%s); trying it again sector by sector, %d rows a page", failure, small
        )
        pieces: list[int] | None = wanted
        if pieces is None and lookup is not None:
            try:
                pieces = await lookup()
            except (TapJobError, TapTimeoutError) as err:
                if _is_query_fault(err):
                    raise
                failure = err
        # (sectors, where to start) still to plan once the join is given up; None: all sectors
        remaining: list[tuple[list[int] | None, Keyset | None]] = [(wanted, cursor.after)]
        if pieces is not None:
            start = cursor.after
            for index, sector in enumerate(pieces):
                piece = _Cursor(start)
                try:
                    async for table in self._keyset_pages(build(True, [sector]), True, small, piece):
                        yield table
                except (TapJobError, TapTimeoutError) as err:
                    if _is_query_fault(err):
                        raise
                    failure = err
                    remaining = [([sector], piece.after)]
                    if pieces[index + 1 :]:
                        remaining.append((list(pieces[index + 1 :]), start))
                    break
            else:
                return
        self._fall_back(failure)
        for piece_sectors, after in remaining:
            resume = Keyset(after.obs_id, inclusive=True) if after is not None else None
            async for table in self._keyset_pages(
                build(False, piece_sectors), False, maxrec, _Cursor(resume)
            ):
                yield table

    def _fall_back(self, failure: Exception) -> None:
        self.artifacts = False
        if not self.join_fallback:
            self.join_fallback = str(failure)
            log.warning(
                "the TAP service could not run the artifact join, even one sector at a time (%s); "
                "planning from ObsCore only: sizes are access_estsize estimates and files have no "
                "declared md5, so they are checked by size and FITS structure only",
                failure,
            )

    async def _keyset_pages(
        self, build: Callable[[Keyset | None], str], artifacts: bool, maxrec: int, cursor: _Cursor
    ) -> AsyncIterator[Table]:
        """Run one inventory query page by page until a page shows there is nothing more.

        `cursor.after` is where the page being asked starts, so a caller that catches a failure knows
        which rows were planned already.
        """
        while True:
            table = await self._run(build(cursor.after), maxrec)
            more = bool(table.meta.get("overflow")) or len(table) >= maxrec
            if not more:
                yield table
                return
            # Rows sharing the last key may continue on the next page: drop them here and start the
            # next page at that key, so they arrive together and exactly once.
            keys = [_row_key(row, artifacts) for row in table]
            last = keys[-1]
            keep = len(keys)
            while keep and keys[keep - 1] == last:
                keep -= 1
            if keep == 0:
                # Every row of the page carries the same key: starting the next page at that key would
                # return this page again. Refuse rather than loop or plan short.
                shown = redact(last[0]) + (f" / {redact(last[1])}" if last[1] else "")
                raise IncompletePlanError(
                    f"all {len(table)} rows of a full TAP page (page size {maxrec}) belong to "
                    f"{shown!r}, so the plan cannot be paged further",
                    hint="raise tap.page_size (or the service's row limit)",
                )
            log.info("TAP page of %d rows ends at %s; asking for the next", keep, redact(last[0]))
            yield table[:keep]
            cursor.after = Keyset(last[0], last[1], inclusive=True)

    async def _page_size(self) -> int:
        """The configured page size, never above the service's hard limit (a larger MAXREC is cut
        to the limit anyway, and a page that fills the limit is then read as a page, not the end)."""
        limit = await self.tap.hardlimit()
        wanted = self.settings.tap.page_size or DEFAULT_PAGE_SIZE
        return min(wanted, limit) if limit else wanted

    async def _probe_artifacts(self) -> bool:
        """Join the CAOM artifact table when the service has it with sizes and checksums."""
        try:
            artifact = await self.tap.columns(ARTIFACT)
            plane = await self.tap.columns(PLANE)
        except TapJobError as err:  # TAP_SCHEMA not queryable: plan without exact sizes
            log.warning("cannot read TAP_SCHEMA (%s); using access_estsize for sizes", err)
            return False
        if (
            artifact is not None
            and plane is not None
            and artifact >= _ARTIFACT_COLUMNS
            and plane >= _PLANE_COLUMNS
        ):
            return True
        log.warning(
            "the TAP service has no %s with %s; using access_estsize for sizes and no checksums",
            ARTIFACT,
            ", ".join(sorted(_ARTIFACT_COLUMNS)),
        )
        return False

    # -- footprints ---------------------------------------------------------------------------------
    async def _footprints(self, maxrec: int, *, regions: bool) -> list[Detector]:
        """Each requested camera/CCD's exposures and (with `regions`) its chosen polygons.

        One small job chain per CCD, at most FOOTPRINT_CONCURRENCY at once; the result is in the
        requested order whatever order the jobs finish in.
        """
        sel = self.settings.selection
        assert sel.sector is not None, "config guarantees a sector for a footprint selection"
        sector = sel.sector
        wanted = list(itertools.product(sel.cameras or [1, 2, 3, 4], sel.ccds or [1, 2, 3, 4]))
        limit = asyncio.Semaphore(FOOTPRINT_CONCURRENCY)

        async def one(camera: int, ccd: int) -> Detector | None:
            async with limit:
                exposures = await self._exposures(sector, camera, ccd, maxrec)
                if not exposures:
                    return None
                chosen = choose_exposures(exposures, sel.footprint)
                detector = Detector(camera, ccd, len(exposures), chosen)
                if regions:
                    detector.regions = await self._regions(chosen, maxrec)
                log.debug(
                    "sector %d camera %d ccd %d: %d exposures; footprint from %s",
                    sector, camera, ccd, len(exposures), ", ".join(chosen),
                )  # fmt: skip
                return detector

        tasks = [asyncio.ensure_future(one(camera, ccd)) for camera, ccd in wanted]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One CCD failed (or we were cancelled): stop the others' jobs before raising its error.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        found = [d for d in results if d is not None]
        have = {(d.camera, d.ccd) for d in found}
        missing = [d for d in wanted if d not in have]
        explicit = bool(sel.cameras or sel.ccds)
        if missing and (explicit or not found):
            named = ", ".join(f"camera {cam} ccd {ccd}" for cam, ccd in missing)
            raise EmptySelectionError(
                f"the archive has no FFI footprint for sector {sector}, {named}",
                hint="check --sector/--camera/--ccd (cameras and CCDs are 1-4)",
            )
        for cam, ccd in missing:
            log.warning("no FFI footprint for sector %d camera %d ccd %d; skipping it", sector, cam, ccd)
        return found

    async def _exposures(self, sector: int, camera: int, ccd: int, maxrec: int) -> list[str]:
        """Every exposure obs_id of one CCD, keyset-paged on observationID (short rows, no join)."""
        found: set[str] = set()
        after: str | None = None
        while True:
            table = await self._run(exposures_query(sector, camera, ccd, after=after), maxrec)
            ids = [_text(row, "observationID") for row in table]
            for obs_id in ids:
                match = _FFI_ID.search(obs_id)
                if match and tuple(map(int, match.groups())) == (sector, camera, ccd):
                    found.add(obs_id)
            if not (table.meta.get("overflow") or len(table) >= maxrec) or not ids:
                return sorted(found)
            last = max(ids)
            if after is not None and last <= after:
                raise IncompletePlanError(
                    f"the exposures of sector {sector} camera {camera} ccd {ccd} do not page: the service "
                    f"returned {redact(last)!r} again",
                    hint="raise tap.page_size",
                )
            after = last

    async def _regions(self, chosen: list[str], maxrec: int) -> list[Region]:
        """The polygons of the chosen exposures, without repeats, in the order chosen.

        One small query per exposure (one for `middle`, three for `composite`): ObsCore may hold a row
        per product of an exposure, and asking them one by one keeps every answer far below a page.
        """
        regions: list[Region] = []
        for obs_id in chosen:
            table = await self._run(regions_query([obs_id]), maxrec)
            texts = {
                text for row in table if _text(row, "obs_id") == obs_id and (text := _text(row, "s_region"))
            }
            if not texts:
                raise TapJobError(
                    f"the archive has no s_region for the FFI exposure {redact(obs_id)!r}",
                    hint="give the region yourself with --polygon",
                )
            # The product rows of one exposure should agree; if they do not, the smallest text is still
            # the same choice on every run.
            region = _footprint_region(obs_id, min(texts))
            if region not in regions:
                regions.append(region)
        return regions

    # -- rows -> items ------------------------------------------------------------------------------
    def _rows_to_items(self, table: Table, products: Sequence[str]) -> list[PlanItem]:
        wanted = set(products)
        artifacts = "productFileName" in table.colnames or "productfilename" in table.colnames
        items = _artifact_items(table) if artifacts else (_obscore_item(row) for row in table)
        return [item for item in items if item.product in wanted]


def _product(filename: str) -> str:
    """The product type of a file name; QLP's HLSP light curves (`..._llc.fits`) count as `lc`."""
    product = product_of(filename)
    if not product and filename.lower().endswith("_llc.fits"):
        return "lc"
    return product


def _obscore_item(row: Any) -> PlanItem:
    """An ObsCore row: the file is the one its access_url names (the guard drops an unusable URL)."""
    url = _quote_controls(_text(row, "access_url"))
    filename = filename_from_url(url) if url else ""
    return PlanItem(
        url=url,
        filename=filename,
        obs_id=_text(row, "obs_id"),
        product=_product(filename),
        sector=_sector(row),
        est_kb=_bounded(_number(row, "access_estsize"), MAX_FILE_BYTES // 1024),
        target_name=_text(row, "target_name"),
        s_ra=_degrees(row, "s_ra", 0.0, 360.0),
        s_dec=_degrees(row, "s_dec", -90.0, 90.0),
    )


def _artifact_items(table: Table) -> Iterator[PlanItem]:
    """Joined rows -> one item per (artifact, URL that names it).

    The join pairs every artifact of an observation with every ObsCore row of it; MAST has one ObsCore
    row per product, so a light curve also arrives beside the target pixel file's URL. The artifact's
    `productFileName` decides the file; a row's URL is used only when it names that file (a `uri=` URL
    is rebuilt from the artifact's dataURI, which then names it). Only the row whose own access_url is
    this file lends its access_estsize. An artifact with no such URL yields one item with the URL it
    has, for the guard to drop as naming another file (or as unusable) and count.
    """
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in table:
        data_uri = _text(row, "dataURI")
        filename = _text(row, "productFileName") or data_uri.rstrip("/").rsplit("/", 1)[-1]
        groups.setdefault((_text(row, "obs_id"), filename), []).append(row)
    for (obs_id, filename), rows in groups.items():
        first = rows[0]
        data_uri = _text(first, "dataURI")
        checksum = _MD5.fullmatch(_text(first, "contentChecksum").strip())
        own: list[str] = []  # URLs from the file's own ObsCore row first: a deterministic primary
        other: list[str] = []
        est_kb = -1
        fallback = ""
        for row in rows:
            access_url = _quote_controls(_text(row, "access_url"))
            url = _artifact_url(access_url, data_uri)
            fallback = fallback or url
            if not url or not _names(url, filename):
                continue
            if _names(access_url, filename):
                if est_kb < 0:
                    est_kb = _bounded(_number(row, "access_estsize"), MAX_FILE_BYTES // 1024)
                if url not in own:
                    own.append(url)
            elif url not in other:
                other.append(url)
        urls = [*own, *(u for u in other if u not in own)] or [fallback]
        for url in urls:
            yield PlanItem(
                url=url,
                filename=filename,
                obs_id=obs_id,
                product=_product(filename),
                sector=_sector(first),
                size=_bounded(_number(first, "contentLength"), MAX_FILE_BYTES),
                est_kb=est_kb,
                md5=checksum.group(1).lower() if checksum else "",
                target_name=_text(first, "target_name"),
                s_ra=_degrees(first, "s_ra", 0.0, 360.0),
                s_dec=_degrees(first, "s_dec", -90.0, 90.0),
            )


def _names(url: str, filename: str) -> bool:
    """Whether `url` is usable and names `filename` (the guard's rule, reused to pick among rows)."""
    return url_problem(PlanItem(url=url, filename=filename)) is None


def _artifact_url(access_url: str, data_uri: str) -> str:
    """The artifact's download URL: access_url with its `uri=` value replaced by the artifact's dataURI.

    That works for MAST's Download/file?uri=... and for the local archive alike. Without a uri=
    parameter (a plain path URL) access_url is returned as it is: it serves the file it names.
    """
    if not access_url or not data_uri:
        return access_url
    try:
        parts = urlsplit(access_url)
    except ValueError:
        return access_url
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key == "uri" for key, _ in query):
        return access_url
    # urlencode(quote) percent-encodes any control character in data_uri, so it cannot break the URL.
    query = [(key, data_uri if key == "uri" else value) for key, value in query]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe=":/")))


def _is_query_fault(err: Exception) -> bool:
    """A TAP failure that the same query would meet again: a syntax error, an unknown column, a
    refused query. Mirrors engine.plan.tap's own rule for not retrying a job."""
    if not isinstance(err, TapJobError):
        return False
    flagged = getattr(err, "query_fault", None)
    if isinstance(flagged, bool):
        return flagged
    text = err.message
    if "refused the query" in text:
        return True
    _, found, server = text.partition("could not run the query: ")
    return bool(found) and bool(_QUERY_FAULT.search(server))


def _ffi_builder(
    sector: int, camera: int, ccd: int, products: list[str]
) -> Callable[[bool, list[int] | None], Callable[[Keyset | None], str]]:
    """`_joined_tables`' query builder for one CCD's FFI files (the sector is fixed)."""

    def build(artifacts: bool, _sectors: list[int] | None) -> Callable[[Keyset | None], str]:
        return lambda after: ffi_files_query(
            sector, camera, ccd, products=products, artifacts=artifacts, after=after
        )

    return build


def _target_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _footprint_region(obs_id: str, s_region: str) -> Region:
    try:
        return Region.polygon(parse_polygon(s_region, key="s_region"))
    except ConfigError as err:
        raise TapJobError(
            f"the archive sent an unusable footprint for {redact(obs_id)!r}: {err.message}",
            hint="give the region yourself with --polygon",
        ) from None


# -- untrusted cells ---------------------------------------------------------------------------------
def _cell(row: Any, name: str) -> Any:
    columns = row.colnames
    if name not in columns:
        lowered = {c.lower(): c for c in columns}
        if name.lower() not in lowered:
            return None
        name = lowered[name.lower()]
    value = row[name]
    return None if np.ma.is_masked(value) else value


def _text(row: Any, name: str) -> str:
    value = _cell(row, name)
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def _number(row: Any, name: str) -> int | None:
    value = _cell(row, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) else None


def _degrees(row: Any, name: str, low: float, high: float) -> float:
    """An angle column as float degrees; NaN when missing, not a number or outside [low, high]."""
    try:
        value = float(_cell(row, name))
    except (TypeError, ValueError):
        return math.nan
    return value if low <= value <= high else math.nan


def _bounded(value: int | None, high: int) -> int:
    return value if value is not None and 0 <= value <= high else -1


def _sector(row: Any) -> int:
    value = _number(row, "sector")
    return value if value is not None and 1 <= value <= 9999 else -1


def _quote_controls(url: str) -> str:
    """Percent-encode whitespace and control characters in an archive URL.

    The row is kept (not dropped) so that its file name meets `layout.safe_filename` and ends as a
    recorded failure with a reason, instead of vanishing from the plan without a trace.
    """
    return _UNSAFE_URL.sub(lambda m: f"%{ord(m.group()):02X}", url)


def _row_key(row: Any, artifacts: bool) -> tuple[str, str]:
    return (_text(row, "obs_id"), _text(row, "productFileName") if artifacts else "")


# -- helpers -----------------------------------------------------------------------------------------
async def _read_targets(path: Path) -> list[str]:
    """Target names one a line, TIC ids normalised (`normalise_target`); '#' comments and blanks skipped.

    Read with `aiofiles` (the planner runs on the event loop, and a targets file on a network file
    system can take a while): the file's methods run in the loop's default pool, the parsing here.
    """
    try:
        async with aiofiles.open(path, encoding="utf-8") as handle:
            lines = (await handle.read()).splitlines()
    except OSError as err:
        raise ConfigError(
            "selection.targets_file",
            f"cannot read {str(path)!r}: {err.strerror or err}",
            hint="check --targets",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("selection.targets_file", f"{str(path)!r} is not UTF-8 text") from None
    targets: dict[str, None] = {}  # ordered, without repeats
    for number, line in enumerate(lines, start=1):
        raw = line.split("#", 1)[0].strip()
        if not raw:
            continue
        if re.search(r"[\x00-\x1f\x7f]", raw):
            raise ConfigError("selection.targets_file", f"line {number}: {raw!r} has control characters")
        targets[normalise_target(raw)] = None
    if not targets:
        raise ConfigError(
            "selection.targets_file", f"{str(path)!r} lists no targets", hint="one TIC id a line"
        )
    return list(targets)


def _batched(values: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _list(values: Sequence[int] | None) -> str:
    return ",".join(map(str, values)) if values else "all"
