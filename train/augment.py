"""IWM augmentations that return their parameters (Garrido et al. 2024, "Learning and
Leveraging World Models in Visual Representation Learning").

Both views share one random resized crop and horizontal flip. The **target** view gets its own
colour jitter only; the **source** view gets its own colour jitter plus the destructive
transforms (grayscale, Gaussian blur, solarize). The predictor is told how to get from the
source to the target through the conditioning vector (``COND_LAYOUT``, 8 values, zero-padded
to ``cond_dim``)::

    0 brightness_t - brightness_s     4 source grayscale (0/1)
    1 contrast_t   - contrast_s       5 source blurred (0/1)
    2 saturation_t - saturation_s     6 source blur sigma / 2
    3 hue_t        - hue_s            7 source solarized (0/1)

Strong + destructive augmentations with a deep predictor make an equivariant world model,
weak ones an invariant one (IWM); ``condition=False`` withholds the parameters, which makes
the encoder itself invariant to them. Every random number comes from the generator passed to
:func:`sample_params`, so a step's views are a pure function of its seed, and parameters are
drawn for the whole (global) batch so that DDP ranks can each take their slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COND_LAYOUT", "AugConfig", "AugParams", "apply_views", "cond_vector",
           "sample_params", "with_target_jitters"]

COND_LAYOUT = ("d_brightness", "d_contrast", "d_saturation", "d_hue", "grayscale", "blur",
               "blur_sigma_half", "solarize")
_GRAY = (0.299, 0.587, 0.114)


@dataclass
class AugConfig:
    """Augmentation strengths and probabilities."""

    # random resized crop area range shared by both views
    crop_scale: tuple[float, float] = (0.3, 1.0)
    # random resized crop aspect-ratio range (width / height)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # probability of a horizontal flip (shared)
    flip_p: float = 0.5
    # colour jitter amplitude: brightness, contrast, saturation (factor 1 +- a), hue (+- a)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    # probability that a view is colour-jittered at all
    jitter_p: float = 0.8
    # source view: grayscale / blur / solarize probabilities (0 = weak augmentations)
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.2
    # blur sigma range
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # tell the predictor the parameters (IWM). False: it gets zero conditioning, so the
    # views loss can only fall if the encoder ignores the augmentations (an invariant model,
    # as in I-JEPA / BYOL-style training)
    condition: bool = True
    # target views per source view in a training batch: > 1 gives each source view this
    # many targets of the same crop under their own colour jitters (always on), the groups
    # that the views InfoNCE term (``Objective.views_nce_weight``) tells apart
    target_views: int = 1

    def __post_init__(self) -> None:
        for f in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise ValueError(f"AugConfig.{f} must be a probability in [0, 1], got {v!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"AugConfig.crop_scale must be 0 < a <= b <= 1, got {self.crop_scale!r}")
        if isinstance(self.target_views, bool) or not isinstance(self.target_views, int) \
                or self.target_views < 1:
            raise ValueError(f"AugConfig.target_views must be an int >= 1, got {self.target_views!r}")
        if len(self.jitter) != 4 or any(a < 0 for a in self.jitter) or self.jitter[3] > 0.5:
            raise ValueError(f"AugConfig.jitter must be 4 amplitudes >= 0 (hue <= 0.5), "
                             f"got {self.jitter!r}")


@dataclass
class AugParams:
    """The parameters of a batch of view pairs (all (B,) or (B, k) tensors)."""

    crop: Tensor  # (B, 4) top, left, height, width as fractions of the image
    flip: Tensor  # (B,) bool
    jitter_t: Tensor  # (B, 4) brightness, contrast, saturation factors, hue shift
    jitter_s: Tensor  # (B, 4)
    gray: Tensor  # (B,) bool, source only
    blur: Tensor  # (B,) bool, source only
    sigma: Tensor  # (B,) blur sigma (0 when not blurred)
    solarize: Tensor  # (B,) bool, source only

    def slice(self, sl: slice) -> AugParams:
        return AugParams(**{f.name: getattr(self, f.name)[sl] for f in fields(self)})


def _u(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _jitter(gen: torch.Generator, n: int, cfg: AugConfig) -> Tensor:
    b, c, s, h = cfg.jitter
    j = torch.stack([_u(gen, n, 1 - b, 1 + b), _u(gen, n, 1 - c, 1 + c),
                     _u(gen, n, 1 - s, 1 + s), _u(gen, n, -h, h)], 1)  # (B, 4)
    off = torch.rand(n, generator=gen) >= cfg.jitter_p
    j[off] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    return j


def sample_params(gen: torch.Generator, n: int, cfg: AugConfig | None = None) -> AugParams:
    """Draw the parameters of ``n`` view pairs."""
    cfg = cfg or AugConfig()
    area = _u(gen, n, *cfg.crop_scale)
    ratio = torch.exp(_u(gen, n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
    h = (area * ratio).sqrt().clamp(max=1.0)
    w = (area / ratio).sqrt().clamp(max=1.0)
    top, left = torch.rand(n, generator=gen) * (1 - h), torch.rand(n, generator=gen) * (1 - w)
    flip = torch.rand(n, generator=gen) < cfg.flip_p
    jt, js = _jitter(gen, n, cfg), _jitter(gen, n, cfg)
    gray = torch.rand(n, generator=gen) < cfg.gray_p
    blur = torch.rand(n, generator=gen) < cfg.blur_p
    sigma = torch.where(blur, _u(gen, n, *cfg.blur_sigma), torch.zeros(n))
    solar = torch.rand(n, generator=gen) < cfg.solarize_p
    return AugParams(torch.stack([top, left, h, w], 1), flip, jt, js, gray, blur, sigma, solar)


def with_target_jitters(gen: torch.Generator, base: AugParams, k: int, cfg: AugConfig
                        ) -> AugParams:
    """``k`` copies of each of ``base``'s pairs (B * k, each pair's copies together), each
    copy with its own target colour jitter (always on): one source view and ``k`` targets
    that differ in colour alone. IWM's augmentation MRR ranks such a bank; the views
    InfoNCE term trains on such groups."""
    rep = {f.name: getattr(base, f.name).repeat_interleave(k, 0)
           for f in fields(base) if f.name != "jitter_t"}
    jt = sample_params(gen, len(base.flip) * k, AugConfig(jitter=cfg.jitter, jitter_p=1.0)).jitter_t
    return AugParams(jitter_t=jt, **rep)


def cond_vector(p: AugParams, cond_dim: int) -> Tensor:
    """The conditioning vectors (B, cond_dim) of ``COND_LAYOUT``, zero-padded."""
    if cond_dim < len(COND_LAYOUT):
        raise ValueError(f"cond_dim={cond_dim} is too small for the {len(COND_LAYOUT)} "
                         "augmentation parameters")
    v = torch.cat([p.jitter_t - p.jitter_s, p.gray[:, None].float(), p.blur[:, None].float(),
                   (p.sigma / 2)[:, None], p.solarize[:, None].float()], 1)  # (B, 8)
    out = torch.zeros(v.shape[0], cond_dim)
    out[:, : v.shape[1]] = v
    return out


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, H, W)


def _rgb_to_yiq_rotate(x: Tensor, hue: Tensor) -> Tensor:
    """Hue shift by ``hue`` turns (B,) as a rotation of the IQ chroma plane."""
    m = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                      [0.211, -0.523, 0.312]], dtype=x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", m, x)  # (B, 3, H, W)
    a = (hue * 2 * math.pi).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * a.cos() - q * a.sin(), i * a.sin() + q * a.cos()], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), yiq)


def color_jitter(x: Tensor, j: Tensor) -> Tensor:
    """Brightness, contrast, saturation factors and hue shift ``j`` (B, 4) on x in [0, 1]."""
    x = x * j[:, 0].view(-1, 1, 1, 1)
    m = _gray(x).mean((2, 3), keepdim=True)
    x = ((x - m) * j[:, 1].view(-1, 1, 1, 1) + m).clamp(0, 1)
    g = _gray(x)
    x = ((x - g) * j[:, 2].view(-1, 1, 1, 1) + g).clamp(0, 1)
    return _rgb_to_yiq_rotate(x, j[:, 3]).clamp(0, 1)


def _crop_positions(start: Tensor, size: Tensor, s: int) -> Tensor:
    """Where each of ``s`` output pixels samples [start, start + size) (B,) of an axis, in
    grid_sample's normalised coordinates (B, s): ``F.interpolate(align_corners=False)``'s
    positions, clamped inside the crop as it clamps them (crops are never larger than the
    image, so this is upsampling, where antialiasing changes nothing)."""
    i = torch.arange(s, dtype=torch.float32)
    size_f = size.to(torch.float32)[:, None]
    x = ((i[None] + 0.5) * size_f / s - 0.5).clamp(min=0)  # (B, s), in the crop
    x = torch.minimum(x, size_f - 1) + start[:, None]  # (B, s), in the image
    return (x + 0.5) / s * 2 - 1


def _crop(images: Tensor, p: AugParams) -> Tensor:
    """Shared resized crop + flip of uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]:
    every image in one ``grid_sample`` (no Python loop over the batch; on a CPU it costs
    what per-image resizes cost); values are rounded to uint8 levels as the uint8 resize
    it replaces did."""
    s = images.shape[1]
    box = p.crop * s  # (B, 4) pixels
    top, left = box[:, 0].floor(), box[:, 1].floor()
    h, w = box[:, 2].round().clamp(min=1), box[:, 3].round().clamp(min=1)
    ys, xs = _crop_positions(top, h, s), _crop_positions(left, w, s)  # (B, S) each
    xs = torch.where(p.flip[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    img = images.permute(0, 3, 1, 2).float().contiguous()  # (B, 3, S, S)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255) / 255.0


def _blur(x: Tensor, sigma: Tensor, on: Tensor) -> Tensor:
    """Gaussian blur of the images ``on`` (B,) with their ``sigma`` (B,), as
    ``TF.gaussian_blur`` per image (kernel 2 ceil(3 sigma) + 1, at least 3; reflect
    padding), all at once: a separable depthwise convolution with each image's own kernel,
    zero beyond its own radius."""
    idx = on.nonzero().flatten()
    if not len(idx):
        return x
    sig = sigma[idx].to(x.dtype)  # (n,)
    radius = torch.ceil(3 * sig).clamp(min=1)  # (n,): (kernel size - 1) / 2
    r = int(radius.max())
    t = torch.arange(-r, r + 1, dtype=x.dtype)  # (2r+1,)
    k = torch.exp(-0.5 * (t[None] / sig[:, None]) ** 2) * (t.abs()[None] <= radius[:, None])
    k = k / k.sum(1, keepdim=True)  # (n, 2r+1)
    sub = x[idx]  # (n, C, H, W)
    n, c, hh, ww = sub.shape
    kk = k.repeat_interleave(c, 0)  # (n*C, 2r+1)
    y = F.pad(sub.reshape(1, n * c, hh, ww), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)  # along rows
    y = F.conv2d(y, kk[:, None, :, None], groups=n * c)  # along columns
    out = x.clone()
    out[idx] = y.reshape(n, c, hh, ww)
    return out


def apply_views(images: Tensor, p: AugParams) -> tuple[Tensor, Tensor]:
    """(source, target) float views in [0, 1], (B, 3, S, S), of uint8 images (B, S, S, 3)."""
    base = _crop(images, p)
    tgt = color_jitter(base, p.jitter_t)
    src = color_jitter(base, p.jitter_s)
    src = torch.where(p.gray.view(-1, 1, 1, 1), _gray(src).expand_as(src), src)
    src = _blur(src, p.sigma, p.blur)
    src = torch.where(p.solarize.view(-1, 1, 1, 1), torch.where(src >= 0.5, 1 - src, src), src)
    return src, tgt
