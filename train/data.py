"""Training data in memory: every frame decoded once and resized to the model's input size.

:class:`FrameStore` holds uint8 frames (M, S, S, 3) with, per frame, the action that produced
it (``action_id``, ``vector``) and whether it follows the previous frame (``linked``: same
session, consecutive seq, not an episode start). At 64 px a frame is 12 KiB, so 100k frames
fit in 1.2 GiB; decoding once removes the PNG cost from every training step.

Sources: image folders (PNG/JPG, recursive; Phase 1) and recorded sessions (Phase 1 uses
their frames as images; Phase 3 their ``(frame_t, action_t, ..., frame_t+K)`` sequences).
A batch is a pure function of the step (:func:`batch_indices`): a seeded permutation per
epoch, cut into global batches, so a resumed run reads exactly the data it would have read.

    store = FrameStore.from_sessions(["data/default/train"], img_size=64, cond_dim=16)
    starts = store.sequence_starts(k=2)        # indices i with frames i..i+2 linked
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from iwm_bus.errors import SessionError
from iwm_bus.session import SessionReader
from train.datasets import action_arrays

__all__ = ["DataError", "FrameStore", "batch_indices", "find_images", "find_sessions"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SESSION_SUFFIXES = {".mcap"}
_CHUNK = 256


class DataError(ValueError):
    """Training data that cannot be used: the message names the path and the problem."""


def _walk(paths: Iterable[str | os.PathLike[str]], suffixes: set[str], what: str) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder ({what})")
        if p.is_file():
            found.append(p)
            continue
        try:
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes)
        except OSError as e:
            raise DataError(f"{p}: cannot read the folder ({e})") from e
    return found


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """PNG/JPG files in the given folders (recursive) or given directly."""
    return _walk(paths, IMAGE_SUFFIXES, "image folder")


def find_sessions(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``.mcap`` session files in the given folders (recursive) or given directly."""
    return _walk(paths, SESSION_SUFFIXES, "session")


def resize_u8(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, S, S, 3), bilinear + antialias like ``IWM.preprocess``."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)  # (B, 3, S, S)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _load_session(job: tuple[Path, int, int, int | None]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One session file's frames (resized), action ids, vectors and link flags."""
    f, img_size, cond_dim, limit = job
    frames, ids, vecs, links = [], [], [], []
    try:
        reader = SessionReader(f)
        prev_seq, buf = None, []
        for rec, action in reader.frames_with_actions():
            a = action_arrays(action, cond_dim)
            links.append(prev_seq is not None and rec.seq == prev_seq + 1 and action is not None)
            ids.append(int(a["action_id"]))
            vecs.append(a["vector"])
            buf.append(reader.decode(rec))
            prev_seq = rec.seq
            if len(buf) == _CHUNK:
                frames.append(resize_u8(np.stack(buf), img_size))
                buf = []
            if limit and len(ids) >= limit:
                break
        if buf:
            frames.append(resize_u8(np.stack(buf), img_size))
    except (SessionError, OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable session ({e})") from e
    if not ids:
        return (torch.empty(0, img_size, img_size, 3, dtype=torch.uint8),
                torch.empty(0, dtype=torch.long), torch.empty(0, cond_dim),
                torch.empty(0, dtype=torch.bool))
    return (torch.cat(frames), torch.tensor(ids, dtype=torch.long),
            torch.from_numpy(np.stack(vecs)), torch.tensor(links, dtype=torch.bool))


@dataclass
class FrameStore:
    """Frames (M, S, S, 3) uint8 with per-frame action and link flags (see module doc)."""

    frames: torch.Tensor  # (M, S, S, 3) uint8
    action_id: torch.Tensor  # (M,) long, the action that produced frame i (-1 = none)
    vector: torch.Tensor  # (M, cond_dim) float32, its continuous vector (zeros = none)
    linked: torch.Tensor  # (M,) bool, frame i follows frame i-1 through that action
    session: torch.Tensor  # (M,) long, index into ``sources`` of the file frame i came from
    sources: list[str]  # the files the frames came from

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def num_actions(self) -> int:
        """1 + the largest action id (0 when the data has none)."""
        return int(self.action_id.max()) + 1 if len(self) and self.action_id.max() >= 0 else 0

    def sequence_starts(self, k: int) -> torch.Tensor:
        """Indices i such that frames i..i+k form one linked sequence (k transitions)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        link = self.linked.clone()
        ok = torch.ones(len(self) - k if len(self) > k else 0, dtype=torch.bool)
        for j in range(1, k + 1):
            ok &= link[j: j + len(ok)]
        return ok.nonzero().flatten()

    @classmethod
    def from_images(cls, paths: Sequence[str | os.PathLike[str]], img_size: int,
                    cond_dim: int) -> FrameStore:
        files = find_images(paths)
        if not files:
            raise DataError(f"{', '.join(map(str, paths))}: no PNG/JPG images found")
        chunks, buf = [], []
        for f in files:
            try:
                with Image.open(f) as im:
                    buf.append(np.asarray(im.convert("RGB").resize(
                        (img_size, img_size), Image.BILINEAR)))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from e
            if len(buf) == _CHUNK:
                chunks.append(torch.from_numpy(np.stack(buf)))
                buf = []
        if buf:
            chunks.append(torch.from_numpy(np.stack(buf)))
        m = len(files)
        return cls(torch.cat(chunks), torch.full((m,), -1, dtype=torch.long),
                   torch.zeros(m, cond_dim), torch.zeros(m, dtype=torch.bool),
                   torch.arange(m), [str(f) for f in files])

    @classmethod
    def from_sessions(cls, paths: Sequence[str | os.PathLike[str]], img_size: int,
                      cond_dim: int, max_frames: int | None = None,
                      workers: int = 1) -> FrameStore:
        """Every frame of the sessions in ``paths``, in file order, up to ``max_frames``.

        ``workers`` > 1 decodes that many files at once in spawned processes: the same store
        as one process gives (the default's 80k frames took ~50 s on a 16-core GPU host, two
        runs loading at once with 8 workers each; ~2 minutes in one process on this CPU).
        """
        files = find_sessions(paths)
        if not files:
            raise DataError(f"{', '.join(map(str, paths))}: no .mcap session files found")
        if workers > 1 and len(files) > 1:  # every file up to max_frames, cut below
            ctx = mp.get_context("spawn")  # no torch state shared with the parent
            jobs = [(f, img_size, cond_dim, max_frames or None) for f in files]
            with ProcessPoolExecutor(min(workers, len(files)), mp_context=ctx) as pool:
                parts = list(pool.map(_load_session, jobs))
        else:  # one file after the other, each asked only for the frames still wanted
            parts, want = [], max_frames or None
            for f in files:
                if want == 0:
                    break
                parts.append(_load_session((f, img_size, cond_dim, want)))
                want = None if want is None else want - len(parts[-1][1])
        frames, ids, vecs, links, sess = [], [], [], [], []
        left = max_frames or None
        for si, (fr, ai, vc, lk) in enumerate(parts):
            if left is not None:
                fr, ai, vc, lk = fr[:left], ai[:left], vc[:left], lk[:left]
                left -= len(ai)
            frames.append(fr)
            ids.append(ai)
            vecs.append(vc)
            links.append(lk)
            sess.append(torch.full((len(ai),), si, dtype=torch.long))
            if left == 0:
                break
        if not sum(len(a) for a in ids):
            raise DataError(f"{', '.join(map(str, paths))}: the sessions hold no frames")
        return cls(torch.cat(frames), torch.cat(ids), torch.cat(vecs), torch.cat(links),
                   torch.cat(sess), [str(f) for f in files])

    @classmethod
    def concat(cls, stores: Sequence[FrameStore]) -> FrameStore:
        """Several stores as one; no sequence crosses from one to the next."""
        linked = [s.linked.clone() for s in stores]
        for lk in linked:
            if len(lk):
                lk[0] = False
        offsets = np.cumsum([0] + [len(s.sources) for s in stores])
        return cls(torch.cat([s.frames for s in stores]), torch.cat([s.action_id for s in stores]),
                   torch.cat([s.vector for s in stores]), torch.cat(linked),
                   torch.cat([s.session + int(o) for s, o in zip(stores, offsets, strict=False)]),
                   [p for s in stores for p in s.sources])

    def episodes(self) -> torch.Tensor:
        """(M,) long: an id per run of linked frames (a new id at every unlinked frame)."""
        return torch.cumsum((~self.linked).long(), 0) - 1


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: a slice of epoch ``step // (n // batch)``'s permutation."""
    per_epoch = n // batch
    if per_epoch < 1:
        raise DataError(f"the data holds {n} samples, fewer than one batch of {batch}")
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[pos * batch:(pos + 1) * batch]
