"""The planner: selection -> TAP queries -> pages of PlanItems, never silently short.

1. Regions: the FFI footprint(s) of a sector/camera/CCD (the notebook's first query), or the user's
   polygon or cone; a targets file gives batches of target names instead; a URL list needs no TAP.
2. Inventory: per region, keyset pages ordered by (obs_id[, file name]). A page that overflowed or
   came back full may have more behind it; the next page starts *at* its last key, after dropping the
   rows that carry that key, so a key split by the page boundary is fetched whole exactly once.
3. Rows -> PlanItems (untrusted values checked), deduplicated by URL across pages and regions.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import numpy as np
from astropy.table import Table

from engine.config import parse_polygon
from engine.exceptions import (
    ConfigError,
    EmptySelectionError,
    IncompletePlanError,
    TapJobError,
)
from engine.models import Clock, PlanItem, SystemClock
from engine.plan.adql import ARTIFACT, PLANE, Keyset, Region, footprint_query, inventory_query
from engine.plan.table import filename_from_url, product_of, read_input, table_to_items
from engine.plan.tap import TapClient
from engine.redact import redact
from engine.settings import Settings

log = logging.getLogger(__name__)

# Small enough that a page (parsed by pyvo into a Table) stays a few tens of MB, large enough that a
# whole sector (~20,000 light curves) takes two jobs; third-party loaders report 504s at 100k rows.
DEFAULT_PAGE_SIZE = 10_000
TARGET_BATCH = 200  # target names per IN (...) list: short enough for any service's query length
MAX_FILE_BYTES = 10**12  # a declared size above 1 TB is nonsense: treat it as unknown
_ARTIFACT_COLUMNS = {"planetid", "productfilename", "datauri", "contentlength", "contentchecksum"}
_PLANE_COLUMNS = {"planetid", "observationtid"}
_FFI_ID = re.compile(r"-s(\d{4})-(\d)-(\d)-")
_MD5 = re.compile(r"(?i)md5:([0-9a-f]{32})")
_UNSAFE_URL = re.compile(r"[\s\x00-\x1f\x7f]")
_TIC = re.compile(r"(?i)^tic\s*")


class Planner:
    """Turns `settings.selection` into pages of PlanItems, using `tap` for the queries."""

    def __init__(self, settings: Settings, tap: TapClient, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.tap = tap
        self.clock = clock or SystemClock()
        self.artifacts: bool | None = None  # whether the artifact join is used; known after the probe
        self.queries: list[str] = []  # every ADQL text sent, for the plan's metadata and for tests
        self._seen: set[bytes] = set()

    async def pages(self) -> AsyncIterator[list[PlanItem]]:
        """Yield each page of new (not yet seen) PlanItems as soon as it arrives."""
        sel = self.settings.selection
        total = 0
        if sel.urls_file is not None:
            table = read_input(sel.urls_file, key="selection.urls_file")
            items = self._new(table_to_items(table))
            total = len(items)
            if items:
                yield items
        else:
            async for items in self._inventory():
                total += len(items)
                yield items
        if total == 0:
            raise EmptySelectionError(
                f"the selection matched no files: {self.describe()}",
                hint="check selection.sectors and selection.products, or widen the region",
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
            source = f"sector {sel.sector} camera {_list(sel.cameras)} ccd {_list(sel.ccds)} footprint"
        sectors = "all sectors" if not sel.sectors else f"sectors {_list(sel.sectors)}"
        return f"{source}, {sectors}, products {', '.join(sel.products)}"

    # -- the inventory ------------------------------------------------------------------------------
    async def _inventory(self) -> AsyncIterator[list[PlanItem]]:
        sel = self.settings.selection
        maxrec = await self._page_size()
        self.artifacts = await self._probe_artifacts()
        common: dict[str, Any] = {
            "sectors": sel.sectors,
            "products": sel.products,
            "collection": sel.collection,
            "artifacts": self.artifacts,
        }
        scopes: Iterable[dict[str, Any]]
        if sel.targets_file is not None:
            targets = _read_targets(sel.targets_file)
            scopes = ({"targets": list(batch)} for batch in _batched(targets, TARGET_BATCH))
        elif sel.polygon is not None:
            scopes = [{"region": Region.polygon(sel.polygon)}]
        elif sel.cone is not None:
            scopes = [{"region": Region.circle(*sel.cone)}]
        else:
            scopes = [{"region": region} for region in await self._footprints(maxrec)]
        for scope in scopes:
            async for table in self._keyset_pages({**common, **scope}, maxrec):
                items = self._new(self._rows_to_items(table))
                if items:
                    yield items

    async def _keyset_pages(self, query_args: dict[str, Any], maxrec: int) -> AsyncIterator[Table]:
        """Run one inventory query page by page until a page shows there is nothing more."""
        artifacts = bool(query_args["artifacts"])
        after: Keyset | None = None
        while True:
            query = inventory_query(**query_args, after=after)
            self.queries.append(query)
            table = await self.tap.run(query, maxrec=maxrec)
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
            after = Keyset(last[0], last[1], inclusive=True)

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

    async def _footprints(self, maxrec: int) -> list[Region]:
        """The notebook's step 1: one footprint polygon per requested (camera, ccd) of the sector."""
        sel = self.settings.selection
        assert sel.sector is not None, "config guarantees a sector for a footprint selection"
        cameras = sel.cameras or [1, 2, 3, 4]
        ccds = sel.ccds or [1, 2, 3, 4]
        wanted = list(itertools.product(cameras, ccds))
        query = footprint_query(sel.sector, wanted, collection=sel.collection)
        self.queries.append(query)
        table = await self.tap.run(query, maxrec=maxrec)
        if table.meta.get("overflow"):
            # A cut footprint list would silently drop whole CCDs from the plan.
            raise IncompletePlanError(
                f"the footprint query for sector {sel.sector} overflowed the page size of {maxrec} rows",
                hint="raise tap.page_size, or choose fewer cameras/CCDs",
            )
        found: dict[tuple[int, int], Region] = {}
        for row in table:
            obs_id = _text(row, "obs_id")
            match = _FFI_ID.search(obs_id)
            if not match or int(match.group(1)) != sel.sector:
                continue
            detector = (int(match.group(2)), int(match.group(3)))
            if detector in wanted and detector not in found:
                found[detector] = _footprint_region(obs_id, _text(row, "s_region"))
        missing = [d for d in wanted if d not in found]
        explicit = bool(sel.cameras or sel.ccds)
        if missing and (explicit or not found):
            named = ", ".join(f"camera {cam} ccd {ccd}" for cam, ccd in missing)
            raise EmptySelectionError(
                f"the archive has no FFI footprint for sector {sel.sector}, {named}",
                hint="check --sector/--camera/--ccd (cameras and CCDs are 1-4)",
            )
        for cam, ccd in missing:
            log.warning("no FFI footprint for sector %d camera %d ccd %d; skipping it", sel.sector, cam, ccd)
        return [found[d] for d in wanted if d in found]

    # -- rows -> items ------------------------------------------------------------------------------
    def _rows_to_items(self, table: Table) -> Iterable[PlanItem]:
        products = set(self.settings.selection.products)
        artifacts = "productFileName" in table.colnames or "productfilename" in table.colnames
        for row in table:
            item = _artifact_item(row) if artifacts else _obscore_item(row)
            if item is not None and item.product in products:
                yield item

    def _new(self, items: Iterable[PlanItem]) -> list[PlanItem]:
        """Items whose URL was not seen before (8-byte digests keep the memory small)."""
        fresh: list[PlanItem] = []
        for item in items:
            digest = hashlib.blake2b(item.url.encode("utf-8", "surrogateescape"), digest_size=8).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                fresh.append(item)
        return fresh


def _obscore_item(row: Any) -> PlanItem | None:
    url = _quote_controls(_text(row, "access_url"))
    if not _usable_url(url):
        return None
    filename = filename_from_url(url)
    return PlanItem(
        url=url,
        filename=filename,
        obs_id=_text(row, "obs_id"),
        product=product_of(filename),
        sector=_sector(row),
        est_kb=_bounded(_number(row, "access_estsize"), MAX_FILE_BYTES // 1024),
        target_name=_text(row, "target_name"),
    )


def _artifact_item(row: Any) -> PlanItem | None:
    access_url = _quote_controls(_text(row, "access_url"))
    data_uri = _text(row, "dataURI")
    filename = _text(row, "productFileName") or data_uri.rstrip("/").rsplit("/", 1)[-1]
    product = product_of(filename)
    url = _artifact_url(access_url, data_uri, product)
    if url is None or not filename:
        return None
    # access_estsize describes ObsCore's own file (access_url), not every artifact of the observation.
    own_file = filename == filename_from_url(access_url)
    checksum = _MD5.fullmatch(_text(row, "contentChecksum").strip())
    return PlanItem(
        url=url,
        filename=filename,
        obs_id=_text(row, "obs_id"),
        product=product,
        sector=_sector(row),
        size=_bounded(_number(row, "contentLength"), MAX_FILE_BYTES),
        est_kb=_bounded(_number(row, "access_estsize"), MAX_FILE_BYTES // 1024) if own_file else -1,
        md5=checksum.group(1).lower() if checksum else "",
        target_name=_text(row, "target_name"),
    )


def _artifact_url(access_url: str, data_uri: str, product: str) -> str | None:
    """The artifact's download URL: access_url with its `uri=` value replaced by the artifact's dataURI.

    That works for MAST's Download/file?uri=... and for the local archive alike. Without a uri=
    parameter, access_url can only be trusted to be the light curve itself.
    """
    if not _usable_url(access_url):
        return None
    parts = urlsplit(access_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key == "uri" for key, _ in query):
        return access_url if product == "lc" else None
    if not data_uri:
        return None
    # urlencode(quote) percent-encodes any control character in data_uri, so it cannot break the URL.
    query = [(key, data_uri if key == "uri" else value) for key, value in query]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe=":/")))


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
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) else None


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


def _usable_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not _UNSAFE_URL.search(url)


def _row_key(row: Any, artifacts: bool) -> tuple[str, str]:
    return (_text(row, "obs_id"), _text(row, "productFileName") if artifacts else "")


# -- helpers -----------------------------------------------------------------------------------------
def _read_targets(path: Path) -> list[str]:
    """Target names (TIC ids) one a line; '#' comments, blanks and a 'TIC ' prefix are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(
            "selection.targets_file",
            f"cannot read {str(path)!r}: {err.strerror or err}",
            hint="check --targets",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("selection.targets_file", f"{str(path)!r} is not UTF-8 text") from None
    targets: list[str] = []
    for number, line in enumerate(lines, start=1):
        name = _TIC.sub("", line.split("#", 1)[0].strip())
        if not name:
            continue
        if re.search(r"[\x00-\x1f\x7f]", name):
            raise ConfigError("selection.targets_file", f"line {number}: {name!r} has control characters")
        if name not in targets:
            targets.append(name)
    if not targets:
        raise ConfigError(
            "selection.targets_file", f"{str(path)!r} lists no targets", hint="one TIC id a line"
        )
    return targets


def _batched(values: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _list(values: Sequence[int] | None) -> str:
    return ",".join(map(str, values)) if values else "all"
