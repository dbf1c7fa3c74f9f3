#!/usr/bin/env python3
"""Compare loss curves of several runs against a baseline: `fakequant compare-loss` under another name.

    python scripts/compare_loss.py runs/bf16 runs/mxfp4 --out loss.png --max-gap 0.02
"""

import sys

from fakequant.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-loss", *sys.argv[1:]]))
