"""Fidelity: how close a compressed graph's outputs stay to the original's.

The headline number is the cosine similarity, per sample, of the model's first output (e.g.
`last_hidden_state`) over the sample's real tokens (padding excluded), min and mean over the
calibration set; max-abs error over all outputs is reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.utils._pytree as pytree


@dataclass
class Fidelity:
    cos_min: float
    cos_mean: float
    max_abs: float

    def ok(self, budget: float) -> bool:
        return self.cos_min >= budget

    def error(self) -> float:
        """(1 - min cosine) + (1 - mean cosine): what the held-out checks of training steps
        (distill, tune_quantized) minimise."""
        return (1 - self.cos_min) + (1 - self.cos_mean)

    def as_dict(self) -> dict:
        return asdict(self)


def flat_tensors(output) -> list[torch.Tensor]:
    leaves, _ = pytree.tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def sample_vectors(out: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """One flat vector per sample; rows of padding (mask == 0) are left out."""
    out = out.float()
    vecs = []
    for b in range(out.shape[0]):
        o = out[b]
        if mask is not None and out.dim() >= 2 and o.shape[0] == mask.shape[1]:
            o = o[mask[b].bool()]
        vecs.append(o.reshape(-1))
    return vecs


def batch_mask(inputs: dict) -> torch.Tensor | None:
    m = inputs.get("attention_mask")
    return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def compare(refs: list, outs: list, batches: list[dict]) -> Fidelity:
    """refs/outs: per batch, the flat output tensors of the original and the compressed model."""
    cosines, max_abs = [], 0.0
    for ref, out, inputs in zip(refs, outs, batches):
        mask = batch_mask(inputs)
        for r, o in zip(sample_vectors(ref[0], mask), sample_vectors(out[0], mask)):
            cosines.append(torch.nn.functional.cosine_similarity(r, o, dim=0).item())
        for r, o in zip(ref, out):
            if r.shape == o.shape and r.is_floating_point():
                max_abs = max(max_abs, (r.float() - o.float()).abs().max().item())
    c = torch.tensor(cosines)
    if torch.isnan(c).any():
        return Fidelity(float("nan"), float("nan"), float("nan"))
    return Fidelity(c.min().item(), c.mean().item(), max_abs)


@torch.no_grad()
def run_batches(fn, batches: list[dict]) -> list[list[torch.Tensor]]:
    return [flat_tensors(fn(**b)) for b in batches]
