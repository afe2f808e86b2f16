"""Datasets of ``(frame_t, action_t, frame_t+1)`` transitions read from session files.

A transition's action is the one that produced ``frame_t+1`` (see
``iwm_bus.session.SessionReader.transition_records``). Frames stay encoded in memory (about the
session file's size) and are decoded on access, so a dataset over many sessions stays cheap.

    from train.datasets import SessionDataset, torch_dataset
    ds = SessionDataset(["runs/pong1.mcap", "runs/pong2.mcap"], cond_dim=16)
    sample = ds[0]                      # TransitionSample(frame, action, next_frame)
    sample.frame.shape                  # (210, 160, 3) uint8
    sample.action                       # {"action_id": 3, "vector": float32 (16,), ...}
    loader = torch.utils.data.DataLoader(torch_dataset(ds), batch_size=32, shuffle=True)

    for frame, action, next_frame in iter_transitions(["runs/pong1.mcap"]):  # streaming
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from iwm_bus.session import FrameRecord, SessionReader, Transition

__all__ = ["SessionDataset", "TransitionSample", "iter_transitions", "torch_dataset"]

PathLike = str | os.PathLike[str]


class TransitionSample(NamedTuple):
    """One transition as numpy: frames ``(H, W, C)`` uint8, ``action`` a dict of arrays.

    ``action``: ``action_id`` (int64, -1 when none), ``vector`` (float32 ``(cond_dim,)``,
    zero-padded, zeros when none), ``has_id`` / ``has_vector`` (bool).
    """

    frame: np.ndarray
    action: dict[str, Any]
    next_frame: np.ndarray


def iter_transitions(paths: Iterable[PathLike], allow_gaps: bool = False) -> Iterator[Transition]:
    """Stream decoded transitions from each session in turn (no cross-file pairs)."""
    for path in paths:
        yield from SessionReader(path).transitions(allow_gaps=allow_gaps)


def action_arrays(action: dict[str, Any] | None, cond_dim: int) -> dict[str, Any]:
    """The nested action map as fixed-shape arrays (``TransitionSample.action``)."""
    vec = np.zeros(cond_dim, np.float32)
    has_vec = action is not None and action.get("vector") is not None
    if has_vec:
        v = np.asarray(action["vector"], np.float32).ravel()
        if v.shape[0] > cond_dim:
            raise ValueError(f"action vector has {v.shape[0]} values; cond_dim is {cond_dim}")
        vec[: v.shape[0]] = v
    has_id = action is not None and action.get("action_id") is not None
    return {"action_id": np.int64(action["action_id"] if has_id else -1), "vector": vec,
            "has_id": np.bool_(has_id), "has_vector": np.bool_(has_vec)}


class SessionDataset:
    """Map-style dataset of transitions over one or more session files.

    Works with ``torch.utils.data.DataLoader`` as is (numpy samples, default collate) or
    through ``torch_dataset``. ``transform(frame) -> frame`` is applied to both frames.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, cond_dim: int = 16,
                 allow_gaps: bool = False, transform: Any = None) -> None:
        if cond_dim < 1:
            raise ValueError(f"SessionDataset.cond_dim={cond_dim!r}: must be >= 1")
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise ValueError("SessionDataset.paths is empty: give at least one session file")
        self.cond_dim = cond_dim
        self.transform = transform
        self._readers: list[SessionReader] = []
        self._items: list[tuple[int, FrameRecord, dict[str, Any] | None, FrameRecord]] = []
        for i, path in enumerate(self.paths):
            reader = SessionReader(path)
            self._readers.append(reader)
            for rec, action, next_rec in reader.transition_records(allow_gaps=allow_gaps):
                self._items.append((i, rec, action, next_rec))

    @property
    def num_actions(self) -> int:
        """1 + the largest discrete action id seen (0 when there are none)."""
        ids = [a["action_id"] for _, _, a, _ in self._items if a and "action_id" in a]
        return max(ids) + 1 if ids else 0

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> TransitionSample:
        if not -len(self._items) <= index < len(self._items):
            raise IndexError(f"transition {index} out of range (dataset has {len(self)})")
        file_i, rec, action, next_rec = self._items[index]
        reader = self._readers[file_i]
        frame, next_frame = reader.decode(rec), reader.decode(next_rec)
        if self.transform is not None:
            frame, next_frame = self.transform(frame), self.transform(next_frame)
        return TransitionSample(frame, action_arrays(action, self.cond_dim), next_frame)

    def __repr__(self) -> str:
        return f"SessionDataset({len(self.paths)} sessions, {len(self)} transitions)"


def torch_dataset(ds: SessionDataset) -> Any:
    """``ds`` as a ``torch.utils.data.Dataset`` of tensors (imports torch only here).

    Items: ``(frame uint8 (H, W, C), action {action_id long, vector float32, has_id,
    has_vector}, next_frame)``; ``IWM.encode`` takes the uint8 frames as they are.
    """
    import torch
    from torch.utils.data import Dataset

    class TorchSessionDataset(Dataset):
        def __init__(self, inner: SessionDataset) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, index: int) -> tuple[Any, dict[str, Any], Any]:
            s = self.inner[index]
            action = {k: torch.as_tensor(v) for k, v in s.action.items()}
            return torch.from_numpy(s.frame), action, torch.from_numpy(s.next_frame)

    return TorchSessionDataset(ds)
