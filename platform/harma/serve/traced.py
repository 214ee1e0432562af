"""The model's text and image towers as TorchScript graphs, for inference only.

    graph, why = trace_tower(model, "encode_text", two_queries, probes=[one_query, three_queries])
    emb = graph(tokens) if graph is not None else model.encode_text(tokens)   # else: log `why`

Why: one forward pass through open_clip and the HarMA adapters is a few hundred small torch calls.
Eagerly, Python runs between each pair of them and holds the GIL while it does. In a Serve replica
the event loop (HTTP, JSON, batching) and the model thread share that GIL. On 2 CPU cores a busy
Python thread slowed an eager batch of 16 tiny-model queries from 21 ms to 1.8 s, and it slowed the
traced graph only from 13 to 35 ms: a TorchScript graph runs in C++ and releases the GIL. Tracing also removes the
per-call Python cost (tiny model, 1 query: 5.0 -> 2.2 ms).

`torch.jit.trace` is deprecated in torch 2.x (it warns) but works. `torch.compile` needs a C++
toolchain and minutes per replica start on CPU, so it is not used here. Tracing records the ops
of one run and may not fit other inputs, so each traced tower is compared with the eager one on
probe inputs of other batch sizes. If tracing fails or the outputs differ, the caller keeps the
eager tower, and the reason is logged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

Tower = Callable[[torch.Tensor], torch.Tensor]


class _TowerModule(torch.nn.Module):
    """Holds the model as a submodule, so its weights are shared by the graph, not copied into it."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def trace_tower(model: torch.nn.Module, method: str, example: torch.Tensor, probes: Sequence[torch.Tensor],
                atol: float = 1e-4) -> tuple[Tower | None, str]:
    """`model.<method>` traced on `example`, checked on `probes`: (graph, "") or (None, why not).

    Each probe goes through the eager and the traced tower; the graph is kept only when their outputs
    have the same shape and differ by at most `atol` everywhere (outputs are L2-normalised
    embeddings, so this bounds each search score's error by about 2 * atol).
    """
    module = _TowerModule(model, method).eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The deprecation notice, and TracerWarnings from torch's own attention shape checks
            # (branches that raise on malformed inputs); the probes below check the graph anyway.
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(module, example, check_trace=False)
            for probe in probes:
                eager, traced = module(probe), graph(probe)
                if eager.shape != traced.shape:
                    return None, f"{method}: traced output shape {tuple(traced.shape)} != {tuple(eager.shape)}"
                diff = max_difference(eager, traced)
                if not diff <= atol:  # also catches NaN
                    return None, f"{method}: traced and eager outputs differ by {diff:.2e} (> {atol:.0e})"
                graph(probe)  # TorchScript's executor optimises a graph on its second run
    except Exception as err:  # noqa: BLE001 - any tracing failure means: stay eager
        return None, f"{method}: tracing failed: {type(err).__name__}: {str(err)[:300]}"
    return graph, ""
