# CPU time of the gloo threads (gloo_tcp_loop, pt_gloo_runloop) and the main thread per collective or p2p op.
#   python -m torch.distributed.run --standalone --nproc-per-node 2 (or 4) gloo_cpu.py
import os, time, torch, torch.distributed as dist
def gloo_cpu():
    hz = os.sysconf('SC_CLK_TCK'); tot = {}
    for tid in os.listdir('/proc/self/task'):
        try:
            name = open(f'/proc/self/task/{tid}/comm').read().strip()
            f = open(f'/proc/self/task/{tid}/stat').read().rsplit(')', 1)[1].split()
        except Exception: continue
        tot[name] = tot.get(name, 0) + (int(f[11]) + int(f[12])) / hz
    return tot
def main():
    dist.init_process_group('gloo'); r = dist.get_rank(); torch.set_num_threads(1)
    N = 400
    for label, fn in [
        ('p2p 4KB', lambda x: (dist.send(x, r+1) if r % 2 == 0 else dist.recv(x, r-1))),
        ('p2p 64KB', lambda x: (dist.send(x, r+1) if r % 2 == 0 else dist.recv(x, r-1))),
        ('p2p 1MB', lambda x: (dist.send(x, r+1) if r % 2 == 0 else dist.recv(x, r-1))),
        ('allreduce 4KB', lambda x: dist.all_reduce(x)),
        ('allreduce 1MB', lambda x: dist.all_reduce(x)),
        ('allgather 64KB', lambda x: dist.all_gather_into_tensor(torch.empty(x.numel()*dist.get_world_size()), x)),
        ('redscat 64KB', lambda x: dist.reduce_scatter_tensor(torch.empty(x.numel()//dist.get_world_size()), x)),
    ]:
        n = {'4KB': 1024, '64KB': 16384, '1MB': 262144}[label.split()[1]]
        x = torch.ones(n)
        for _ in range(10): fn(x)
        dist.barrier()
        c0 = gloo_cpu(); t0 = time.perf_counter(); m0 = time.thread_time()
        for _ in range(N): fn(x)
        t1 = time.perf_counter(); m1 = time.thread_time(); c1 = gloo_cpu()
        g = sum(v - c0.get(k, 0) for k, v in c1.items() if 'gloo' in k); det = {k: round(1e6*(v - c0.get(k, 0))/N) for k, v in c1.items() if v - c0.get(k, 0) > 0}
        print(f"rank {r} {label:15s} wall {1e6*(t1-t0)/N:8.1f} us/op  main cpu {1e6*(m1-m0)/N:8.1f} us/op  gloo threads cpu {1e6*g/N:8.1f} us/op {det}", flush=True)
    dist.destroy_process_group()
main()
