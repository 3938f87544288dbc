"""The registry of byte sources: which source serves a URL (by scheme) or a `--source` choice.

httpx's transport mounts are the model: a table from a key to the thing that moves the bytes, looked
up per request. Two tables here:

* ``SCHEMES``: the URL scheme of a plan item -> how to build its source (``http``/``https``: the
  plain HTTP source; ``s3``: the bucket, for ``s3://stpubdata/<key>`` URLs);
* ``CHOICES``: `fetch.source` -> the source for http(s) items (``mast``: MAST's URLs as planned;
  ``s3`` and ``auto``: the bucket, falling back to MAST per file). ``s3`` and ``auto`` download the
  same way; they differ at plan time (`engine.fetch.s3.check_cloud_paths`): ``s3`` refuses to run on
  a path_lookup mismatch, ``auto`` falls back to ``mast`` for the whole run.

Adding a source is one module with a subclass of `engine.fetch.http.Source` that writes
`serve(attempt)`, plus one line in a table here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.fetch.http import HttpSource, Source
from engine.fetch.s3 import S3Source
from engine.models import Clock, PlanItem
from engine.settings import FetchSettings

SourceFactory = Callable[[FetchSettings, Clock | None], Source]


def _http(fetch: FetchSettings, clock: Clock | None) -> Source:
    return HttpSource(fetch.max_redirects, clock=clock)


def _s3(fetch: FetchSettings, clock: Clock | None) -> Source:
    http = HttpSource(fetch.max_redirects, clock=clock, name="s3")
    return S3Source(fetch.s3_endpoint, http, HttpSource(fetch.max_redirects, clock=clock))


SCHEMES: dict[str, SourceFactory] = {"http": _http, "https": _http, "s3": _s3}
CHOICES: dict[str, SourceFactory] = {"mast": _http, "s3": _s3, "auto": _s3}


@dataclass(slots=True)
class Sources:
    """The sources of one run: `for_item` picks one per plan item (built once, shared by all files)."""

    chosen: Source  # for http(s) items, from `fetch.source`
    by_scheme: dict[str, Source]  # for other schemes (s3://)

    def for_item(self, item: PlanItem) -> Source | None:
        """The source for `item`, or None when nothing serves its URL's scheme."""
        scheme = item.url.partition(":")[0].lower()
        if scheme in ("http", "https"):
            return self.chosen
        return self.by_scheme.get(scheme)


def build_sources(fetch: FetchSettings, clock: Clock | None = None) -> Sources:
    """The run's sources from `fetch.source` (one of settings.SOURCES; validated by config)."""
    factory = CHOICES.get(fetch.source)
    if factory is None:
        raise ValueError(f"unknown fetch.source {fetch.source!r}; use one of {', '.join(CHOICES)}")
    chosen = factory(fetch, clock)
    by_scheme = {
        scheme: chosen if isinstance(chosen, S3Source) and scheme == "s3" else make(fetch, clock)
        for scheme, make in SCHEMES.items()
        if scheme not in ("http", "https")
    }
    return Sources(chosen, by_scheme)
