"""The seed notebook's loop (and astroquery's): one `requests.get` per file, one after another.

    python -m benchmarks.peer_requests URLS_AND_NAMES.tsv OUT_DIR

Each line of the input is `url<TAB>file name`. Exactly the notebook's calls, no session, no checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import requests


def main(argv: list[str]) -> int:
    listing, out_dir = Path(argv[0]), Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for line in listing.read_text().splitlines():
        url, name = line.split("\t")
        r = requests.get(url, allow_redirects=True, timeout=120)
        if r.status_code != 200:  # the notebook does not even check this; count it for the report
            failed += 1
        with open(out_dir / name, "wb") as handle:
            handle.write(r.content)
    print(f"requests loop: {failed} non-200 answers", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
