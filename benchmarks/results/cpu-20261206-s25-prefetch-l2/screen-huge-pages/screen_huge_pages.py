import importlib.util, sys, time, statistics, torch, mmap
from kangaroo_rt import _cpu_ext, hugepages
torch.set_num_threads(2)
names = sys.argv[1].split(","); rows=[int(v) for v in sys.argv[2].split(",")]
mods={}
for n in names:
    spec = importlib.util.spec_from_file_location(f"kangaroo_rt_v_{n}._cpu", f"/tmp/s25/v_{n}.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[n] = m
def huge(t):
    size=(t.numel()*t.element_size()+ (4<<20))
    mp=mmap.mmap(-1,size,flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)
    raw=torch.frombuffer(mp,dtype=torch.uint8); start=(-raw.data_ptr())%(2<<20)
    mp.madvise(mmap.MADV_HUGEPAGE)
    out=raw[start:start+t.numel()*t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t); return out
torch.manual_seed(0)
heads=[(torch.randn(49152,576)*0.05).bfloat16() for _ in range(4)]
screens=[list(_cpu_ext.make_head_screen(w)) for w in heads]
print("huge before", hugepages.huge_page_bytes()>>20)
hscreens=[[huge(t) for t in s] for s in screens]
hheads=[huge(w) for w in heads]
print("huge after", hugepages.huge_page_bytes()>>20)
xs={M:(torch.randn(M,576)*3).bfloat16() for M in rows}
T={}
for r in range(12):
    for M in rows:
        for n in names:
            for tag,(hs,ss) in (("4k",(heads,screens)),("2m",(hheads,hscreens)))[::(1 if r%2 else -1)]:
                m=mods[n]
                [m.screened_argmax(xs[M],w,s) for w,s in zip(hs,ss)]
                t0=time.perf_counter(); [m.screened_argmax(xs[M],w,s) for w,s in zip(hs,ss)]
                T.setdefault((n,M,tag),[]).append((time.perf_counter()-t0)/4e-3)
            for tag,hs in (("4k-whole",heads),("2m-whole",hheads)):
                m=mods[n]; x=xs[M]
                [m.linear(x,w) for w in hs]
                t0=time.perf_counter(); [m.linear(x,w) for w in hs]
                T.setdefault((n,M,tag),[]).append((time.perf_counter()-t0)/4e-3)
for M in rows:
    print(f"M={M} "+"  ".join(f"{n}/{tag} {statistics.median(T[(n,M,tag)]):.3f}" for n in names for tag in ("4k","2m","4k-whole","2m-whole")))
