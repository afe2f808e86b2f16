"""Inference precision of an IWM: fp32, bfloat16 autocast, or int8 weights on a CPU.

- ``auto``: bf16 autocast on CUDA (``IWM.amp``, the default), fp32 on a CPU.
- ``fp32``: no autocast anywhere.
- ``bf16``: bf16 autocast on CUDA and on a CPU. It is fast where the CPU has bf16
  instructions (AVX512-BF16, AMX) and slower than fp32 where it has none.
- ``int8``: CPU only. Every ``nn.Linear`` becomes a dynamically quantised one (PyTorch's
  ``quantize_dynamic``: per-tensor int8 weights, activations quantised per call; fbgemm on
  x86, qnnpack on ARM). That covers the ViT's qkv, projection and MLP layers and the
  predictor's. Attention products, norms and the patch embedding (a convolution) stay fp32.

A model set to int8 is for inference only: it cannot be trained or saved afterwards.
``bench/dual.py`` measures what each precision costs and ``iwm-eval --precision`` what it
changes on held-out data (docs/results.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from iwm_bus.config import PRECISIONS, precision_error
from iwm_bus.model.iwm import IWM

__all__ = ["PRECISIONS", "set_precision"]


def set_precision(model: IWM, precision: str) -> IWM:
    """Set ``model`` (in place) to run inference at ``precision`` (one of
    :data:`PRECISIONS`) and return it. int8 also puts the model in eval mode.

    Raises ValueError for an unknown precision, for int8 off the CPU (or without a quantised
    engine), for bf16 off CPU and CUDA, and for a model that is already int8, since its
    weights cannot go back.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model.precision == "int8":
        raise ValueError("this model's weights are already int8; load it again for another "
                         "precision")
    why = precision_error(precision, str(model.device))
    if why:
        raise ValueError(why)
    model.amp = precision in ("auto", "bf16")  # CUDA autocast (CPU: IWM.cpu_amp)
    if precision == "int8":
        model.eval()
        with warnings.catch_warnings():  # eager-mode quantisation is marked for migration
            warnings.simplefilter("ignore")  # to torchao; it works as documented in 2.14
            try:
                torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8,
                                                       inplace=True)
            except RuntimeError as e:  # e.g. no quantised engine in this torch build
                raise ValueError(f"int8 is not available here ({e}); use fp32 or bf16") from e
    model.precision = precision
    return model
