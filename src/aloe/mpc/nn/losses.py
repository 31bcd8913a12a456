"""Losses with their gradients on shared logits (the ``CrossEntropyLossWithSoftmax`` and
``BinaryCrossEntropyLossWithSigmoid`` layers of Morse-STF): both return the gradient ``y - label`` with respect to
the logits, summed (not averaged) over the batch; the optimiser divides by the batch size inside its learning rate.
"""

from __future__ import annotations

from aloe.mpc.tensor import SharedTensor

# inputs to the Fourier sigmoid must stay inside (-16, 16); logits are clamped to +-12 first (two ReLUs, 5 rounds)
SIGMOID_CLIP = True
# Euler steps of the ODE softmax: Euler diverges once the per-row logit range exceeds 2r, and its error is about
# 0.35 / r (docs/mpc.md); 32 steps cover ranges up to 64 with error ~0.01
SOFTMAX_STEPS = 32


def sigmoid_bce_grad(logits: SharedTensor, labels: SharedTensor, *, clip: bool = SIGMOID_CLIP,
                     drelu: str = "gmodule") -> SharedTensor:
    """d(BCE(sigmoid(z), t))/dz = sigmoid(z) - t (one sigmoid round, plus the clamp's: 5 with the G-module DReLU,
    8 with ``drelu="prefix"``)."""
    return logits.sigmoid(clip=clip, drelu=drelu) - labels


def softmax_ce_grad(logits: SharedTensor, onehot: SharedTensor, *, steps: int = SOFTMAX_STEPS) -> SharedTensor:
    """d(CE(softmax(z), t))/dz = softmax(z) - t for one-hot ``t`` (ODE softmax, 2r rounds)."""
    return logits.softmax(-1, steps=steps) - onehot
