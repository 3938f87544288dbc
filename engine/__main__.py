"""`python -m engine`: the `tessmirror` command, for machines where the script is not on PATH."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
