import os, sys, time, torch
torch.set_num_threads(1)
kind = sys.argv[1]; start = float(sys.argv[2]); dur = float(sys.argv[3])
if kind == "gemm":
    a = torch.randn(1024, 1024); b = torch.randn(1024, 1024); f = lambda: torch.mm(a, b)
elif kind == "add":
    x = torch.ones(4 << 20); y = torch.ones(4 << 20); o = torch.empty_like(x); f = lambda: torch.add(x, y, out=o)
elif kind == "small":
    w = torch.randn(64, 64, requires_grad=True); x = torch.randn(128, 64)
    def f():
        h = x
        for _ in range(20):
            h = torch.nn.functional.gelu(h @ w) + h
        h.sum().backward()
elif kind == "mid":
    w = torch.randn(256, 256, requires_grad=True); x = torch.randn(256, 256)
    def f():
        h = x
        for _ in range(8):
            h = torch.nn.functional.layer_norm(h @ w, (256,)) + h
        h.sum().backward()
for _ in range(5): f()
while time.time() < start: time.sleep(0.0005)
n = 0; c0 = time.thread_time(); t0 = time.perf_counter()
while time.perf_counter() - t0 < dur:
    f(); n += 1
print(kind, f"{(time.thread_time()-c0)/n*1e3:.3f} ms cpu/iter", f"{(time.perf_counter()-t0)/n*1e3:.3f} ms wall/iter")
