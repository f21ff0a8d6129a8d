"""drop_layers: removes whole transformer layers (the residual stream skips them).

By importance (`count`: the N layers whose removal alone costs the least fidelity against the
original outputs) or by index (`indices`, in execution order; a shared layer called N times,
as in ALBERT, counts N times). A drop that would leave no layer is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule

from slimformer.compiler.blocks import Block, find_blocks
from slimformer.compiler.numerics import compare, run_batches
from slimformer.compiler.pass_manager import CompileContext, Pass, PassResult, register_pass
from slimformer.errors import SlimformerError
from slimformer.passes.prune_graph import refresh_meta
from slimformer.passes.prune_report import note_after, note_before


def parse_drop_spec(spec) -> tuple[int | None, list[int] | None]:
    """`3` / "3" -> drop the 3 least important; [1, 4] / "1,4" -> drop layers 1 and 4. Pure."""
    hint = "--drop-layers N (drop the N least important layers) or --drop-layers I,J (indices from 0)"
    if isinstance(spec, bool):
        raise SlimformerError(f"--drop-layers: expected a count or indices, got {spec!r}", hint)
    if isinstance(spec, int):
        if spec < 0:
            raise SlimformerError(f"--drop-layers: a count must be >= 0, got {spec}", hint)
        return spec, None
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise SlimformerError("--drop-layers: empty value", hint)
        if "," not in text:
            try:
                return parse_drop_spec(int(text))
            except ValueError:
                raise SlimformerError(f"--drop-layers: '{spec}' is not a count or a list of indices", hint) from None
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        raise SlimformerError(f"--drop-layers: expected a count or indices, got {spec!r}", hint)
    try:
        indices = [int(i) for i in items]
    except (TypeError, ValueError):
        raise SlimformerError(f"--drop-layers: '{spec}' is not a list of integer indices", hint) from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise SlimformerError(f"--drop-layers: indices must be distinct and >= 0, got {indices}", hint)
    return None, sorted(indices)


def skip_block(gm: GraphModule, block: Block) -> None:
    """Reroutes the block's readers to its input and erases its nodes (side-effect-only nodes
    such as _assert_tensor_metadata would otherwise keep the whole block computing)."""
    inside = set(block.nodes)
    block.output.replace_all_uses_with(block.input, delete_user_cb=lambda u: u not in inside)
    for n in reversed(block.nodes):
        if not n.users:  # what another layer still reads (T5's position bias) stays
            gm.graph.erase_node(n)


@register_pass
@dataclass
class DropLayers(Pass):
    """Options: count (drop the N least important layers) or indices (drop these)."""

    name = "drop_layers"
    rebases_reference = True
    count: int | None = None
    indices: list[int] = field(default_factory=list)
    max_batches: int | None = 4

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if not self.count and not self.indices:
            return PassResult(gm, False, "nothing to drop")
        blocks = find_blocks(gm)
        n = len(blocks)
        want = self.count if self.count else len(self.indices)
        if n == 0:
            raise SlimformerError("--drop-layers: no transformer layer was found in this model",
                                  "layer dropping needs attention blocks inside numbered layers; drop --drop-layers")
        if want >= n:
            raise SlimformerError(f"--drop-layers: dropping {want} of {n} layers would leave none",
                                  f"drop at most {n - 1} layers")
        if self.indices and max(self.indices) >= n:
            raise SlimformerError(f"--drop-layers: index {max(self.indices)} is out of range: the model "
                                  f"has {n} layers (0..{n - 1})", f"pass indices between 0 and {n - 1}")
        note_before(ctx, gm)
        costs = None
        if self.indices:
            chosen = list(self.indices)
        else:
            costs = self._costs(gm, ctx, blocks)
            chosen = sorted(sorted(range(n), key=lambda i: costs[i])[:want])
        for i in sorted(chosen, reverse=True):  # later blocks first: earlier inputs stay valid
            skip_block(gm, blocks[i])
        gm.graph.eliminate_dead_code()
        gm.recompile()
        refresh_meta(gm)
        per_layer = {}
        for i in chosen:
            cost = f" (alone: 1 - cos {costs[i]:.2e})" if costs else ""
            per_layer[f"{blocks[i].prefix}#{i}"] = f"dropped{cost}"
        note_after(ctx, gm, self.name, per_layer, {})
        return PassResult(gm, True, f"dropped {len(chosen)}/{n} layers: {chosen}",
                          {"dropped": chosen, "layers": [b.prefix for b in blocks],
                           "costs": costs or []})

    def _costs(self, gm: GraphModule, ctx: CompileContext, blocks: list[Block]) -> list[float]:
        """1 - mean cosine to the original outputs with each block skipped alone."""
        batches = ctx.calibration[: self.max_batches]
        targets = (ctx.original_reference or ctx.reference)[: self.max_batches]
        task = ctx.progress.add_task("layer importance", total=len(blocks)) if ctx.progress else None
        costs = []
        for b in blocks:
            inside = set(b.nodes)
            saved = {u: (u.args, u.kwargs) for u in b.output.users if u not in inside}
            for u in saved:
                u.replace_input_with(b.output, b.input)
            gm.recompile()
            try:
                costs.append(1.0 - compare(targets, run_batches(gm, batches), batches).cos_mean)
            finally:
                for u, (args, kwargs) in saved.items():
                    u.args, u.kwargs = args, kwargs
                gm.recompile()
            if task is not None:
                ctx.progress.advance(task)
        return costs
