"""Losses: BCE (+ optional Dice) on the mask and contour maps, and the semantic FG-BG
adversarial loss of paper Eq. 4.

Eq. 4:  L_fg-bg = min_Psi max_D  E[log D(F_gt)] + E[log(1 - D(F_pr))] + lambda1 E[D(F_gt) - D(F_pr)]
with F_gt = concat(I, M_gt), F_pr = concat(I, M_pred). :func:`fgbg_objective` computes that
value from the discriminator's logits; the discriminator ascends it (minimises its negative,
with M_pred detached) and the segmentation network descends it, inside
L = L_BCE + lambda * L_fg-bg (lambda = 0.5 in the paper).

How the segmentation network descends it is :func:`generator_loss`'s choice: ``"minimax"`` is
Eq. 4 itself, whose log(1 - D(F_pr)) has no lower bound: once D is fooled it rewards fooling it
further without limit and can outweigh the BCE. ``"non_saturating"`` (the default) swaps that
term for -log D(F_pr), the usual practice since Goodfellow et al. 2014: the same fixed point,
gradients that are strong while D is right and fade once it is fooled.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def fgbg_objective(real_logits: torch.Tensor, fake_logits: torch.Tensor, lambda1: float) -> torch.Tensor:
    """The value of Eq. 4 for discriminator logits ``(B,)`` on real and predicted masks."""
    d_real, d_fake = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)
    # log D = logsigmoid(z) and log(1 - D) = logsigmoid(-z), stable for large |z|.
    return (
        F.logsigmoid(real_logits).mean() + F.logsigmoid(-fake_logits).mean() + lambda1 * (d_real.mean() - d_fake.mean())
    )


def generator_loss(
    real_logits: Optional[torch.Tensor], fake_logits: torch.Tensor, lambda1: float, objective: str = "non_saturating"
) -> torch.Tensor:
    """What the segmentation network minimises, D held fixed (see the module doc).

    ``"minimax"``: Eq. 4's value. ``"non_saturating"``: -E[log D(F_pr)] - lambda1 E[D(F_pr)]; it
    does not depend on ``real_logits`` (pass None to skip computing them).
    """
    if objective == "minimax":
        return fgbg_objective(real_logits, fake_logits, lambda1)
    if objective == "non_saturating":
        return -(F.logsigmoid(fake_logits).mean() + lambda1 * torch.sigmoid(fake_logits).mean())
    raise ValueError(f"objective must be 'non_saturating' or 'minimax'; got {objective!r}")


def straight_through_binary(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``prob >= threshold`` as 0/1 values of ``prob``'s dtype, with the gradient of the identity.

    The discriminator compares predicted masks with binary ground truth; shown probabilities, it
    can tell them apart by their softness alone, and its gradient then pushes every voxel to
    saturate, right or wrong. Binarised, a prediction differs from the truth only where it is
    wrong, which is what the FG-BG loss is meant to judge.
    """
    return prob + ((prob >= threshold).to(prob.dtype) - prob).detach()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, lambda1: float) -> torch.Tensor:
    """What the discriminator minimises: ``-Eq.4`` (pass logits of a detached prediction)."""
    return -fgbg_objective(real_logits, fake_logits, lambda1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice on ``(B, C, T, H, W)`` logits against {0, 1} targets, averaged over channels."""
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    overlap = (prob * target).sum(dims)
    return (1 - (2 * overlap + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, contour_pos_weight: float = 1.0, dice_weight: float = 0.0
) -> torch.Tensor:
    """BCE on every output channel (mask, and contour if present) against ``target`` of the
    same shape ``(B, out, T, H, W)``; the contour channel (index 1) may weight its sparse
    positives by ``contour_pos_weight``; plus ``dice_weight`` times soft Dice."""
    if logits.shape != target.shape:
        raise ValueError(f"target must have the shape of logits {tuple(logits.shape)}; got {tuple(target.shape)}")
    target = target.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1])
    if logits.shape[1] > 1:
        pos_weight = torch.tensor(contour_pos_weight, dtype=logits.dtype, device=logits.device)
        loss = loss + F.binary_cross_entropy_with_logits(logits[:, 1:], target[:, 1:], pos_weight=pos_weight)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(logits, target)
    return loss
