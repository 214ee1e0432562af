"""The retrieval index as a subsystem of its own: approximate search (`ann`) and the node-local
copies replicas map (`cache`). The index format, exact search and the Ray Data build are still in
`harma.serve.index` and `harma.serve.build` (see docs/ARCHITECTURE.md)."""
