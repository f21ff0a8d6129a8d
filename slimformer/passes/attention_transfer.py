"""Attention transfer: fit each replaced layer's q/k/v projections so that its new attention
output matches the original softmax attention output, layer by layer, on calibration
activations (teacher forcing: every layer sees the original model's inputs).

Why layer by layer first: end-to-end distillation on a few hundred calibration tokens runs the
whole model per step and overfits them (measured on MiniLM, local window 64: held-out cosine
fell while calibration cosine rose); a per-layer regression of one attention output on its own
inputs has far more targets per trained weight, costs one projection + attention per step, and
cannot drift the rest of the model.

Only for layers whose SDPA operands are plain reshapes of three `nn.Linear`s (checked
numerically on the captured activations): BERT-family encoders. Rotary (Llama) or fused
(GPT-2) projections are left to the Hedgehog fit and end-to-end distillation.
"""

from __future__ import annotations

import torch

from slimformer.compiler.analysis import AttentionSite


def projections(site: AttentionSite):
    sites = (site.q, site.k, site.v)
    if any(s is None or s.kind != "linear" for s in sites):
        return None
    if len({s.x for s in sites}) != 1 or site.num_kv_heads != site.num_heads:
        return None
    return sites


def _heads(y: torch.Tensor, h: int) -> torch.Tensor:
    b, t, _ = y.shape
    return y.view(b, t, h, -1).transpose(1, 2)  # (B, H, T, D)


def matches_graph(gm, site, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Do linear(x) reshaped to heads give the q and k the SDPA node saw?"""
    lq, lk, _ = projections(site)
    with torch.no_grad():
        for lin, want in ((lq, q), (lk, k)):
            got = _heads(torch.nn.functional.linear(x, lin.weight(gm), lin.bias(gm)), site.num_heads)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
                return False
    return True


def fit_projections(gm, site: AttentionSite, samples: list[tuple], attend, extra: list[torch.Tensor],
                    steps: int, lr: float = 1e-4) -> tuple[dict, dict]:
    """samples: (x (B, T, C), target (B, H, T, D), keep (B, T) bool) per calibration batch.
    attend(q, k, v, batch_index, *extra) -> (B, H, T, D): the replacement attention.
    Returns ({get_attr target: new tensor}, {"mse_start", "mse_end"}); `extra` tensors (feature
    maps) are trained in place of copies and returned under the keys "extra.<i>"."""
    lins = projections(site)
    params = {}
    for lin in lins:
        params[lin.weight_node.target] = lin.weight(gm).detach().clone().requires_grad_(True)
        if lin.bias_node is not None:
            params[lin.bias_node.target] = lin.bias(gm).detach().clone().requires_grad_(True)
    extras = [t.detach().clone().requires_grad_(True) for t in extra]
    opt = torch.optim.Adam(list(params.values()) + extras, lr=lr)

    def loss_of(i):
        x, target, keep = samples[i]
        qkv = []
        for lin in lins:
            b = params.get(lin.bias_node.target) if lin.bias_node is not None else None
            qkv.append(_heads(torch.nn.functional.linear(x, params[lin.weight_node.target], b), site.num_heads))
        out = attend(*qkv, i, *extras)
        err = (out - target).pow(2).mean(dim=(1, 3))  # (B, T)
        return err[keep].mean() / target.var().clamp(min=1e-12)

    def mean_loss():
        with torch.no_grad():
            return sum(loss_of(i).item() for i in range(len(samples))) / len(samples)

    start = mean_loss()
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad()
            loss_of(step % len(samples)).backward()
            opt.step()
    info = {"mse_start": round(start, 5), "mse_end": round(mean_loss(), 5)}
    new = {k: v.detach() for k, v in params.items()}
    new.update({f"extra.{i}": t.detach() for i, t in enumerate(extras)})
    return new, info
