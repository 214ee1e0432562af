"""Retrieval serving: index build (Ray Data), the Ray Serve application and its HTTP API.

Public surface: `harma.serve.app:build_app` (the Serve import path), `harma.serve.build.build_index`,
`harma.serve.index.load_index`, `harma.serve.configs.load_serve_config`.
"""
