"""`python -m harma` runs the CLI (the Ray Job entrypoint form)."""

import sys

from harma.cli import main

sys.exit(main())
