"""The retrieval index as a subsystem of its own: approximate search (`ann`), the node-local
copies replicas map (`cache`), versions and their updates without re-embedding (`versions`,
`update`) and shards (`shards`). The index format, exact search and the Ray Data embedding are
still in `harma.serve.index` and `harma.serve.build` (see docs/ARCHITECTURE.md)."""
