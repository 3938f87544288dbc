"""The Python entry points, for notebooks and scripts.

    >>> from engine import mirror, plan
    >>> todo = plan(sector=1, camera=1, ccd=2)                             # what, and how big
    >>> results = mirror(sector=1, camera=1, ccd=2, out_dir="tess-s1")     # works in Jupyter too
    >>> results = retry(results)                                           # just the failures again
    >>> results = await mirror_async(sector=1, out_dir="tess-s1")          # inside your own loop

`mirror` returns a `Results` table (an astropy Table) with one row per planned file: its absolute
`path`, `obs_id`, `tic`, `sector`, `product`, `bytes`, `md5`, `status` and `error`. `results.meta`
carries `out_dir`, the counts and the `exit_code`; `results.errors` is the view of the failed rows.
Failures are rows, not exceptions, so one bad file never hides the others. Problems with the whole
run (bad input, an unreachable TAP service, a full disk) raise `engine.exceptions.TessMirrorError`
subclasses (`ConfigError`, `ArchiveError`, `LocalError`, ...).

`mirror()` runs the run's event loop in a worker thread, so it works the same in a script and in a
notebook whose loop is already running. In a notebook the progress bar is `tqdm.auto`'s widget.

Signals belong to the caller (a notebook's kernel, a script): the API installs no handlers. An
interrupt stops the run cleanly: `mirror()` turns Ctrl-C (or a notebook's "interrupt kernel") into a
cancellation of the run, which abandons the transfers in flight (they stay `.part`), flushes the
manifest, releases the lock, and then raises KeyboardInterrupt; cancelling the task that awaits
`mirror_async()` does the same and raises CancelledError. Call again to resume.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from astropy.table import Table

from engine.aio import new_event_loop
from engine.config import load_settings
from engine.manager import MirrorRun, RunOutcome
from engine.models import PlanItem
from engine.plan.sources import PlanSource, TablePlan, plan_source_for
from engine.progress import PlanSummary, Progress
from engine.settings import Settings

T = TypeVar("T")

# Friendly keyword names -> dotted configuration keys (the same names as the CLI flags).
KEYWORDS: dict[str, str] = {
    "tap_url": "tap.url",
    "sector": "selection.sector",
    "camera": "selection.cameras",
    "cameras": "selection.cameras",
    "ccd": "selection.ccds",
    "ccds": "selection.ccds",
    "polygon": "selection.polygon",
    "cone": "selection.cone",
    "targets_file": "selection.targets_file",
    "urls_file": "selection.urls_file",
    "sectors": "selection.sectors",
    "products": "selection.products",
    "footprint": "selection.footprint",
    "collection": "selection.collection",
    "out_dir": "output.out_dir",
    "layout": "output.layout",
    "state_dir": "output.state_dir",
    "concurrency": "fetch.concurrency",
    "per_host": "fetch.per_host",
    "retries": "fetch.retries",
    "idle_timeout": "fetch.idle_timeout",
    "bandwidth_limit": "fetch.bandwidth_limit",
    "source": "fetch.source",
    "token_env": "fetch.token_env",
    "verify": "verify.level",
    "force": "run.force",
    "recheck": "run.recheck",
    "refresh_plan": "run.refresh_plan",
}
# The results table's columns, in order.
RESULT_COLUMNS = (
    "path",
    "filename",
    "obs_id",
    "tic",
    "sector",
    "product",
    "bytes",
    "md5",
    "status",
    "error",
    "action",
    "url",
)
_RESULT_DTYPES = [str, str, str, "i8", "i8", str, "i8", str, str, str, str, str]
_TIC = re.compile(r"-(\d{16})-")
_SECTOR = re.compile(r"-s(\d{4})-")
_PRODUCT = re.compile(r"_([a-z]+(?:-[a-z]+)?)\.(?:fits|pdf)$")


class Results(Table):
    """The outcome of a mirror run: an astropy Table, one row per planned file.

    Columns: `path` (absolute), `filename`, `obs_id`, `tic` (0 when the name carries none), `sector`
    (-1 when unknown), `product` (e.g. "lc"), `bytes`, `md5` (computed while downloading), `status`
    ("verified" or "failed"), `error` (the reason, for a failure), `action` ("downloaded", "skipped"
    for a file an earlier run verified, "failed") and `url`.

    `meta` holds `out_dir` and the counts: `planned`, `downloaded`, `skipped`, `failed`, `pending`,
    `bytes`, `interrupted`, `exit_code` (as the CLI's).
    """

    @property
    def errors(self) -> Results:
        """The failed rows only (`path`, `error`, ...): what `retry(results)` would download again."""
        return self[self["status"] == "failed"] if len(self) else self

    @property
    def ok(self) -> bool:
        """True when every planned file is verified (exit code 0)."""
        return self.meta.get("exit_code") == 0


def build_settings(
    config: str | Path | None = None,
    *,
    tap_url: str | None = None,
    sector: int | None = None,
    camera: int | Sequence[int] | None = None,
    cameras: int | Sequence[int] | None = None,
    ccd: int | Sequence[int] | None = None,
    ccds: int | Sequence[int] | None = None,
    polygon: str | Sequence[float] | None = None,
    cone: str | Sequence[float] | None = None,
    targets_file: str | Path | None = None,
    urls_file: str | Path | None = None,
    sectors: str | Sequence[int] | None = None,
    products: str | Sequence[str] | None = None,
    footprint: str | None = None,
    collection: str | None = None,
    out_dir: str | Path | None = None,
    layout: str | None = None,
    state_dir: str | Path | None = None,
    concurrency: int | str | None = None,
    per_host: int | None = None,
    retries: int | None = None,
    idle_timeout: float | None = None,
    bandwidth_limit: float | None = None,
    source: str | None = None,
    token_env: str | None = None,
    verify: str | None = None,
    force: bool | None = None,
    recheck: bool | None = None,
    refresh_plan: bool | None = None,
    require_selection: bool = True,
) -> Settings:
    """Settings from a TOML file and keyword arguments (keywords win), validated.

    Parameters
    ----------
    config
        A TOML file as `config.example.toml` documents; None: the defaults.
    tap_url, sector, camera, ccd, polygon, cone, targets_file, urls_file, sectors, products, \
footprint, collection, out_dir, layout, state_dir, concurrency, per_host, retries, idle_timeout, \
bandwidth_limit, source, token_env, verify, force, recheck, refresh_plan
        The CLI's flags under their Python names (`camera`/`cameras` and `ccd`/`ccds` are the same);
        None means "not given". Strings are read as on the command line (`sectors="1-3"`).
    require_selection
        Refuse settings that select nothing (False for a mirror that only needs `out_dir`).

    Returns
    -------
    Settings

    Raises
    ------
    engine.exceptions.ConfigError
        A bad value, naming its key and the fix.
    """
    given = {
        "tap_url": tap_url,
        "sector": sector,
        "camera": camera if camera is not None else cameras,
        "ccd": ccd if ccd is not None else ccds,
        "polygon": polygon,
        "cone": cone,
        "targets_file": targets_file,
        "urls_file": urls_file,
        "sectors": sectors,
        "products": products,
        "footprint": footprint,
        "collection": collection,
        "out_dir": out_dir,
        "layout": layout,
        "state_dir": state_dir,
        "concurrency": concurrency,
        "per_host": per_host,
        "retries": retries,
        "idle_timeout": idle_timeout,
        "bandwidth_limit": bandwidth_limit,
        "source": source,
        "token_env": token_env,
        "verify": verify,
        "force": force,
        "recheck": recheck,
        "refresh_plan": refresh_plan,
    }
    overrides: dict[str, object] = {}
    for name, value in given.items():
        if value is None:
            continue
        key = KEYWORDS[name]
        if key in ("selection.cameras", "selection.ccds") and isinstance(value, int):
            value = [value]
        if key in ("selection.polygon", "selection.cone", "selection.products") and isinstance(value, tuple):
            value = list(value)
        overrides[key] = value
    return load_settings(Path(config) if config else None, overrides, require_selection=require_selection)


def _progress(progress: bool | Progress | None, settings: Settings) -> Progress:
    if isinstance(progress, Progress):
        return progress
    if progress is None:  # a bar in a notebook or on a terminal; nothing drawn in a batch job
        progress = "ipykernel" in sys.modules or _isatty(sys.stderr)
    return Progress(interval=settings.run.progress_interval, bar=bool(progress), auto=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def outcome_table(outcome: RunOutcome, out_dir: Path) -> Results:
    """The results table of `outcome` (the manager's per-file columns), with absolute paths and the
    TIC, sector and product read from each file's name."""
    out_dir = Path(out_dir).resolve()
    rows = outcome.results if outcome.results is not None else Table()
    n = len(rows)

    def column(name: str, default: object) -> list:
        return list(rows[name]) if name in getattr(rows, "colnames", ()) else [default] * n

    filenames = [str(v) for v in column("filename", "")]
    relpaths = [str(v) for v in column("path", "")]
    # The plan's own product and sector when the manager keeps them; else read from the file name.
    planned_products = [str(v) for v in column("product", "")]
    planned_sectors = [int(v) for v in column("sector", -1)]
    tics, sectors, products = [], [], []
    for i, name in enumerate(filenames):
        tic, sector, product = _TIC.search(name), _SECTOR.search(name), _PRODUCT.search(name)
        tics.append(int(tic.group(1)) if tic else 0)
        sectors.append(
            planned_sectors[i] if planned_sectors[i] >= 0 else int(sector.group(1)) if sector else -1
        )
        products.append(planned_products[i] or (product.group(1) if product else ""))
    columns = {
        "path": [str(out_dir / rel) if rel else "" for rel in relpaths],
        "filename": filenames,
        "obs_id": [str(v) for v in column("obs_id", "")],
        "tic": tics,
        "sector": sectors,
        "product": products,
        "bytes": [int(v) for v in column("nbytes", 0)],
        "md5": [str(v) for v in column("md5", "")],
        "status": [str(v) for v in column("status", "")],
        "error": [str(v) for v in column("error", "")],
        "action": [str(v) for v in column("action", "")],
        "url": [str(v) for v in column("url", "")],
    }
    table = Results(columns, names=RESULT_COLUMNS, dtype=_RESULT_DTYPES)
    table.meta.update(
        {
            "out_dir": str(out_dir),
            "planned": outcome.planned,
            "downloaded": outcome.downloaded,
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "pending": outcome.pending,
            "bytes": outcome.nbytes,
            "merged": outcome.merged,
            "dropped": outcome.dropped,
            "interrupted": outcome.interrupted,
            "exit_code": outcome.exit_code,
        }
    )
    return table


async def _run(
    settings: Settings,
    plan_source: PlanSource | None,
    progress: Progress,
    *,
    adopt_from: Sequence[str | Path] = (),
    adopt_link: bool = False,
) -> Results:
    run = MirrorRun(
        settings,
        plan_source,
        progress=progress,
        handle_signals=False,
        adopt_from=[Path(tree) for tree in adopt_from],
        adopt_link=adopt_link,
    )
    try:
        outcome = await run.run()
    finally:
        progress.close()
    return outcome_table(outcome, settings.output.out_dir)


async def mirror_async(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    plan_source: PlanSource | None = None,
    progress: bool | Progress | None = None,
    tap_url: str | None = None,
    sector: int | None = None,
    camera: int | Sequence[int] | None = None,
    ccd: int | Sequence[int] | None = None,
    polygon: str | Sequence[float] | None = None,
    cone: str | Sequence[float] | None = None,
    targets_file: str | Path | None = None,
    urls_file: str | Path | None = None,
    sectors: str | Sequence[int] | None = None,
    products: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    layout: str | None = None,
    state_dir: str | Path | None = None,
    concurrency: int | str | None = None,
    per_host: int | None = None,
    retries: int | None = None,
    idle_timeout: float | None = None,
    bandwidth_limit: float | None = None,
    source: str | None = None,
    verify: str | None = None,
    force: bool | None = None,
    recheck: bool | None = None,
    refresh_plan: bool | None = None,
    adopt_from: Sequence[str | Path] = (),
    adopt_link: bool = False,
) -> Results:
    """Plan and download in the running event loop; returns the results table.

    Parameters
    ----------
    config
        A TOML configuration file (`config.example.toml`); keywords override it.
    settings
        Ready-made Settings instead of `config` and the keywords.
    plan_source
        Advanced: a plan source (e.g. `engine.plan.sources.TablePlan(table)`) instead of planning.
    progress
        True: a `tqdm.auto` bar; False: none; None: a bar in a notebook or on a terminal; or a
        `engine.progress.Progress` of your own.
    tap_url, sector, camera, ccd, polygon, cone, targets_file, urls_file, sectors, products, \
out_dir, layout, state_dir, concurrency, per_host, retries, idle_timeout, bandwidth_limit, source, \
verify, force, recheck, refresh_plan
        As the CLI's flags (see `build_settings`); e.g. `sector=1, camera=1, ccd=2, out_dir="s1"`.
    adopt_from
        Folders to look in for each planned file before downloading it (a lightkurve/astroquery
        cache `mastDownload/TESS/<obs_id>/<file>`, a flat folder, another mirror), as
        `--adopt-from`: a file found there is copied (a reflink where the file system can) into
        place, verified, and recorded as adopted. The folders are never changed.
    adopt_link
        As `--link`: hard-link found files instead of copying them (whoever can write the source
        tree can then change the mirror's copy; `tessmirror verify` catches that).

    Returns
    -------
    Results
        One row per planned file; see `Results`.

    Raises
    ------
    engine.exceptions.TessMirrorError
        For a problem with the whole run (bad input, the archive, this machine).
    """
    if settings is None:
        settings = build_settings(
            config,
            tap_url=tap_url,
            sector=sector,
            camera=camera,
            ccd=ccd,
            polygon=polygon,
            cone=cone,
            targets_file=targets_file,
            urls_file=urls_file,
            sectors=sectors,
            products=products,
            out_dir=out_dir,
            layout=layout,
            state_dir=state_dir,
            concurrency=concurrency,
            per_host=per_host,
            retries=retries,
            idle_timeout=idle_timeout,
            bandwidth_limit=bandwidth_limit,
            source=source,
            verify=verify,
            force=force,
            recheck=recheck,
            refresh_plan=refresh_plan,
            require_selection=plan_source is None,
        )
    return await _run(
        settings, plan_source, _progress(progress, settings), adopt_from=adopt_from, adopt_link=adopt_link
    )


def mirror(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    progress: bool | Progress | None = None,
    tap_url: str | None = None,
    sector: int | None = None,
    camera: int | Sequence[int] | None = None,
    ccd: int | Sequence[int] | None = None,
    polygon: str | Sequence[float] | None = None,
    cone: str | Sequence[float] | None = None,
    targets_file: str | Path | None = None,
    urls_file: str | Path | None = None,
    sectors: str | Sequence[int] | None = None,
    products: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    layout: str | None = None,
    state_dir: str | Path | None = None,
    concurrency: int | str | None = None,
    per_host: int | None = None,
    retries: int | None = None,
    idle_timeout: float | None = None,
    bandwidth_limit: float | None = None,
    source: str | None = None,
    verify: str | None = None,
    force: bool | None = None,
    recheck: bool | None = None,
    refresh_plan: bool | None = None,
    adopt_from: Sequence[str | Path] = (),
    adopt_link: bool = False,
) -> Results:
    """Plan and download, blocking until the run ends; works inside a running loop (Jupyter) too.

    The run gets its own event loop in a worker thread. Ctrl-C (a notebook's "interrupt kernel")
    cancels it cleanly (manifest flushed, lock released) and then raises KeyboardInterrupt here.

    Parameters
    ----------
    config, settings, progress, tap_url, sector, camera, ccd, polygon, cone, targets_file, \
urls_file, sectors, products, out_dir, layout, state_dir, concurrency, per_host, retries, \
idle_timeout, bandwidth_limit, source, verify, force, recheck, refresh_plan, adopt_from, adopt_link
        As for `mirror_async`.

    Returns
    -------
    Results
        One row per planned file; `results.errors` lists the failures, `retry(results)` retries them.

    Raises
    ------
    engine.exceptions.TessMirrorError
        For a problem with the whole run (bad input, the archive, this machine).
    KeyboardInterrupt
        After an interrupt stopped the run cleanly; call again to resume.
    """
    return run_in_thread(
        lambda: mirror_async(
            config,
            settings=settings,
            progress=progress,
            tap_url=tap_url,
            sector=sector,
            camera=camera,
            ccd=ccd,
            polygon=polygon,
            cone=cone,
            targets_file=targets_file,
            urls_file=urls_file,
            sectors=sectors,
            products=products,
            out_dir=out_dir,
            layout=layout,
            state_dir=state_dir,
            concurrency=concurrency,
            per_host=per_host,
            retries=retries,
            idle_timeout=idle_timeout,
            bandwidth_limit=bandwidth_limit,
            source=source,
            verify=verify,
            force=force,
            recheck=recheck,
            refresh_plan=refresh_plan,
            adopt_from=adopt_from,
            adopt_link=adopt_link,
        )
    )


def retry(
    results: Results,
    *,
    settings: Settings | None = None,
    config: str | Path | None = None,
    progress: bool | Progress | None = None,
    concurrency: int | str | None = None,
    retries: int | None = None,
) -> Results:
    """Download again just the failed rows of `results` (as parfive's `Downloader.retry`).

    Parameters
    ----------
    results
        What `mirror` returned; `results.meta["out_dir"]` says where the mirror is.
    settings, config
        The run's settings or configuration file, if it was not the defaults (layout, state_dir).
    progress, concurrency, retries
        As for `mirror`.

    Returns
    -------
    Results
        `results` with every retried row replaced by its new outcome, and the counts recomputed.
    """
    failed = results.errors
    if settings is None:
        settings = build_settings(
            config,
            out_dir=results.meta.get("out_dir"),
            concurrency=concurrency,
            retries=retries,
            require_selection=False,
        )
    if not len(failed):
        return results
    items = _plan_items_for(settings, [str(url) for url in failed["url"]], failed)
    from engine.plan.table import items_to_table

    again = run_in_thread(
        lambda: _run(settings, TablePlan(items_to_table(items)), _progress(progress, settings))
    )
    return _merge(results, again)


def _plan_items_for(settings: Settings, urls: list[str], rows: Table) -> list[PlanItem]:
    """The saved plan's rows for `urls` (with their declared size and md5), else bare items."""
    from engine.plan.table import PLAN_FILE, SAVED_PLAN_HINT, iter_plan
    from engine.redact import redact

    wanted = set(urls)
    plan_path = settings.state_dir / PLAN_FILE
    found: dict[str, PlanItem] = {}
    if plan_path.exists():
        for item in iter_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT):
            if item.url in wanted or redact(item.url) in wanted:
                found[redact(item.url)] = item
    items = []
    for row in rows:
        url = str(row["url"])
        items.append(
            found.get(url)
            or PlanItem(
                url=url,
                filename=str(row["filename"]),
                obs_id=str(row["obs_id"]),
                product=str(row["product"]),
                sector=int(row["sector"]),
            )
        )
    return items


def _merge(results: Results, again: Results) -> Results:
    """`results` with each retried row replaced by its new outcome (rebuilt: a string column's
    width is fixed, and "verified" does not fit where "failed" was)."""
    newer = {str(row["url"]): row for row in again}
    columns: dict[str, list] = {name: [] for name in RESULT_COLUMNS}
    for row in results:
        source = newer.get(str(row["url"]), row)
        for name in RESULT_COLUMNS:
            value = source[name]
            columns[name].append(value.item() if hasattr(value, "item") else value)
    merged = Results(columns, names=RESULT_COLUMNS, dtype=_RESULT_DTYPES)
    merged.meta.update(results.meta)
    failed = columns["status"].count("failed")
    interrupted = bool(again.meta.get("interrupted"))
    merged.meta.update(
        {
            "downloaded": int(results.meta.get("downloaded", 0)) + int(again.meta.get("downloaded", 0)),
            "failed": failed,
            "bytes": int(results.meta.get("bytes", 0)) + int(again.meta.get("bytes", 0)),
            "interrupted": interrupted,
            "exit_code": again.meta["exit_code"] if failed or interrupted else 0,
        }
    )
    return merged


async def plan_async(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    tap_url: str | None = None,
    sector: int | None = None,
    camera: int | Sequence[int] | None = None,
    ccd: int | Sequence[int] | None = None,
    polygon: str | Sequence[float] | None = None,
    cone: str | Sequence[float] | None = None,
    targets_file: str | Path | None = None,
    sectors: str | Sequence[int] | None = None,
    products: str | Sequence[str] | None = None,
    footprint: str | None = None,
    collection: str | None = None,
    layout: str | None = None,
) -> Table:
    """The plan, as an astropy Table, without downloading anything (see `plan`)."""
    if settings is None:
        settings = build_settings(
            config,
            tap_url=tap_url,
            sector=sector,
            camera=camera,
            ccd=ccd,
            polygon=polygon,
            cone=cone,
            targets_file=targets_file,
            sectors=sectors,
            products=products,
            footprint=footprint,
            collection=collection,
            layout=layout,
        )
    from engine.plan.table import items_to_table

    items: list[PlanItem] = []
    summary = PlanSummary()
    source = plan_source_for(settings, save=False)
    async for page in source.pages():
        items.extend(page)
        summary.add(page)
    table = items_to_table(items)
    guard = getattr(getattr(source, "planner", None), "guard", None)
    table.meta.update(
        {
            "files": summary.files,
            "bytes": summary.nbytes,
            "by_product": dict(sorted(summary.by_product.items())),
            "by_sector": {int(k): v for k, v in sorted(summary.by_sector.items())},
            "summary": summary.lines(guard_line=guard.summary_line() if guard is not None else ""),
        }
    )
    if guard is not None:
        table.meta["guard"] = guard.counts()
    return table


def plan(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    tap_url: str | None = None,
    sector: int | None = None,
    camera: int | Sequence[int] | None = None,
    ccd: int | Sequence[int] | None = None,
    polygon: str | Sequence[float] | None = None,
    cone: str | Sequence[float] | None = None,
    targets_file: str | Path | None = None,
    sectors: str | Sequence[int] | None = None,
    products: str | Sequence[str] | None = None,
    footprint: str | None = None,
    collection: str | None = None,
    layout: str | None = None,
) -> Table:
    """Plan only: what `mirror` would download, as an astropy Table, without downloading anything.

    Parameters
    ----------
    config, settings, tap_url, sector, camera, ccd, polygon, cone, targets_file, sectors, products, \
footprint, collection, layout
        As for `mirror` (see `build_settings`).

    Returns
    -------
    astropy.table.Table
        One row per file (`url`, `filename`, `obs_id`, `product`, `sector`, `size` in bytes or -1,
        `est_kb`, `md5`, `target_name`). `meta` holds `files`, `bytes` (declared sizes, with the
        kB estimate where no exact size is known), `by_product`, `by_sector`, the rows the plan's
        guard merged or dropped and why (`guard`), and the printable `summary` lines.

    Raises
    ------
    engine.exceptions.TessMirrorError
        Bad input (`ConfigError`) or an archive that failed (`ArchiveError`).
    """
    return run_in_thread(
        lambda: plan_async(
            config,
            settings=settings,
            tap_url=tap_url,
            sector=sector,
            camera=camera,
            ccd=ccd,
            polygon=polygon,
            cone=cone,
            targets_file=targets_file,
            sectors=sectors,
            products=products,
            footprint=footprint,
            collection=collection,
            layout=layout,
        )
    )


def run_in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine `make()` builds to its end in a new event loop in a worker thread.

    The caller's thread may have a running loop of its own (Jupyter): it only waits. An interrupt
    while waiting (KeyboardInterrupt) cancels the coroutine in its loop, waits for its cleanup, and
    is then raised again here.
    """
    state: dict[str, Any] = {}
    started = threading.Event()
    finished = threading.Event()

    def worker() -> None:
        loop = new_event_loop()
        try:
            task = loop.create_task(make())
            state["loop"], state["task"] = loop, task
            started.set()
            state["result"] = loop.run_until_complete(task)
        except BaseException as err:  # handed to the caller, whatever it is
            state["error"] = err
        finally:
            started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                finished.set()

    thread = threading.Thread(target=worker, name="tessmirror-run", daemon=True)
    thread.start()
    interrupted = False
    while not finished.is_set():
        try:
            finished.wait(0.2)  # short waits: an interrupt reaches this thread between them
        except KeyboardInterrupt:
            interrupted = True
            started.wait()
            loop, task = state.get("loop"), state.get("task")
            if loop is not None and task is not None and not finished.is_set():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to cancel
                    loop.call_soon_threadsafe(task.cancel)
    thread.join()
    if interrupted:
        raise KeyboardInterrupt
    error = state.get("error")
    if error is not None:
        raise error
    return state["result"]


__all__ = [
    "Results",
    "build_settings",
    "mirror",
    "mirror_async",
    "outcome_table",
    "plan",
    "plan_async",
    "retry",
]
