"""Run tessmirror's CLI, or the `--concurrency auto` driver, from a given source tree.

    python benchmarks/tm_launch.py TREE cli fetch --input PLAN --out DIR ...
    python benchmarks/tm_launch.py TREE auto --input PLAN --out DIR ...

The venv holds tessmirror as an editable install of this working tree, whose import hook wins over
PYTHONPATH. Several people edit that tree at once, so a benchmark measures a clean export of a
commit instead (`git archive HEAD | tar -x -C TREE`): this launcher drops the editable hook and
imports `engine` (and `benchmarks.tm_auto`) from TREE.
"""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] not in ("cli", "auto"):
        print("usage: tm_launch.py TREE {cli|auto} ARGS...", file=sys.stderr)
        return 2
    tree, what, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.meta_path[:] = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    sys.path.insert(0, tree)
    if what == "cli":
        from engine.cli import main as entry
    else:
        from benchmarks.tm_auto import main as entry
    import engine

    if not engine.__file__ or not engine.__file__.startswith(tree.rstrip("/") + "/"):
        print(f"tm_launch: engine came from {engine.__file__}, not {tree}", file=sys.stderr)
        return 70
    return entry(args)


if __name__ == "__main__":
    sys.exit(main())
