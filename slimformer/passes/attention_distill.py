"""End-to-end output distillation after attention replacement (a minimal local one).

The structured-pruning work is to provide a general `passes/distill.py`; until then the
attention pass recovers with this: Adam on a chosen set of the graph's weights (the rewritten
blocks' projections and feature maps), loss = mean squared error of the first output (hidden
states) over real tokens, normalised by the teacher's variance, towards `ctx.reference`
(the graph's outputs before the rewrite: the pass runs this before the reference is rebased).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from slimformer.compiler.graph_utils import attr_tensor, set_attr_tensor
from slimformer.compiler.numerics import batch_mask, flat_tensors


def _loss(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (out.float() - ref.float()) ** 2  # (B, T, D)
    if mask is not None and err.dim() == 3 and mask.shape == err.shape[:2]:
        keep = (mask != 0).unsqueeze(-1).float()
        return (err * keep).sum() / (keep.sum() * err.shape[-1]) / ref.float().var().clamp(min=1e-8)
    return err.mean() / ref.float().var().clamp(min=1e-8)


def distill_outputs(gm: GraphModule, ctx, targets: list[str], steps: int, lr: float = 1e-4) -> dict:
    """Trains the tensors named by `targets` (get_attr targets) in place; returns the loss at
    the start and the end. Batches are visited round-robin, one step per batch."""
    targets = [t for t in targets if attr_tensor(gm, t).is_floating_point()]
    if not targets or steps <= 0:
        return {"steps": 0}
    for t in targets:  # fresh copies: the graph's weights may share storage with the original model's
        set_attr_tensor(gm, t, attr_tensor(gm, t).detach().clone())
    params = [attr_tensor(gm, t) for t in targets]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(ctx.calibration)
                batch = ctx.calibration[i]
                out = flat_tensors(gm(**batch))[0]
                loss = _loss(out, ctx.reference[i][0], batch_mask(batch))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    head = losses[: len(ctx.calibration)]
    tail = losses[-len(ctx.calibration):]
    return {"steps": steps, "tensors": len(params), "loss_start": round(sum(head) / len(head), 5),
            "loss_end": round(sum(tail) / len(tail), 5)}
