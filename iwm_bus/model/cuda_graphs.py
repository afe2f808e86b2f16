"""CUDA-graph replay for batch-1 inference: one captured graph per input signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphCache"]


class GraphCache:
    """CUDA graphs of ``fn``, one per input signature, least recently used evicted.

    At batch 1 a ViT forward is bound by kernel launches; replaying a captured graph removes
    that cost. ``fn`` takes tensors (or None) on one CUDA device and returns a tuple of
    tensors (or None). Inputs are copied into static buffers, outputs cloned after replay,
    so results never alias a later call's.
    """

    def __init__(self, fn: Any, max_graphs: int = 8) -> None:
        self.fn, self.max_graphs = fn, max_graphs
        self.graphs: dict[tuple, tuple[Any, tuple, tuple]] = {}

    def __call__(self, device: torch.device, *args: Tensor | None) -> tuple:
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.pop(key, None) or self._capture(device, args)
        self.graphs[key] = entry  # most recently used last
        while len(self.graphs) > self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        graph, static_in, static_out = entry
        for buf, a in zip(static_in, args, strict=True):
            if buf is not None:
                buf.copy_(a, non_blocking=True)
        graph.replay()
        return tuple(None if o is None else o.clone() for o in static_out)

    def _capture(self, device: torch.device, args: tuple) -> tuple[Any, tuple, tuple]:
        static_in = tuple(None if a is None else torch.empty(a.shape, dtype=a.dtype, device=device)
                          for a in args)
        for buf, a in zip(static_in, args, strict=True):
            if buf is not None:
                buf.copy_(a)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS/cuDNN handles and algorithms
                for _ in range(2):
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.fn(*static_in)
        return graph, static_in, static_out

    def clear(self) -> None:
        self.graphs.clear()
