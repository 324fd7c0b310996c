"""Elementwise activations on CUDA.

A CUDA elementwise kernel applies the same device function to every element (vectorised
loads change only how elements are fetched, not the math), so `torch.sigmoid`/`F.silu` are
position-independent there, unlike ATen's CPU vector-body/scalar-tail split.
"""
import torch
import torch.nn.functional as F


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)
