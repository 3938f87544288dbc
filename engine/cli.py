"""The `tessmirror` command. Every flag is also a configuration key; flags win over the file.

Exit codes (see README): 0 all verified; 1 some files failed or a mirror check found problems;
2 bad input; 3 the archive failed; 4 this machine refused (disk, permissions, a lock, memory);
129 stopped by SIGHUP; 130 stopped by SIGINT or SIGTERM; 141 standard output was a pipe whose
reader went away (`plan | head -1`), as for any Unix tool stopped by SIGPIPE.

Signals: `main()` installs its handlers first thing, before any heavy import. Before the run's event
loop is up, a signal raises `_Stopped` (nothing holds a lock yet); while the loop runs, it asks the run
to stop, and the run flushes the manifest and releases the lock. A second signal is ignored: it never
changes the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.archive.cli_options import Flag, add_flags
from engine.exceptions import (
    EXIT_INTERNAL,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    TessMirrorError,
)
from engine.redact import RedactingFilter, redact

if TYPE_CHECKING:
    import asyncio

    from engine.progress import PlanSummary

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1` under pipefail


# -- signals ------------------------------------------------------------------------------------
class _Stopped(BaseException):
    """Raised by the signal handler while no event loop can take the stop request."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGate:
    """Turns SIGINT, SIGTERM and SIGHUP into one graceful stop, whatever phase the CLI is in."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        # callable(signum) while an event loop takes stop requests
        self._deliver: Callable[[int], None] | None = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        first = self.received is None
        if first:
            self.received = signum  # a second signal never changes the outcome
        deliver = self._deliver
        if deliver is not None:
            deliver(self.received or signum)  # asking the run to stop twice is harmless
        elif first:
            raise _Stopped(signum)
        # A second signal before the loop takes requests: the first one's _Stopped is already on its
        # way (raising again could cut its clean-up short), or it was swallowed by code that catches
        # everything; then `deliver_to` sees `received` and stops the run as soon as it starts.

    @contextlib.contextmanager
    def deliver_to(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], object]) -> Iterator[None]:
        """While the run's loop is up, a signal calls `stop` in that loop instead of raising.

        A process-directed signal may land on any thread (pyvo's, a verify thread), and then the main
        thread's select() is not interrupted. A wakeup fd makes the C-level handler write a byte the
        loop watches, so the loop wakes at once and the main thread runs the Python handler.
        """
        import socket

        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        loop.add_reader(reader.fileno(), _drain, reader)

        def deliver(_signum: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
                loop.call_soon_threadsafe(stop)

        self._deliver = deliver
        if self.received is not None:
            # A signal came before the loop took requests and its _Stopped did not end start-up
            # (a library caught it): the request is sticky, so the run stops now instead of never.
            loop.call_soon(stop)
        try:
            yield
        finally:
            self._deliver = None
            loop.remove_reader(reader.fileno())
            signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()

    @property
    def exit_code(self) -> int:
        return 129 if self.received == signal.SIGHUP else 130

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


_GATE = _SignalGate()


def _drain(sock: object) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(512):  # type: ignore[attr-defined]
            pass


log = logging.getLogger(__name__)

DEMO_OUT = "tessmirror-demo"
# A fixed port keeps the archive's URLs the same from one demo to the next, so a second
# `tessmirror demo` resumes (and skips every verified file) instead of downloading again.
DEMO_PORT = 27301  # below the ephemeral range (32768-60999), so no client socket holds it


# -- flag parsing -------------------------------------------------------------------------------
def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _bytes_rate(text: str) -> float:
    """'5M', '500k', '2.5e6' -> bytes per second."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().removesuffix("/s").removesuffix("b")
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigError("fetch.bandwidth_limit", f"expected a rate like 5M or 500k, got {text!r}") from None


def _default(key: str) -> str:
    """The schema's default for `key` ("fetch.retries"), as help shows it: never restated by hand."""
    import enum

    from engine.settings import Settings

    section, name = key.split(".")
    value = getattr(getattr(Settings(), section), name)
    if isinstance(value, enum.Enum):
        return value.name.lower()  # as the flag takes it: VerifyLevel.FITS -> fits
    return f"{value:g}" if isinstance(value, float) else str(value)


def _field_metadata(key: str) -> Mapping[str, Any]:
    """The schema field's metadata for `key` ("fetch.retries"): its flag's "help" and "metavar".

    Empty when `key` names no settings field (a flag whose `dest` is its own, e.g. "adopt_from").
    """
    from engine.settings import Settings

    section, _, name = key.partition(".")
    # Each section is its table's dataclass, given as the default factory: no Settings() is built.
    tables = {each.name: each.default_factory for each in dataclasses.fields(Settings)}
    table = tables.get(section)
    if not name or not isinstance(table, type) or not dataclasses.is_dataclass(table):
        return {}
    return next((each.metadata for each in dataclasses.fields(table) if each.name == name), {})


def _lazy_parser(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        from engine import config

        return getattr(config, name)(text)

    return parse


@dataclasses.dataclass(frozen=True)
class _Flag(Flag):
    """A `Flag` that may read the settings schema and a registry when the parser is built.

    A flag whose `dest` is a settings key and whose `help` is empty takes its help (and its metavar,
    when it states none) from that field's metadata in engine/settings.py, so the schema words its
    own keys; a `variant(help=...)` still words it differently for one command. `shows_default`: the
    help ends "(default X)", X the schema's default at the flag's `dest`, so a default lives in one
    place. `choices_from`: the registry that names the accepted values. The schema and the registry
    are read only when the parser is built, because the CLI's first lines come before any heavy import.
    """

    shows_default: bool = False
    choices_from: Callable[[], Sequence[str]] | None = None

    def _schema(self) -> Mapping[str, Any]:
        dest = self.options.get("dest")
        return _field_metadata(dest) if isinstance(dest, str) else {}

    def help_text(self) -> str:
        """The help (the schema's, unless this flag words its own), with the default when `shows_default`."""
        text = self.help or self._schema().get("help", "")
        if not text:
            raise ValueError(f"{'/'.join(self.names)}: no help, and its dest names no settings field")
        if not self.shows_default:
            return text
        return f"{text} (default {_default(self.options['dest'])})"

    def add(self, parser: argparse._ActionsContainer, **overrides: Any) -> argparse.Action:
        """Add this flag to `parser`; its choices (registry) and metavar (schema) are read now."""
        if self.choices_from is not None:
            overrides = {"choices": self.choices_from(), **overrides}
        metavar = self._schema().get("metavar")
        if metavar is not None and "metavar" not in self.options:
            overrides = {"metavar": metavar, **overrides}
        return super().add(parser, **overrides)


def _flag(
    *names: str,
    help: str = "",
    shows_default: bool = False,
    choices_from: Callable[[], Sequence[str]] | None = None,
    **options: Any,
) -> _Flag:
    """A `_Flag` from `add_argument`'s arguments (see `_Flag` for the two extra keywords).

    `help` may be left out when `dest` is a settings key: the field's metadata then gives it.
    """
    return _Flag(names, help, options, shows_default, choices_from)


def _verify_levels() -> Sequence[str]:
    from engine.models import VerifyLevel

    return VerifyLevel.names()


def _layouts() -> list[str]:
    from engine.layout import layout_names

    return list(layout_names())


# Every flag below is written once; a command that words one differently adds a `variant` of it.
# A flag whose dest is a settings key states no help or metavar here: engine/settings.py's field
# metadata holds them, beside the default.
# --config and the logging flags, accepted before the command and after it (see `_add_common`).
_COMMON = (
    _flag("--config", type=Path, metavar="FILE", help="TOML configuration file (see config.example.toml)"),
    _flag("--log-level", dest="run.log_level", shows_default=True),
    _flag(
        "-q", "--quiet", action="store_true",
        help="only warnings, errors and the summary; no progress bar",
    ),
    _flag("-v", "--verbose", action="store_true", help="DEBUG lines (each retry, each request's fate)"),
    _flag(
        "--log-file", type=Path, metavar="FILE",
        help="also write the log here, at DEBUG level whatever the terminal shows",
    ),
)  # fmt: skip

_SELECTION_TITLE = "selection (also [selection] in the config file); choose one of the first five"
_SELECTION = (
    _flag("--sector", dest="selection.sector", type=int),
    _flag("--camera", dest="selection.cameras"),
    _flag("--ccd", dest="selection.ccds"),
    _flag("--polygon", dest="selection.polygon", type=_lazy_parser("parse_polygon")),
    _flag("--cone", dest="selection.cone", type=_lazy_parser("parse_cone")),
    _flag("--targets", dest="selection.targets_file", type=Path),
    _flag("--sectors", dest="selection.sectors", type=_lazy_parser("parse_sectors")),
    _flag("--products", dest="selection.products", type=_str_list),
    _flag("--footprint", dest="selection.footprint", choices=("middle", "composite")),
    _flag("--collection", dest="selection.collection"),
    _flag("--tap-url", dest="tap.url"),
)

# Not required by argparse: `out_dir` in the --config file satisfies it (checked in `_settings`).
_OUT = _flag("--out", dest="output.out_dir", type=Path)
_STATE_DIR = _flag("--state-dir", dest="output.state_dir", type=Path)
_INPUT = _flag("--input", dest="selection.urls_file", type=Path)
_CONCURRENCY = (
    _flag("--concurrency", dest="fetch.concurrency", shows_default=True),
    _flag("--max-connections", dest="fetch.max_connections", type=int, shows_default=True),
)
_SOURCE = _flag("--source", dest="fetch.source", choices=("mast", "s3", "auto"))
_RETRIES = _flag("--retries", dest="fetch.retries", type=int, shows_default=True)
_TOKEN_ENV = _flag("--token-env", dest="fetch.token_env", shows_default=True)
_NO_FSYNC = _flag("--no-fsync", dest="output.fsync", action="store_const", const=False)
_PROGRESS_INTERVAL = _flag(
    "--progress-interval", dest="run.progress_interval", type=float, shows_default=True
)
_VERIFY_LEVEL = _flag("--verify", dest="verify.level", choices_from=_verify_levels, shows_default=True)

_DOWNLOAD_TITLE = "download (also [fetch], [verify], [output], [run] in the config file)"
_DOWNLOAD = (
    _flag(
        "--adopt-from", dest="adopt_from", action="append", type=Path, default=[], metavar="DIR",
        help="before downloading a file, look for it by name in DIR (a lightkurve/astroquery cache "
        "mastDownload/TESS/<obs_id>/<file>, a flat folder, another mirror); it is copied (a reflink where "
        "the file system can) into place and verified; DIR is never changed (repeatable)",
    ),
    _flag(
        "--link", dest="adopt_link", action="store_true",
        help="with --adopt-from: hard-link found files instead of copying them (no extra space, but "
        "whoever can write DIR can later change the mirror's copy; verify catches it)",
    ),
    *_CONCURRENCY,
    _flag("--per-host", dest="fetch.per_host", type=int),
    _SOURCE,
    _flag("--s3-endpoint", dest="fetch.s3_endpoint"),
    _VERIFY_LEVEL,
    _flag("--layout", dest="output.layout", choices_from=_layouts, shows_default=True),
    _RETRIES,
    _flag("--idle-timeout", dest="fetch.idle_timeout", type=float, shows_default=True),
    _flag("--bandwidth", dest="fetch.bandwidth_limit", type=_bytes_rate),
    _TOKEN_ENV,
    _flag("--force", dest="run.force", action="store_const", const=True),
    _flag("--shard", dest="run.shard"),
    _flag("--recheck", dest="run.recheck", action="store_const", const=True),
    _flag("--refresh-plan", dest="run.refresh_plan", action="store_const", const=True),
    _NO_FSYNC,
    _PROGRESS_INTERVAL,
)  # fmt: skip

_CLUSTER_TITLE = "cluster (also [cluster] in the config file; needs pip install 'tessmirror[cluster]')"
_CLUSTER = (
    _flag("--cluster", dest="cluster.mode"),
    _flag("--jobs", dest="cluster.jobs", type=int),
    _flag("--job-concurrency", dest="cluster.job_concurrency", type=int),
    _flag("--queue", dest="cluster.queue"),
    _flag("--account", dest="cluster.account"),
    _flag("--walltime", dest="cluster.walltime"),
    _flag("--job-extra", dest="cluster.job_extra", action="append"),
)


def _add_group(p: argparse.ArgumentParser, title: str, flags: Sequence[Flag]) -> None:
    add_flags(p.add_argument_group(title), flags)


def _add_out(p: argparse.ArgumentParser, *, what: str = "output directory") -> None:
    add_flags(p, (_OUT.variant(help=f"{what} (or out_dir in [output])"), _STATE_DIR))


def _add_download(p: argparse.ArgumentParser) -> None:
    """--out and the download and cluster groups: what `run` and `fetch` share."""
    _add_out(p)
    _add_group(p, _DOWNLOAD_TITLE, _DOWNLOAD)
    _add_group(p, _CLUSTER_TITLE, _CLUSTER)


def _add_common(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--config and the logging flags. Accepted before the command and after it: the subcommand's
    copies default to "not given" (SUPPRESS), so they never overwrite what came before the command."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    for each in _COMMON:
        each.add(p, **default)


class _Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped flag (argparse itself has one from Python 3.14)."""

    def suggest(self, extras: Sequence[str]) -> str:
        """'unrecognized arguments: --sectr 1; did you mean --sector?'"""
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        message = f"unrecognized arguments: {' '.join(extras)}"
        for extra in extras:
            if not extra.startswith("-"):
                continue
            flag = extra.split("=", 1)[0]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
            if close:
                return f"{message}; did you mean {close[0]}?"
        return message


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tessmirror",
        description="Verified, resumable bulk downloads of TESS products from MAST.",
        epilog="`tessmirror COMMAND --help` lists a command's flags. Every flag is also a configuration "
        "key; flags win over the --config file.",
    )
    parser.add_argument("--version", action="version", version=f"tessmirror {__version__}")
    _add_common(parser, top=True)
    common = _Parser(add_help=False)  # the subparsers' parents must be of their class
    _add_common(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", parents=[common], help="print or export the inventory, with its size")
    _add_group(p, _SELECTION_TITLE, _SELECTION)
    add_flags(
        p,
        (
            _flag(
                "--format", default="ecsv", choices=("ecsv", "votable", "csv", "urls", "aria2", "curl"),
                help="output format (default ecsv; aria2 and curl for other downloaders)",
            ),
            _flag(
                "-o", "--output", type=Path, metavar="FILE",
                help="write the plan here instead of standard output",
            ),
            _PROGRESS_INTERVAL.variant(help="seconds between 'planning… N files found so far' lines"),
        ),
    )  # fmt: skip

    p = sub.add_parser("run", parents=[common], help="plan, then download into --out")
    _add_group(p, _SELECTION_TITLE, _SELECTION)
    _INPUT.add(p)
    _add_download(p)
    _flag(
        "--dry-run", action="store_true",
        help="plan and print the summary and the free-space verdict; download nothing",
    ).add(p)  # fmt: skip

    p = sub.add_parser("fetch", parents=[common], help="download a plan in any export format, or a URL list")
    _INPUT.add(p)
    _add_download(p)

    p = sub.add_parser("status", parents=[common], help="report on a mirror from its manifest")
    _add_out(p, what="the mirror's output directory")

    p = sub.add_parser("verify", parents=[common], help="re-check a mirror against its manifest")
    _add_out(p, what="the mirror's output directory")
    _VERIFY_LEVEL.variant(names=("--level",), help="how deep to check").add(p)
    _flag("--repair", action="store_true", help="move bad files aside and download them again").add(p)
    repair = (
        *_CONCURRENCY,
        _RETRIES,
        _TOKEN_ENV.variant(shows_default=False),
        _NO_FSYNC.variant(help="do not fsync (less safe)"),
    )
    _add_group(p, "downloads of --repair", repair)

    p = sub.add_parser(
        "demo", parents=[common], help="start the local archive and mirror a footprint from it"
    )
    _OUT.add(p, default=Path(DEMO_OUT), help=f"output directory (default ./{DEMO_OUT})")
    add_flags(
        p,
        (
            _flag(
                "--targets", type=int, default=300, metavar="N",
                help="synthetic TIC targets in the archive",
            ),
            _flag(
                "--file-size", default="full", metavar="SIZE",
                help="full (about 2 MB), small, or a cadence count",
            ),
            *_CONCURRENCY,
            _SOURCE.variant(
                help="mirror through the archive's Download API (default) or from its S3-shaped bucket",
            ),
            _flag(
                "--port", type=int, default=DEMO_PORT, metavar="PORT",
                help=f"archive port (default {DEMO_PORT}, or a free one if taken)",
            ),
        ),
    )  # fmt: skip

    from engine.report import add_report_command

    add_report_command(sub, parents=[common])

    p = sub.add_parser("archive", help="the local MAST-shaped archive")
    asub = p.add_subparsers(
        dest="archive_command", required=True, metavar="ARCHIVE_COMMAND", parser_class=_Parser
    )
    from engine.archive.cli_options import add_archive_arguments

    s = asub.add_parser("serve", parents=[common], help="serve the local archive until Ctrl-C / SIGTERM")
    add_archive_arguments(s)
    return parser


def _subparser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command `ns` holds (`archive serve` included), for its flags and usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(ns, "command", None) or "")
            if chosen is None:
                return parser
            if getattr(ns, "archive_command", None):
                return _subparser(chosen, argparse.Namespace(command=ns.archive_command))
            return chosen
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; a mistyped flag gets a suggestion ('did you mean --sector?')."""
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (`register-python-argcomplete`)
        try:
            import argcomplete
        except ImportError:
            pass  # optional: `pip install argcomplete` for tab completion
        else:
            argcomplete.autocomplete(parser)
    ns, extras = parser.parse_known_args(argv)
    if extras:
        chosen = _subparser(parser, ns)
        chosen.error(
            chosen.suggest(extras) if isinstance(chosen, _Parser) else f"unrecognized arguments: {extras}"
        )
    return ns


def _overrides(ns: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(ns).items() if "." in k and v is not None}


def _settings(
    ns: argparse.Namespace,
    extra: dict[str, object] | None = None,
    *,
    selection: bool = True,
    out: bool = True,
):
    """Settings from --config and the flags. `out`: an output directory must be given, by --out or by
    `out_dir` in the file (the schema's default folder is for the Python API, not a surprise here)."""
    from engine.config import load_settings

    overrides = _overrides(ns)
    overrides.update(extra or {})
    settings = load_settings(
        getattr(ns, "config", None), overrides, require_selection=selection, require_out=out
    )
    if getattr(ns, "run.log_level", None) is None and not _LOUDNESS.get("flag"):
        _set_console_level(settings.run.log_level)  # `log_level` in the file is honoured too
    return settings


class _BarFriendlyHandler(logging.StreamHandler):
    """Writes log lines through tqdm, so a progress bar on the terminal is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except OSError:
            # stderr closed, or its reader went away (`run 2>&1 | head`): nobody reads the log any
            # more, and the run itself must go on (or stop) as if nothing happened.
            self.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the handler
        except Exception:
            self.handleError(record)


_LOUDNESS: dict[str, object] = {}  # "flag": a console level came from -q/-v/--log-level; "quiet"
_CONSOLE: list[logging.Handler] = []
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOG_DATE = "%Y-%m-%d %H:%M:%S"


def _level_name(level: str, key: str = "run.log_level") -> str:
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(key, f"unknown log level {level!r}", hint="use DEBUG, INFO, WARNING or ERROR")
    return name


def _setup_logging(
    level: str | None, *, quiet: bool = False, verbose: bool = False, log_file: Path | None = None
) -> None:
    """Console at `level` (or -q: WARNING, -v: DEBUG; default INFO); `log_file` always gets DEBUG.

    Both go through the redacting filter: a token never reaches the terminal or the file.
    """
    if quiet and verbose:
        raise ConfigError("-q/-v", "--quiet and --verbose contradict each other", hint="give one of them")
    handler = _BarFriendlyHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE))
    name = _level_name(level) if level else ("WARNING" if quiet else "DEBUG" if verbose else "INFO")
    _LOUDNESS.update(flag=bool(level or quiet or verbose), quiet=quiet)
    handler.setLevel(name)
    _CONSOLE[:] = [handler]
    handlers: list[logging.Handler] = [handler]
    root_level = logging.getLevelName(name)
    if log_file is not None:
        try:
            file_handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as err:
            raise ConfigError(
                "--log-file",
                f"cannot write the log file {str(log_file)!r}: {err.strerror or err}",
                hint="give a path in an existing, writable directory",
            ) from None
        file_handler.addFilter(RedactingFilter())
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE))
        file_handler.setLevel(logging.DEBUG)
        handlers.append(file_handler)
        root_level = logging.DEBUG
        # Libraries' own DEBUG chatter (every asyncio/urllib3/pyvo detail) would bury ours.
        for noisy in ("asyncio", "urllib3", "pyvo", "aiohttp", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler) and old not in handlers:
            old.close()
    root.handlers[:] = handlers
    root.setLevel(root_level)
    # pyvo and astropy warn about things users cannot act on (units, VOTable versions).
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _file_log_level(ns: argparse.Namespace) -> str | None:
    """`[run] log_level` from the --config file, read early so the first banner obeys it too; None
    when no flag or file says (a broken file is reported later, by the full load, naming the key)."""
    if getattr(ns, "quiet", False) or getattr(ns, "verbose", False) or not getattr(ns, "config", None):
        return None
    if sys.version_info < (3, 11):  # no tomllib: the full load applies the level a moment later
        return None
    else:  # mypy resolves the import only inside a version-checked block
        import tomllib

        try:
            document = tomllib.loads(Path(ns.config).expanduser().read_text(encoding="utf-8"))
            level = document["run"]["log_level"]
        except Exception:  # anything wrong is the full load's to report, naming the key
            return None
        known = ("DEBUG", "INFO", "WARNING", "ERROR")
        return level if isinstance(level, str) and level.upper() in known else None


def _set_console_level(level: str) -> None:
    """Apply `run.log_level` from the config file (no flag said otherwise)."""
    name = _level_name(level)
    for handler in _CONSOLE:
        handler.setLevel(name)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        root.setLevel(name)


def _describe(settings) -> str:
    """What is planned where, for the start banner: 'sector 1 camera 1 ccd 2, lc from all sectors'."""
    sel = settings.selection

    def listed(values) -> str:
        return ",".join(str(v) for v in values) if values else "all"

    if sel.urls_file is not None:
        what = f"the files listed in {'standard input' if str(sel.urls_file) == '-' else sel.urls_file}"
    else:
        if sel.targets_file is not None:
            region = f"the TIC ids in {sel.targets_file}"
        elif sel.polygon is not None:
            region = f"polygon of {len(sel.polygon) // 2} vertices"
        elif sel.cone is not None:
            region = "cone ra {:g} dec {:g} radius {:g} deg".format(*sel.cone)
        elif sel.sector is not None:
            region = f"sector {sel.sector} camera {listed(sel.cameras)} ccd {listed(sel.ccds)}"
        else:
            region = "nothing selected"
        sectors = "all sectors" if sel.sectors is None else f"sectors {listed(sel.sectors)}"
        what = f"{region}: {','.join(sel.products)} from {sectors}, via {redact(settings.tap.url)}"
    return what


def _banner(command: str, settings, *, where: bool = True) -> None:
    """The second line of the start banner, once the settings are read: what is planned, where it
    goes and how (the first, "tessmirror X: starting CMD", comes before any heavy import)."""
    text = f"{command}: {_describe(settings)}"
    if where:
        fetch = settings.fetch
        text += (
            f"; into {settings.output.out_dir.resolve()} (concurrency {_concurrency_text(fetch)}, "
            f"verify {settings.verify.level}, source {fetch.source})"
        )
    log.info("%s", text)


def _concurrency_text(fetch) -> str:
    return f"auto, at most {fetch.max_connections}" if fetch.auto_concurrency else str(fetch.concurrency)


# -- commands -----------------------------------------------------------------------------------
async def _plan_pages(settings, on_page: Callable[[list], Awaitable[None]]) -> str:
    """Plan without saving or downloading, handing each page to `on_page` (awaited before the next
    page is read); returns the guard's summary line (rows merged and dropped, and why). A signal
    cancels planning cleanly."""
    import asyncio

    from engine.plan.sources import plan_source_for

    task = asyncio.current_task()
    assert task is not None
    source = plan_source_for(settings, save=False)
    found, last = 0, time.monotonic()
    with _GATE.deliver_to(asyncio.get_running_loop(), task.cancel):
        async for page in source.pages():
            await on_page(page)
            found += len(page)
            if time.monotonic() - last >= settings.run.progress_interval:
                last = time.monotonic()
                log.info("planning… %d files found so far", found)  # a sector takes minutes
    guard = getattr(getattr(source, "planner", None), "guard", None)
    return guard.summary_line() if guard is not None else ""


async def _export_plan(settings, fmt: str, output: str | None, summary: PlanSummary) -> str:
    """Plan and write the export to `output` (standard output when None), page by page; returns the
    guard's summary line.

    Each page is formatted in memory on the loop (CPU only), then handed to the file with
    `aiofiles`: a slow disk, a full pipe or a reader paused on `| less` blocks a thread, never the
    event loop (the TAP client's timeouts and the signal gate run there). The file's writes and its
    close share one thread, so they keep their order even when a signal cancels the planning midway.
    votable is built whole at the end by astropy (CPU and I/O in one library call): a thread of its
    own (`asyncio.to_thread`), as aiofiles wraps only file methods.
    """
    import asyncio
    import io
    from concurrent.futures import ThreadPoolExecutor

    import aiofiles
    from aiofiles.threadpool.text import AsyncTextIOWrapper

    from engine.plan.table import PlanExporter

    one = ThreadPoolExecutor(1, thread_name_prefix="export")
    try:
        sink: AsyncTextIOWrapper
        if output is None:
            sink = AsyncTextIOWrapper(sys.stdout, loop=asyncio.get_running_loop(), executor=one)
        else:
            try:
                sink = await aiofiles.open(output, "w", encoding="utf-8", executor=one)
            except OSError as err:
                raise ConfigError(
                    "-o/--output",
                    f"cannot write {output}: {err.strerror}",
                    hint="give a path in an existing, writable directory",
                ) from None
        try:
            pending = io.StringIO()
            exporter = PlanExporter(fmt, pending)

            async def flush_pending() -> None:
                text = pending.getvalue()
                pending.seek(0)
                pending.truncate()
                if text:
                    await sink.write(text)

            await flush_pending()  # the header: written even if planning fails, as before

            async def on_page(page: list) -> None:
                try:
                    exporter.write(page)
                finally:  # the rows before a refused one reach the file, as they always did
                    await flush_pending()
                summary.add(page)

            guard_line = await _plan_pages(settings, on_page)
            await asyncio.to_thread(exporter.close)
            await flush_pending()
            await sink.flush()
        finally:
            if output is not None:
                await sink.close()
    finally:
        one.shutdown(wait=False)
    return guard_line


def cmd_plan(ns: argparse.Namespace) -> int:
    """Print or export the inventory, page by page as TAP answers (bounded memory), then its summary
    (files, bytes, counts by product and sector, rows dropped and why) on standard error."""
    from engine.progress import PlanSummary

    settings = _settings(ns, out=False)
    _banner("plan", settings, where=False)
    if not ns.output and 1 in _CLOSED_AT_START:
        raise _closed_stdout("the plan")
    summary = PlanSummary()
    guard_line = _run_loop(_export_plan(settings, ns.format, ns.output or None, summary))
    if ns.output:
        log.info("wrote the plan of %d files to %s (%s)", summary.files, ns.output, ns.format)
    for line in summary.lines(guard_line=guard_line):
        _say(line)
    return EXIT_OK


def _dry_run(settings) -> int:
    """`run --dry-run`: plan, print the summary and whether it fits on the disk; write nothing."""
    import shutil

    from engine.progress import PlanSummary, free_space_verdict

    summary = PlanSummary()

    async def add(page: list) -> None:
        summary.add(page)

    guard_line = _run_loop(_plan_pages(settings, add))
    for line in summary.lines(guard_line=guard_line):
        _say(line)
    out_dir = settings.output.out_dir
    probe = out_dir
    while not probe.exists() and probe.parent != probe:  # the folder a run would create: its disk
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 1 << 62
    needed = summary.nbytes - _verified_bytes(settings)
    fits, verdict = free_space_verdict(max(needed, 0), free, out_dir)
    _say(verdict)
    _say("dry run     nothing was downloaded; run the same command without --dry-run to start")
    return EXIT_OK if fits else EXIT_LOCAL  # as the run itself would end: this machine refuses


def _verified_bytes(settings) -> int:
    """Bytes an earlier run already verified in this mirror (a resumed run will not fetch them)."""
    from engine.manifest import Manifest

    manifest = Manifest(settings.state_dir)
    if not manifest.exists():
        return 0
    entries = manifest.load()
    return sum(e.nbytes for e in entries.values() if e.status == "verified")


def _run_loop(coro):
    """Run `coro` to its end in a new event loop, as `asyncio.run` does, with two differences.

    The default thread pool has a chosen size (it serves short file operations: plan pages, manifest
    batches). And the loop is closed without joining that pool's threads: `asyncio.run` waits for
    them, so one thread stuck in a network call (pyvo on a silent service) would hold the exit for
    ever. `_exit_promptly` gives such threads a short grace period instead.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from engine.aio import new_event_loop, quiet_process_hooks

    quiet_process_hooks()
    loop = new_event_loop()
    pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")
    loop.set_default_executor(pool)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            pool.shutdown(wait=False, cancel_futures=True)
            loop.close()


# The cyclic GC during a run of the command (never in the library: a notebook's GC is its own). A
# million-row plan makes millions of short-lived objects (plan rows, pages) that reference counting
# frees; with the default threshold (700) the collector ran ~1,000 times a resume and walked every
# object of start-up (aiohttp, msgspec, the settings) in each full pass, about 0.3 s. Start-up's
# objects are moved out of its sight (`gc.freeze`) and a young generation is allowed to grow larger
# before it is looked at; garbage cycles (exceptions with tracebacks) are still collected.
_RUN_GC_THRESHOLD = 50_000


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """`gc.freeze()` what start-up made and raise the first generation's threshold, for the run; both
    are undone afterwards (`main()` may be called in a process that goes on, such as a test's)."""
    import gc

    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], _RUN_GC_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _run_mirror(
    settings,
    source=None,
    *,
    command: str = "run",
    adopt_from: Sequence[Path] = (),
    adopt_link: bool = False,
) -> int:
    import asyncio

    from engine.manager import MirrorRun, summarize
    from engine.progress import Progress

    if settings.cluster.mode == "slurm-runner":
        from engine.cluster import spec_from_settings
        from engine.cluster.driver import serve_runner_role

        # Every rank of the allocation runs this command: rank 1 drives, the others serve Dask.
        role_exit = serve_runner_role(spec_from_settings(settings), settings)
        if role_exit is not None:
            return role_exit
    _banner(command, settings)
    quiet = bool(_LOUDNESS.get("quiet"))
    progress = Progress(interval=settings.run.progress_interval, bar=False if quiet else None)
    run = MirrorRun(
        settings,
        source,
        progress=progress,
        collect_results=False,
        handle_signals=False,
        adopt_from=adopt_from,
        adopt_link=adopt_link,
    )

    async def mirror():
        with _GATE.deliver_to(asyncio.get_running_loop(), run.stop):
            return await run.run()

    try:
        with _quiet_gc():
            outcome = _run_loop(mirror())
    finally:
        progress.close()
    for line in summarize(outcome):
        _say(line)
    for line in progress.summary_lines():
        _say(line)
    return outcome.exit_code


def cmd_run(ns: argparse.Namespace) -> int:
    settings = _settings(ns)
    if ns.dry_run:
        _banner("run --dry-run", settings)
        return _dry_run(settings)
    return _run_mirror(settings, adopt_from=ns.adopt_from, adopt_link=ns.adopt_link)


def cmd_status(ns: argparse.Namespace) -> int:
    from engine.manifest import Manifest
    from engine.progress import human_bytes

    settings = _settings(ns, selection=False)
    if 1 in _CLOSED_AT_START:
        raise _closed_stdout("the report")
    manifest = Manifest(settings.state_dir)
    if not manifest.exists():  # the main manifest, or only shards' (manifest.d/*.jsonl)
        raise ConfigError(
            "output.out_dir",
            f"no tessmirror manifest at {manifest.main_path}",
            hint="give the --out of an earlier `tessmirror run`",
        )
    entries = manifest.load()
    counts = Counter(e.status for e in entries.values())
    nbytes = sum(e.nbytes for e in entries.values() if e.status == "verified")
    print(f"mirror      {settings.output.out_dir}")
    print(f"files       {len(entries)}")
    for status, n in sorted(counts.items()):
        print(f"{status:<11} {n}")
    print(f"bytes       {human_bytes(nbytes)} verified")
    from engine.plan.table import PLAN_FILE, SAVED_PLAN_HINT, iter_plan

    plan = settings.state_dir / PLAN_FILE
    if plan.exists():
        planned = sum(1 for _ in iter_plan(plan, key="plan", hint=SAVED_PLAN_HINT))
        print(f"planned     {planned} ({max(planned - counts.get('verified', 0), 0)} still to do)")
    withdrawn = settings.state_dir / "withdrawn.txt"
    if withdrawn.exists():
        with open(withdrawn, encoding="utf-8", errors="replace") as listing:
            n = sum(1 for line in listing if line.strip() and not line.startswith("#"))
        print(f"withdrawn   {n}  (no longer in the plan; kept on disk: {withdrawn})")
    failed = [e for e in entries.values() if e.status == "failed"]
    for e in failed[:20]:
        print(f"  ! {e.path or e.url}: {e.error}")
    sys.stdout.flush()
    return EXIT_OK if not failed else EXIT_PARTIAL


def cmd_verify(ns: argparse.Namespace) -> int:
    """Check the mirror again. Exit 0 only when the mirror matches its manifest: every file verified
    on disk, none failed or pending, nothing unexpected; exit 1 otherwise, each file named.

    `--repair` moves bad and unexpected files to `OUT/.tessmirror/quarantine/` (never deletes them),
    then downloads again every file that is bad, missing, failed or pending. It exits 0 when the
    mirror is whole afterwards, including when the only problems were unexpected files (they are in
    the quarantine now), and 1 when a download failed.
    """
    from engine.manifest import Manifest
    from engine.mirrorcheck import check_mirror
    from engine.plan.sources import TablePlan
    from engine.plan.table import PLAN_FILE, SAVED_PLAN_HINT, items_to_table, iter_plan

    settings = _settings(ns, selection=False)
    # verify (and --repair's downloads) work on the whole folder: a `[run] shard` of the config is not
    # theirs, and --repair takes the folder exclusively.
    settings.run.shard = None
    manifest = Manifest(settings.state_dir)
    if not manifest.exists():
        raise ConfigError(
            "output.out_dir",
            f"no tessmirror manifest at {manifest.path}",
            hint="give the --out of an earlier `tessmirror run`",
        )

    def progress(done: int, total: int) -> None:
        log.info("verify: %d/%d files checked", done, total)

    report = check_mirror(
        settings.output.out_dir,
        manifest,
        level=settings.verify.level,
        repair=ns.repair,
        progress=progress,
        workers=max(settings.verify.workers, 1),
    )
    _say(f"checked     {report.checked}")
    _say(f"ok          {report.ok}")
    for problem in report.problems:
        done = "  (moved to the quarantine)" if problem.resolved else ""
        _say(f"  {problem.kind:<10} {problem.path or redact(problem.url)}  {problem.detail}{done}")
    if not ns.repair:
        if not report.problems:
            return EXIT_OK
        _say(
            f"{len(report.problems)} problem(s); `tessmirror verify --repair` moves bad and unexpected "
            "files to the quarantine and downloads the bad and missing ones again"
        )
        return EXIT_PARTIAL
    if report.intact and not report.to_download:
        return EXIT_OK
    # Download what is pending now; the saved plan knows each file's declared size and md5.
    pending = {e.url: e for e in manifest.load().values() if e.status != "verified"}
    plan_path = settings.state_dir / PLAN_FILE
    if plan_path.exists():
        items = [
            i for i in iter_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT) if redact(i.url) in pending
        ]
    else:
        from engine.models import PlanItem

        items = [
            PlanItem(url=e.url, filename=Path(e.path).name, obs_id=e.obs_id, size=e.nbytes, md5=e.md5)
            for e in pending.values()
        ]
    _say(f"repairing {len(items)} file(s)")
    code = _run_mirror(settings, TablePlan(items_to_table(items)), command="verify --repair")
    if len(items) < len(pending):  # a record the plan no longer names: not repaired here
        code = max(code, EXIT_PARTIAL)
    return code


def cmd_fetch(ns: argparse.Namespace) -> int:
    settings = _settings(ns, selection=False)
    if settings.selection.urls_file is None:
        raise ConfigError(
            "selection.urls_file",
            "fetch needs a saved plan or a URL list",
            hint="give --input FILE (or - for standard input)",
        )
    return _run_mirror(settings, command="fetch", adopt_from=ns.adopt_from, adopt_link=ns.adopt_link)


def _archive_options(ns: argparse.Namespace, **extra):
    from engine.archive.cli_options import archive_options_from_args

    return archive_options_from_args(ns, **extra)


def cmd_archive_serve(ns: argparse.Namespace) -> int:
    from engine.archive.server import serve_forever

    options = _archive_options(ns)

    def ready(archive) -> None:
        print(f"TAP service:  {archive.tap_url}", flush=True)
        print(
            f"file server:  {archive.base_url}/api/v0.1/Download/file?uri=mast:TESS/product/<file>",
            flush=True,
        )
        s3_url = getattr(archive, "s3_url", None)
        if s3_url:
            print(f"second host:  {s3_url} (redirects to /stpubdata/tess/public/...)", flush=True)
        print("Ctrl-C or SIGTERM stops it.", flush=True)

    serve_forever(options, on_ready=ready)
    return EXIT_OK


def cmd_demo(ns: argparse.Namespace) -> int:
    """The notebook's use case, end to end, against the local archive."""
    from engine.archive.server import ArchiveThread

    # Every synthetic target inside the notebook's footprint, so the demo has a few hundred files; the
    # archive has MAST's real shape (FFI exposures, per-product rows, 302s to a second host, chunked
    # answers, NULL checksums), so the demo meets what a user of the real MAST meets.
    ns.mast_like = True
    source = getattr(ns, "fetch.source", None) or "mast"
    options = _archive_options(ns, sectors=(1,), focus=(1, 1, 2), port=ns.port, s3=source != "mast")
    log.info("starting the local archive (%d targets, %s files)...", ns.targets, ns.file_size)
    thread = ArchiveThread(options)
    try:
        archive = thread.start()
    except OSError as err:  # the port is taken: any free one will do (this demo then downloads anew)
        log.info("port %d is busy (%s); using a free port", ns.port, err.strerror)
        thread = ArchiveThread(dataclasses.replace(options, port=0))
        archive = thread.start()
    try:
        log.info("local archive: %s", archive.tap_url)
        settings = _settings(
            ns,
            {
                "tap.url": archive.tap_url,
                "selection.sector": 1,
                "selection.cameras": [1],
                "selection.ccds": [2],
                **({"fetch.s3_endpoint": archive.s3_url} if source != "mast" else {}),
            },
        )
        code = _run_mirror(settings, command="demo")
    finally:
        thread.stop()
    _say(
        f"mirror in {settings.output.out_dir}; `tessmirror status --out {settings.output.out_dir}` "
        "reports on it, `tessmirror verify --out ...` re-checks it"
    )
    return code


def _cmd_report(ns: argparse.Namespace) -> int:
    from engine.report import cmd_report

    return cmd_report(ns)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": cmd_plan,
    "run": cmd_run,
    "fetch": cmd_fetch,
    "status": cmd_status,
    "verify": cmd_verify,
    "demo": cmd_demo,
    "report": _cmd_report,
}


IO_THREADS = 2  # the event loop's default pool: plan pages, manifest batches, DNS; never a download
_CLOSED_AT_START: set[int] = set()


def _reopen_closed_std_fds() -> set[int]:
    """Point closed standard descriptors at /dev/null; returns which were closed.

    With `2>&-` the first file the run opens would otherwise get descriptor 2, and anything written
    to "stderr" (a warning from a C library) would land in the manifest or a FITS file.
    """
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    if not closed:
        return closed
    null = os.open(os.devnull, os.O_RDWR)
    for fd in closed:
        if fd != null:
            os.dup2(null, fd)
    if null not in closed:
        os.close(null)
    if 1 in closed:
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - process lifetime
    if 2 in closed:
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - process lifetime
    return closed


def _closed_stdout(what: str) -> TessMirrorError:
    from engine.exceptions import UsageError

    return UsageError(
        f"standard output is closed: nowhere to write {what}",
        hint="redirect it to a file (> FILE), or give -o FILE",
    )


def _silence(fd: int) -> None:
    """After EPIPE: send the rest to /dev/null, so the interpreter's final flush stays quiet."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def _say(line: str) -> None:
    """One line on stderr; a closed stderr or a vanished reader is not an error of the run."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _silence(2)


def _exit_promptly(code: int) -> int:
    """Make sure the process ends soon with `code`, whatever threads are left.

    At exit the interpreter joins every thread that is not a daemon (thread pools included). One
    stuck in a hung network call, or a library's pool that is never shut down, would hold the exit
    for ever: a daemon watchdog ends the process `EXIT_GRACE_SECONDS` after this point if the
    ordinary exit has not happened by then. Streams are flushed first.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_SECONDS)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    try:
        threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
    except RuntimeError:  # no thread to spare (a tight ulimit): the work is done, end now
        logging.shutdown()
        os._exit(code)
    return code


def _cap_malloc_arenas() -> None:
    """Ask glibc for at most MALLOC_ARENAS malloc arenas, unless MALLOC_ARENA_MAX says otherwise.

    glibc gives each thread that allocates its own arena, reserving 64 MiB of address space each
    (up to 8 per core): with a dozen threads that is most of a run's address space, and what a
    `ulimit -v` on a login node refuses (measured: 1.1 GB VmPeak by default, 0.4 GB with two arenas,
    for a resident size of about 105 MB either way). Not glibc: nothing to do.
    """
    # numpy's OpenBLAS starts a thread and a buffer per core at import; tessmirror does no linear
    # algebra, and under a tight `ulimit -v` OpenBLAS calls exit(1) when a buffer fails, lock held.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # another C library (musl): it has no per-thread arenas to cap


M_ARENA_MAX = -8  # glibc's mallopt parameter number
MALLOC_ARENAS = 2


EXIT_GRACE_SECONDS = 3.0


def _resource_error(err: BaseException) -> TessMirrorError | None:
    """MemoryError, ENOMEM, a failure to start a thread: this machine refused (exit 4), one line."""
    try:
        from engine.manager import resource_error
    except Exception:  # no memory left even to import: say it plainly
        if isinstance(err, (MemoryError, RuntimeError, OSError)):
            from engine.exceptions import LocalError

            return LocalError("out of memory or threads", hint="raise `ulimit -v`, or set MALLOC_ARENA_MAX=2")
        return None
    return resource_error(err)


def _report(err: TessMirrorError) -> int:
    _say(f"tessmirror: error: {redact(err.message)}")
    if err.hint:
        _say(f"tessmirror: hint: {redact(err.hint)}")
    return err.exit_code


_PIPELINE_COMMANDS = frozenset({"plan", "run", "fetch", "verify", "demo"})  # they plan or download


def _import_numpy_before_threads() -> None:
    """Make numpy's OpenBLAS take its work buffer now, before the run starts any thread. OpenBLAS
    reserves it at the first matrix product (the planner's footprint geometry makes one) and, under
    a tight `ulimit -v`, calls exit(1) when that fails: no message of ours, the lock left behind.
    Taken here, while the address space is smallest, it fits wherever the run can run at all; past
    this point a lack of memory is a MemoryError, which the run turns into exit 4."""
    import numpy

    square = numpy.ones((4, 4))
    square @ square  # the first product: OpenBLAS's buffer, kept for the run


def _dispatch(argv: Sequence[str] | None) -> int:
    try:
        # Inside the try: flag parsers (--polygon, --cone, --ccd x) raise ConfigError, which argparse
        # does not catch.
        ns = parse_args(argv)
        _setup_logging(
            getattr(ns, "run.log_level", None) or _file_log_level(ns),
            quiet=bool(getattr(ns, "quiet", False)),
            verbose=bool(getattr(ns, "verbose", False)),
            log_file=getattr(ns, "log_file", None),
        )
        # First, before any heavy import: a batch log shows at once that the run started.
        log.info("tessmirror %s: starting %s", __version__, ns.command)
        if ns.command in _PIPELINE_COMMANDS:
            _import_numpy_before_threads()
        if ns.command == "archive":
            return cmd_archive_serve(ns)
        return COMMANDS[ns.command](ns)
    except _Stopped:
        return _GATE.exit_code
    except TessMirrorError as err:
        return _report(err)
    except BrokenPipeError:
        # Our reader went away (`plan | head -1`): stop quietly, as a Unix tool stopped by SIGPIPE.
        _silence(1)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # a SIGINT that arrived before the handlers were in place
        return 130
    except BaseException as err:
        if _GATE.received is not None:
            return _GATE.exit_code  # the run's cancellation, unwinding: not an error
        if isinstance(err, SystemExit):
            raise
        resource = _resource_error(err)
        if resource is not None:
            return _report(resource)
        if not isinstance(err, Exception):
            raise
        # A bug: say so plainly, keep the traceback for --log-level DEBUG.
        log.debug("internal error", exc_info=True)
        _say(f"tessmirror: internal error: {redact(repr(err))} (run with --log-level DEBUG for details)")
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """The `tessmirror` command; returns its exit code (see the module docstring)."""
    _GATE.install()  # first thing: from here on, a signal is a graceful stop
    try:
        _cap_malloc_arenas()  # before any thread starts
        _CLOSED_AT_START.update(_reopen_closed_std_fds())
        code = _dispatch(argv)
    except _Stopped:  # a signal between the handler and _dispatch's own try
        code = _GATE.exit_code
    try:
        if _GATE.received is not None:
            code = _GATE.exit_code
        # The outcome is decided. The interpreter's finalization puts the default handlers back,
        # and a signal then (a second Ctrl-C) would turn it into a death by signal: ignore them.
        for sig in _GATE.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if _GATE.received is not None:
            _say(f"tessmirror: stopped by {_GATE.name}: run the same command again to resume")
        return _exit_promptly(code)
    except _Stopped:
        return _exit_promptly(_GATE.exit_code)


if __name__ == "__main__":
    sys.exit(main())
