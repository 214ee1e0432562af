"""ModelThread: every torch call of a model on one dedicated thread, whoever calls."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harma.serve.encoder import ModelThread


def test_calls_from_any_thread_run_on_the_same_dedicated_thread():
    model_thread = ModelThread()
    here = threading.get_ident()
    first = model_thread.call(threading.get_ident)
    with ThreadPoolExecutor(4) as callers:  # as Ray Data / Serve call from their own threads
        others = set(callers.map(lambda _: model_thread.call(threading.get_ident), range(8)))
    assert first != here and others == {first}
    assert model_thread.call(lambda: threading.current_thread().name).startswith("harma-model")


def test_arguments_pass_through_and_errors_reach_the_caller():
    model_thread = ModelThread()
    assert model_thread.call(divmod, 17, 5) == (3, 2)
    with pytest.raises(ZeroDivisionError):
        model_thread.call(divmod, 1, 0)
    assert model_thread.call(sum, [1, 2, 3]) == 6  # still serving after an error
