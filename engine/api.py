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
import difflib
import inspect
import re
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar, get_args, get_type_hints

from astropy.table import Table

from engine.aio import new_event_loop
from engine.cluster import import_extra
from engine.config import load_settings
from engine.exceptions import ConfigError
from engine.manager import MirrorRun, RunOutcome
from engine.models import PlanItem
from engine.plan.sources import PlanSource, TablePlan, plan_source_for
from engine.progress import PlanSummary, Progress
from engine.settings import Settings

# PEP 692's Unpack is in typing from 3.11; on 3.10 it comes from typing_extensions (a dependency
# there), so typing.get_type_hints(mirror) works on every supported Python.
if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

T = TypeVar("T")


# The keywords shared by the entry points, each declared once: its Python name (the CLI flag's),
# its type, and (in Annotated) the configuration key it sets. `KEYWORDS` is read from these.
class PlanOptions(TypedDict, total=False):
    """The keywords of `plan`, `mirror` and `build_settings` that say what to plan.

    Each is a CLI flag under its Python name; None (or leaving it out) means "not given", so the
    configuration file or the default holds. Strings are read as on the command line
    (`sectors="1-3"`, `products="lc,tp"`). Give one selection: `sector`, `polygon`, `cone` or
    `targets_file` (or, to `mirror`, `urls_file`).

    Parameters
    ----------
    tap_url : str
        The CAOM TAP service to plan with (`tap.url`).
    sector : int
        The FFI footprint's sector (1..200), with `camera` and `ccd`.
    camera, cameras : int or sequence of int
        The footprint's cameras (1..4); `camera` wins when both are given.
    ccd, ccds : int or sequence of int
        The footprint's CCDs (1..4); `ccd` wins when both are given.
    polygon : str or sequence of float
        A sky polygon instead: `[ra1, dec1, ra2, dec2, ...]` in degrees, or MAST's "POLYGON ..." form.
    cone : str or sequence of float
        A cone instead: `[ra, dec, radius]` in degrees.
    targets_file : str or Path
        A file of TIC ids or target names, one a line.
    sectors : str or sequence of int
        Which sectors' products, e.g. `[1, 2, 3]` or `"1,5-9"`; "all" by default.
    products : str or sequence of str
        Product types (`lc`, `tp`, `dvt`, `dvr`, `dvm`, `dvs`, `fast-lc`, `fast-tp`, `ffic`, `ffir`).
    footprint : str
        "middle" or "composite": how a camera/CCD's footprint is taken from its FFI observations.
    collection : str
        The ObsCore `obs_collection` ("TESS").
    layout : str
        The folder layout of the mirror: "mast", "sector" or "flat".
    """

    tap_url: Annotated[str | None, "tap.url"]
    sector: Annotated[int | None, "selection.sector"]
    camera: Annotated[int | Sequence[int] | None, "selection.cameras"]
    cameras: Annotated[int | Sequence[int] | None, "selection.cameras"]
    ccd: Annotated[int | Sequence[int] | None, "selection.ccds"]
    ccds: Annotated[int | Sequence[int] | None, "selection.ccds"]
    polygon: Annotated[str | Sequence[float] | None, "selection.polygon"]
    cone: Annotated[str | Sequence[float] | None, "selection.cone"]
    targets_file: Annotated[str | Path | None, "selection.targets_file"]
    sectors: Annotated[str | Sequence[int] | None, "selection.sectors"]
    products: Annotated[str | Sequence[str] | None, "selection.products"]
    footprint: Annotated[str | None, "selection.footprint"]
    collection: Annotated[str | None, "selection.collection"]
    layout: Annotated[str | None, "output.layout"]


class FetchOptions(TypedDict, total=False):
    """The keywords of `mirror`, `retry` and `build_settings` that say how to download.

    None (or leaving it out) means "not given", as for `PlanOptions`.

    Parameters
    ----------
    concurrency : int or str
        Downloads in flight (1..256), or "auto" to measure the path.
    per_host : int
        Connections per host; by default the same as `concurrency`.
    retries : int
        Tries per file beyond the first.
    idle_timeout : float
        Seconds without a byte before a download is retried.
    bandwidth_limit : float
        Bytes per second for the whole run.
    source : str
        Where file bytes come from: "mast", "s3" or "auto".
    token_env : str
        The environment variable holding a MAST token.
    verify : str
        How hard each file is checked: "size", "checksum" or "fits".
    """

    concurrency: Annotated[int | str | None, "fetch.concurrency"]
    per_host: Annotated[int | None, "fetch.per_host"]
    retries: Annotated[int | None, "fetch.retries"]
    idle_timeout: Annotated[float | None, "fetch.idle_timeout"]
    bandwidth_limit: Annotated[float | None, "fetch.bandwidth_limit"]
    source: Annotated[str | None, "fetch.source"]
    token_env: Annotated[str | None, "fetch.token_env"]
    verify: Annotated[str | None, "verify.level"]


class MirrorOptions(PlanOptions, FetchOptions, total=False):
    """The keywords of `mirror` and `build_settings`: `PlanOptions`, `FetchOptions` and these.

    Parameters
    ----------
    urls_file : str or Path
        A file of URLs, one a line, or a saved plan (ECSV), instead of a selection: no planning.
    out_dir : str or Path
        Where the files go.
    state_dir : str or Path
        The manifest, lock and saved plan; `<out_dir>/.tessmirror` by default.
    force : bool
        Skip the free-space check before downloading.
    recheck : bool
        Check again the files the manifest says are done.
    refresh_plan : bool
        Query TAP again even when a saved plan exists.
    cluster : str
        Spread the downloads over Dask workers (the `cluster` extra): "local" (worker processes on
        this machine), "slurm" (workers in Slurm jobs) or "tcp://HOST:PORT" (a running scheduler
        whose workers have the resource MAST=1). "slurm-runner" is a command for every rank of an
        allocation (`srun tessmirror run ...`), not a call.
    jobs : int
        Workers (batches at once); the archive sees at most `jobs` x `job_concurrency` connections.
    job_concurrency : int
        Connections per worker; by default `concurrency` (8 when that is "auto").
    queue, account, walltime : str
        Slurm only: partition, account and time limit (HH:MM:SS) of the worker jobs.
    """

    urls_file: Annotated[str | Path | None, "selection.urls_file"]
    out_dir: Annotated[str | Path | None, "output.out_dir"]
    state_dir: Annotated[str | Path | None, "output.state_dir"]
    force: Annotated[bool | None, "run.force"]
    recheck: Annotated[bool | None, "run.recheck"]
    refresh_plan: Annotated[bool | None, "run.refresh_plan"]
    cluster: Annotated[str | None, "cluster.mode"]
    jobs: Annotated[int | None, "cluster.jobs"]
    job_concurrency: Annotated[int | None, "cluster.job_concurrency"]
    queue: Annotated[str | None, "cluster.queue"]
    account: Annotated[str | None, "cluster.account"]
    walltime: Annotated[str | None, "cluster.walltime"]


def _config_keys(options: type) -> dict[str, str]:
    """Keyword -> dotted configuration key, from the `Annotated` metadata of `options`' fields."""
    hints = get_type_hints(options, include_extras=True)
    return {name: get_args(hint)[1] for name, hint in hints.items()}


# Friendly keyword names -> dotted configuration keys (the same names as the CLI flags).
KEYWORDS: dict[str, str] = _config_keys(MirrorOptions)
# `camera`/`ccd` win over `cameras`/`ccds` when both are given.
_PREFERRED = ("camera", "ccd")


def _check_keywords(
    function: Callable[..., Any], options: Mapping[str, object], known: frozenset[str]
) -> None:
    """Refuse a keyword `function` does not take with Python's own TypeError, naming the likely fix.

    `**options` takes any name at run time; without this a misspelling (`sectr=1`) would be
    dropped silently, where explicit parameters refused it.
    """
    for name in options:
        if name in known:
            continue
        parameters = inspect.signature(function).parameters.values()
        names = known | {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
        close = difflib.get_close_matches(name, sorted(names), n=1)
        if name in KEYWORDS:  # a keyword of another entry point (`plan(out_dir=...)`)
            hint = f"{name!r} is a keyword of mirror() and build_settings()"
        elif close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = f"help({function.__name__}) lists the keywords"
        raise TypeError(f"{function.__name__}() got an unexpected keyword argument {name!r}; {hint}")


_PLAN_KEYWORDS = PlanOptions.__optional_keys__
_FETCH_KEYWORDS = FetchOptions.__optional_keys__
_MIRROR_KEYWORDS = MirrorOptions.__optional_keys__


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
    require_selection: bool = True,
    **options: Unpack[MirrorOptions],
) -> Settings:
    """Settings from a TOML file and keyword arguments (keywords win), validated.

    Parameters
    ----------
    config
        A TOML file as `config.example.toml` documents; None: the defaults.
    require_selection
        Refuse settings that select nothing (False for a mirror that only needs `out_dir`).
    **options
        The CLI's flags under their Python names: every keyword of `MirrorOptions` (which gathers
        `PlanOptions` and `FetchOptions`); None means "not given".

    Returns
    -------
    Settings

    Raises
    ------
    engine.exceptions.ConfigError
        A bad value, naming its key and the fix.
    TypeError
        A keyword that is none of the above, naming the nearest one that is.
    """
    _check_keywords(build_settings, options, _MIRROR_KEYWORDS)
    # The singular forms last, so that `camera` wins over `cameras` whatever the order given.
    given = sorted(options.items(), key=lambda item: item[0] in _PREFERRED)
    overrides: dict[str, object] = {}
    for name, value in given:
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
    if settings.cluster.mode == "slurm-runner":
        # Its ranks are roles of one command started on every node (rank 0 the scheduler, the
        # others workers); a call in one process would drive a scheduler nobody serves.
        raise ConfigError(
            "cluster.mode",
            "slurm-runner is a command for every rank of a Slurm allocation, not a call from Python",
            hint="run `srun tessmirror run ... --cluster slurm-runner` in the allocation, or call "
            'mirror(..., cluster="slurm") or cluster="tcp://HOST:PORT"',
        )
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
    adopt_from: Sequence[str | Path] = (),
    adopt_link: bool = False,
    **options: Unpack[MirrorOptions],
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
    adopt_from
        Folders to look in for each planned file before downloading it (a lightkurve/astroquery
        cache `mastDownload/TESS/<obs_id>/<file>`, a flat folder, another mirror), as
        `--adopt-from`: a file found there is copied (a reflink where the file system can) into
        place, verified, and recorded as adopted. The folders are never changed.
    adopt_link
        As `--link`: hard-link found files instead of copying them (whoever can write the source
        tree can then change the mirror's copy; `tessmirror verify` catches that).
    **options
        The CLI's flags: the keywords of `MirrorOptions` (selection, output, fetch), e.g.
        `sector=1, camera=1, ccd=2, out_dir="s1"`.

    Returns
    -------
    Results
        One row per planned file; see `Results`.

    Raises
    ------
    engine.exceptions.TessMirrorError
        For a problem with the whole run (bad input, the archive, this machine).
    TypeError
        An unknown keyword, naming the nearest known one.
    """
    _check_keywords(mirror_async, options, _MIRROR_KEYWORDS)
    if settings is None:
        settings = build_settings(config, require_selection=plan_source is None, **options)
    return await _run(
        settings, plan_source, _progress(progress, settings), adopt_from=adopt_from, adopt_link=adopt_link
    )


def mirror(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    progress: bool | Progress | None = None,
    adopt_from: Sequence[str | Path] = (),
    adopt_link: bool = False,
    **options: Unpack[MirrorOptions],
) -> Results:
    """Plan and download, blocking until the run ends; works inside a running loop (Jupyter) too.

    The run gets its own event loop in a worker thread. Ctrl-C (a notebook's "interrupt kernel")
    cancels it cleanly (manifest flushed, lock released) and then raises KeyboardInterrupt here.

    Parameters
    ----------
    config, settings, progress, adopt_from, adopt_link
        As for `mirror_async`.
    **options
        The CLI's flags: the keywords of `MirrorOptions`, as for `mirror_async`.

    Returns
    -------
    Results
        One row per planned file; `results.errors` lists the failures, `retry(results)` retries them.

    Raises
    ------
    engine.exceptions.TessMirrorError, TypeError
        As for `mirror_async`.
    KeyboardInterrupt
        After an interrupt stopped the run cleanly; call again to resume.
    """
    _check_keywords(mirror, options, _MIRROR_KEYWORDS)
    # Built here, in the caller's thread: a bad value raises before any thread starts, and a Slurm
    # cluster's dask_jobqueue is first imported where Python lets it set its signal handler.
    if settings is None:
        settings = build_settings(config, **options)
    elif (settings.cluster.mode or "").startswith("slurm"):
        import_extra("dask_jobqueue")
    chosen = settings
    return run_in_thread(
        lambda: mirror_async(settings=chosen, progress=progress, adopt_from=adopt_from, adopt_link=adopt_link)
    )


def retry(
    results: Results,
    *,
    settings: Settings | None = None,
    config: str | Path | None = None,
    progress: bool | Progress | None = None,
    **options: Unpack[FetchOptions],
) -> Results:
    """Download again just the failed rows of `results` (as parfive's `Downloader.retry`).

    Parameters
    ----------
    results
        What `mirror` returned; `results.meta["out_dir"]` says where the mirror is.
    settings, config
        The run's settings or configuration file, if it was not the defaults (layout, state_dir).
    progress
        As for `mirror`.
    **options
        How to download: the keywords of `FetchOptions` (`concurrency`, `retries`, ...).

    Returns
    -------
    Results
        `results` with every retried row replaced by its new outcome, and the counts recomputed.

    Raises
    ------
    engine.exceptions.TessMirrorError, TypeError
        As for `mirror_async`: a problem with the whole run, or an unknown keyword.
    """
    _check_keywords(retry, options, _FETCH_KEYWORDS)
    failed = results.errors
    if settings is None:
        settings = build_settings(
            config, out_dir=results.meta.get("out_dir"), require_selection=False, **options
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
    **options: Unpack[PlanOptions],
) -> Table:
    """The coroutine form of `plan`: the plan as an astropy Table, in the running event loop.

    Parameters
    ----------
    config, settings, **options
        As for `plan` (what to plan: the keywords of `PlanOptions`).

    Returns
    -------
    astropy.table.Table
        The plan, as `plan` describes it.

    Raises
    ------
    engine.exceptions.TessMirrorError, TypeError
        As for `plan`.
    """
    _check_keywords(plan_async, options, _PLAN_KEYWORDS)
    if settings is None:
        settings = build_settings(config, **options)
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
    **options: Unpack[PlanOptions],
) -> Table:
    """Plan only: what `mirror` would download, as an astropy Table, without downloading anything.

    Parameters
    ----------
    config, settings
        As for `mirror_async`.
    **options
        What to plan: the keywords of `PlanOptions` (`sector`, `camera`, `ccd`, `products`, ...).

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
    TypeError
        An unknown keyword, naming the nearest known one.
    """
    _check_keywords(plan, options, _PLAN_KEYWORDS)
    return run_in_thread(lambda: plan_async(config, settings=settings, **options))


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
    "FetchOptions",
    "MirrorOptions",
    "PlanOptions",
    "Results",
    "build_settings",
    "mirror",
    "mirror_async",
    "outcome_table",
    "plan",
    "plan_async",
    "retry",
]
