"""The first prototype (not on main): ``autopart`` with the head's vocabulary split into $VCH chunks by a
graph pass patched into capture (planning only; the runtime half is in vocab-chunks.patch).
Run from the repository root: ``VCH=2 python benchmarks/results/2026-12-07-vocab-chunks-tried/prototype.py plan ...``
(the commands are in ../2026-12-07-vocab-chunks-tried.md)."""
import sys, time, torch, torch.fx as fx
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from torch._guards import detect_fake_mode
import importlib; cap = importlib.import_module("partitioner.capture")

def split_head(gm, chunks):
    g = gm.graph
    lin = [n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    head = lin[-1]
    x, w = head.args[0], head.args[1]
    b = head.args[2] if len(head.args) > 2 else None
    V = w.meta["val"].shape[0]
    bounds = [V * i // chunks for i in range(chunks + 1)]
    stack = dict(head.meta.get("nn_module_stack") or {})
    items = list(stack.items()); last_key, (fqn, typ) = items[-1]
    fake = detect_fake_mode([w.meta["val"], x.meta["val"]])
    parts = []
    with g.inserting_before(head):
        for i in range(chunks):
            st = dict(items[:-1]); st[f"{last_key}_vocab{i}"] = (f"{fqn}.vocab{i}", "VocabChunk")
            a, e = bounds[i], bounds[i + 1]
            ws = g.call_function(torch.ops.aten.slice.Tensor, (w, 0, a, e))
            args = [x, ws]
            if b is not None:
                bs = g.call_function(torch.ops.aten.slice.Tensor, (b, 0, a, e)); args.append(bs)
            l = g.call_function(torch.ops.aten.linear.default, tuple(args))
            for n in ([ws] + ([bs] if b is not None else []) + [l]):
                n.meta["nn_module_stack"] = st
                n.meta["stack_trace"] = head.meta.get("stack_trace")
            with fake:
                ws.meta["val"] = torch.ops.aten.slice.Tensor(w.meta["val"], 0, a, e)
                l.meta["val"] = torch.ops.aten.linear.default(x.meta["val"], ws.meta["val"])
            parts.append(l)
        cat = g.call_function(torch.ops.aten.cat.default, (parts, -1))
        cat.meta["nn_module_stack"] = stack
        cat.meta["val"] = head.meta["val"]
    head.replace_all_uses_with(cat)
    g.erase_node(head)
    gm.recompile()
    return fqn

orig = cap._trace_export
def patched(model, args, kwargs):
    gm, m = orig(model, args, kwargs)
    split_head(gm, int(__import__("os").environ.get("VCH", "2")))
    return gm, m
if int(__import__("os").environ.get("VCH", "1")) > 1:
    cap._trace_export = patched
from partitioner.cli import main
sys.exit(main(sys.argv[1:]))
