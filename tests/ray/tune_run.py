"""Run by test_tune.py in its own process: `harma tune` (so the test can kill its driver)."""

import sys

from harma.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
