"""The Ray tier: marked `ray`; its tests share the session's local cluster (`ray_cluster`, tests/conftest.py)."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/ray/" in str(item.fspath):
            item.add_marker(pytest.mark.ray)
