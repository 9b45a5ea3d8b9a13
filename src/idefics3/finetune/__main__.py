"""`python -m idefics3.finetune {finetune,merge} ...`: the same as `idefics3 finetune ...` / `idefics3 merge ...`.

It runs the `idefics3` command line itself, so messages, `idefics3: error: ...` lines and exit codes are the same:
0 done, 1 an error (bad options, data or files), 2 a usage error, 130 stopped by Ctrl-C after saving a checkpoint.
"""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
