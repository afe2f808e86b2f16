"""Checked inputs of the inference API: frames, latents, conditioning, action ids.

Every function raises ValueError with the expected and the given shape, so that an RPC
client gets a reply that says what to fix; they return contiguous tensors on ``device``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from iwm_bus.model.config import IWMConfig

__all__ = ["ArrayLike", "check_actions", "check_cond", "check_frames", "check_latents",
           "check_rollout_inputs", "check_step_inputs"]

ArrayLike = Tensor | np.ndarray

Step = tuple[Tensor, Tensor | None, Tensor, Tensor | None]


def check_frames(frames: ArrayLike) -> Tensor:
    """Validated uint8 (B, H, W, 3) tensor, still where the caller had it."""
    if isinstance(frames, np.ndarray):
        if not frames.flags.writeable:  # e.g. decoded straight from a wire buffer
            frames = frames.copy()
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    elif not isinstance(frames, Tensor):
        raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB pixels, got dtype {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError("frames must be (H, W, 3) or (B, H, W, 3) RGB with 3 channels last, "
                         f"got shape {tuple(frames.shape)}")
    return frames


def _as_float(x: ArrayLike, name: str, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor | np.ndarray | list | tuple):
        raise ValueError(f"{name} must be an array or tensor, got {type(x).__name__}")
    if isinstance(x, np.ndarray) and not x.flags.writeable:  # a received buffer: torch warns
        x = x.copy()
    t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a float array, got dtype {t.dtype}")
    return t.to(device, torch.float32).contiguous()


def check_latents(cfg: IWMConfig, device: torch.device, z_cls: ArrayLike,
                  patches: ArrayLike | None) -> tuple[Tensor, Tensor | None]:
    d, n = cfg.embed_dim, cfg.num_patches
    z = _as_float(z_cls, "z_cls", device)
    z = z[None] if z.ndim == 1 else z
    if z.ndim != 2 or z.shape[1] != d:
        raise ValueError(f"z_cls must be (B, {d}), got shape {tuple(z.shape)}")
    if patches is None:
        return z, None
    p = _as_float(patches, "patches", device)
    p = p[None] if p.ndim == 2 else p
    if p.ndim != 3 or p.shape[1:] != (n, d) or p.shape[0] != z.shape[0]:
        raise ValueError(f"patches must be ({z.shape[0]}, {n}, {d}) to match z_cls, "
                         f"got shape {tuple(p.shape)}")
    return z, p


def check_cond(cfg: IWMConfig, device: torch.device, cond: ArrayLike | None,
               lead: tuple[int, ...]) -> Tensor:
    cd = cfg.cond_dim
    if cond is None:
        return torch.zeros(*lead, cd, device=device)
    c = _as_float(cond, "cond", device)
    if c.shape[-1:] != (cd,):
        raise ValueError(f"cond has length {tuple(c.shape)[-1:]} but the model expects "
                         f"cond_dim={cd}; zero-pad shorter vectors with pad_cond")
    if c.ndim == 1:
        c = c.expand(*lead, cd)
    if tuple(c.shape) != (*lead, cd):
        raise ValueError(f"cond must be {(*lead, cd)}, got shape {tuple(c.shape)}")
    return c.contiguous()


def check_actions(cfg: IWMConfig, device: torch.device, action_id: ArrayLike | None,
                  lead: tuple[int, ...]) -> Tensor | None:
    na = cfg.num_actions
    if action_id is None:
        return None
    a = torch.as_tensor(action_id)
    if a.is_floating_point() or a.dtype == torch.bool:
        raise ValueError(f"action ids must be integers, got dtype {a.dtype}")
    if a.ndim == 0:
        a = a.expand(*lead)
    if tuple(a.shape) != lead:
        raise ValueError(f"action ids must have shape {lead}, got {tuple(a.shape)}")
    lo, hi = int(a.min()), int(a.max())  # on the caller's device (usually the CPU)
    if lo < -1 or hi >= na:
        raise ValueError(f"action ids must be in [-1, {na - 1}] (num_actions={na}), "
                         f"got values in [{lo}, {hi}]")
    return a.to(device, torch.long).contiguous() if na else None


def check_step_inputs(cfg: IWMConfig, device: torch.device, z_cls: ArrayLike,
                      patches: ArrayLike | None, cond: ArrayLike | None,
                      action_id: ArrayLike | None) -> Step:
    z, p = check_latents(cfg, device, z_cls, patches)
    lead = (z.shape[0],)
    return z, p, check_cond(cfg, device, cond, lead), check_actions(cfg, device, action_id, lead)


def check_rollout_inputs(cfg: IWMConfig, device: torch.device, z_cls: ArrayLike,
                         patches: ArrayLike | None, cond_seq: ArrayLike | None,
                         action_seq: ArrayLike | None) -> Step:
    """Start state expanded to the B candidate sequences; cond (B, K, C), actions (B, K)."""
    if cond_seq is None and action_seq is None:
        raise ValueError("rollout needs cond_seq (B, K, cond_dim) and/or action_seq (B, K)")
    z, p = check_latents(cfg, device, z_cls, patches)
    seq = cond_seq if cond_seq is not None else action_seq
    shape = tuple(torch.as_tensor(seq).shape)
    if len(shape) < 2:
        raise ValueError(f"cond_seq/action_seq must be batched over (B, K, ...), got {shape}")
    lead = shape[:2]  # (B, K)
    if z.shape[0] not in (1, lead[0]):
        raise ValueError(f"start state batch {z.shape[0]} must be 1 or match the {lead[0]} "
                         "sequences")
    z = z.expand(lead[0], -1).contiguous()  # (B, D)
    if p is not None:
        p = p.expand(lead[0], -1, -1).contiguous()  # (B, N, D)
    return (z, p, check_cond(cfg, device, cond_seq, lead),
            check_actions(cfg, device, action_seq, lead))
