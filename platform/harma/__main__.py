"""`python -m harma` runs the CLI (the Ray Job entrypoint form)."""

from harma.cli import entrypoint

entrypoint()
