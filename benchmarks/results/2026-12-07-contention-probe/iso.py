import sys, time, json, statistics, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(1)
from partitioner.plan import Plan
from partitioner.zoo import load_model
from partitioner.rewrite import split_model, microbatch_inputs
plan = Plan.load(sys.argv[1])
lm = load_model("gpt2-tiny", seq_len=64, device="cpu")
model = lm.model.train()
mb = plan.schedule.micro_batch_size
inputs = microbatch_inputs(lm.example_inputs, mb)
sm = split_model(model, plan, inputs)
# stage 0 forward/backward, then stage 1 with stage 0's outputs
mods = [st.module for st in sm.stages]
def run(k, args):
    t0 = time.perf_counter(); out = mods[k](*args); t1 = time.perf_counter()
    return out, t1 - t0
fw = {0: [], 1: []}; bw = {0: [], 1: []}
import os
while time.time() < float(os.environ.get("START", "0")): time.sleep(0.001)
for it in range(int(os.environ.get("ITERS", "30"))):
    out0, f0 = run(0, inputs)
    out0 = out0 if isinstance(out0, tuple) else (out0,)
    x1 = tuple(o.detach().requires_grad_(o.is_floating_point()) for o in out0)
    out1, f1 = run(1, x1)
    out1 = out1 if isinstance(out1, tuple) else (out1,)
    loss = out1[0].float().logsumexp(-1).mean()
    t0 = time.perf_counter(); loss.backward(); b1 = time.perf_counter() - t0
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in x1 if x.requires_grad]
    outs = [o for o in out0 if o.requires_grad]
    t0 = time.perf_counter(); torch.autograd.backward(outs, grads[:len(outs)]); b0 = time.perf_counter() - t0
    if it >= 5:
        fw[0].append(f0); fw[1].append(f1); bw[0].append(b0); bw[1].append(b1)
    for m in mods: m.zero_grad(set_to_none=True)
for k in (0, 1):
    pr = plan.stages[k].predicted
    print(f"stage {k}: isolated fwd {statistics.median(fw[k])*1e3:.2f} ms bwd {statistics.median(bw[k])*1e3:.2f} ms | plan per mb fwd {pr.forward_s*1e3:.2f} bwd {pr.backward_s*1e3:.2f}")
