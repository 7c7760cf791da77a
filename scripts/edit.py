#!/usr/bin/env python
"""Lifelong model editing from the command line.

    python scripts/edit.py fit --config configs/zsre.yaml [--config configs/methods/wise.yaml]
                               [--data.path FILE] [--data.start N] [--data.ds_size N] [--T 10]
                               [--trainer.default_root_dir DIR]

(the same as the installed console script ``repair-pl fit ...``).
Writes DIR/results.json, DIR/summary.json and DIR/summary.md and prints ``summary: PATH`` last.
``--print_config`` shows every option.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repair_pl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
