"""Look augmentations for the action terms: a game drawn differently, with the same rules.

The action terms (``iwm_bus.model.action_terms``) teach which outcome each action leads to.
A game never trained on looks different (its colours, its layout) and maps its actions to
other sprites; augmentations that change a game's look, but not what its actions do, give the
model more looks of the same rules (data augmentation for transfer in RL: RAD, Laskin et al.
2020; DrAC, Raileanu et al. 2021). Per sample, alike for every frame of it:

- **mirror** (``train.mirror_p``): the frames flipped left to right and every action id
  replaced by its mirror image (``iwm_bus.actions.MIRRORED``: LEFT <-> RIGHT, UPLEFT <->
  UPRIGHT, ...). A mirrored game with mirrored controls is a consistent game: what RIGHT
  does on the screen, LEFT does in the mirror. The ids must be the shared vocabulary's.
- **recolour** (``train.recolour_p``): the colour channels permuted and/or inverted (one of
  the 11 looks other than the original).

A factual sample's 4 frames share their look; so do a counterfactual state, its outcomes and
its queries' actions. The looks come from the step's generator, so a step's batch stays a
pure function of its seed; with both probabilities 0 nothing is drawn and batches are the same
as without this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import torch
from torch import Tensor

from iwm_bus.actions import MIRRORED

__all__ = ["Looks", "sample_looks"]

#: (channel order, inverted) of every recoloured look: 6 orders x 2, less the original
_RECOLOURS = [(perm, inv) for perm in permutations(range(3)) for inv in (False, True)][1:]
_MIRROR = torch.tensor(MIRRORED)


@dataclass(frozen=True)
class Looks:
    """One look per sample: ``mirror`` (n,) bool; ``recolour`` (n,) long, -1 for the original
    colours, else an index into the 11 recoloured looks."""

    mirror: Tensor
    recolour: Tensor

    def part(self, rows: slice | Tensor) -> Looks:
        """The looks of ``rows`` of the samples: a DDP rank's slice of the global batch, or
        an index (m,) giving the sample of each of m things."""
        return Looks(self.mirror[rows], self.recolour[rows])

    def _of(self, owner: Tensor | None) -> Looks:
        return self if owner is None else self.part(owner)

    def frames(self, u8: Tensor, owner: Tensor | None = None) -> Tensor:
        """uint8 frames (n, ..., H, W, 3) in their samples' looks; ``owner`` (m,) gives the
        sample of each of m frames when they are not one per sample in order."""
        look = self._of(owner)
        out = u8.clone()
        if look.mirror.any():
            out[look.mirror] = out[look.mirror].flip(-2)
        for i, (perm, inv) in enumerate(_RECOLOURS):
            sel = look.recolour == i
            if sel.any():
                part = out[sel][..., list(perm)]
                out[sel] = 255 - part if inv else part
        return out

    def actions(self, ids: Tensor, owner: Tensor | None = None) -> Tensor:
        """Action ids (n, ...) as the mirrored samples' actions (``owner`` as in ``frames``)."""
        mirror = self._of(owner).mirror
        if not mirror.any():  # recoloured only: any ids, untouched
            return ids
        mirror = mirror.view(-1, *([1] * (ids.dim() - 1))).to(ids.device)
        return torch.where(mirror, _MIRROR.to(ids.device)[ids], ids)

    def action_sets(self, mask: Tensor, owner: Tensor) -> Tensor:
        """(m, A) bool, the actions that lead to each of m outcomes, in the mirrored samples'
        ids: action ``MIRRORED[a]`` of a mirrored sample leads where ``a`` leads."""
        mirror = self.part(owner).mirror.to(mask.device)[:, None]
        if not mirror.any():
            return mask
        if mask.shape[1] != len(MIRRORED):
            raise ValueError(f"action sets over {mask.shape[1]} ids cannot be mirrored: the "
                             f"mirror maps the shared vocabulary's {len(MIRRORED)}")
        return torch.where(mirror, mask[:, _MIRROR.to(mask.device)], mask)


def sample_looks(gen: torch.Generator, n: int, mirror_p: float, recolour_p: float) -> Looks:
    """n samples' looks: mirrored with probability ``mirror_p``, recoloured (uniformly one of
    the 11 other looks) with probability ``recolour_p``."""
    mirror = torch.rand(n, generator=gen) < mirror_p
    pick = torch.randint(len(_RECOLOURS), (n,), generator=gen)
    recolour = torch.where(torch.rand(n, generator=gen) < recolour_p, pick, -1)
    return Looks(mirror, recolour)
