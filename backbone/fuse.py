"""Inference copies of a network with every BatchNorm folded into the conv before it.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one conv with
scaled weights and a bias (the same values up to float rounding). Folding saves one full pass over
every activation (README "Speed" has the eval img/s before and after, and
``python tools/benchmark.py task=det profile=true`` shows no BatchNorm left in our eval call).
Training keeps the BatchNorms; :class:`InferenceCopy` rebuilds the folded copy whenever the weights
have changed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` in which each ``Conv2d`` directly followed by a
    ``BatchNorm2d`` inside an ``nn.Sequential`` (``ConvBNAct``, the inverted residuals' projection)
    carries the BatchNorm in its weights and bias; the BatchNorm becomes ``nn.Identity``.

    The copy keeps the conv classes (TF-'SAME' padding convs stay ``Conv2dSame``) and each weight's
    memory format. ``model`` itself is not modified.
    """
    folded = copy.deepcopy(model).eval()
    for p in folded.parameters():
        p.grad = None  # a copy of the last step's gradients is of no use here
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                fused = fuse_conv_bn_eval(conv, bn)
                fused.weight.data = fused.weight.data.contiguous(memory_format=_format_of(conv.weight))
                seq._modules[a] = fused
                seq._modules[b] = nn.Identity()
    return folded.requires_grad_(False)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class InferenceCopy:
    """The folded copy of one network, rebuilt when any of its parameters or buffers changed
    (optimizer steps, ``load_state_dict`` and moves all bump a tensor's version or storage).

    Not an ``nn.Module`` on purpose: the copy is never a submodule, so it is neither saved in
    checkpoints nor seen by the optimizer or DDP.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model: nn.Module | None = None

    @staticmethod
    def _state_key(model: nn.Module) -> tuple:
        tensors = [*model.parameters(), *model.buffers()]
        return (id(model), tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def get(self, model: nn.Module) -> nn.Module:
        """The folded eval copy of ``model``'s current weights."""
        key = self._state_key(model)
        if self._model is None or key != self._key:
            self._model = fold_batchnorm(model)
            self._key = key
        return self._model
