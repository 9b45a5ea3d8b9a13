"""`python -m idefics3.eval ...` (and `torchrun ... -m idefics3.eval ...`): the same as `idefics3 eval ...`.

It runs the `idefics3` command line itself, so the tasks (the demo's `shapes` included), messages and exit codes
are the same: 0 done, 1 an error (bad options, data or files), 2 a usage error, 130 stopped by Ctrl-C (the
records written so far stay; `--resume` continues).
"""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
