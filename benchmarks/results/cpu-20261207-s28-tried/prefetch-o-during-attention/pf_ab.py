"""Scratch (not a benchmark): run from a build of prefetch_o.patch, e.g. `python pf_ab.py 0,50,100 3`."""
import os, sys, time, statistics, torch
from kangaroo_rt.generate import KangarooModel
from kangaroo_rt.models import load_tokenizer, resolve
from kangaroo_rt.config import KangarooConfig
from kangaroo_rt import bench
torch.set_num_threads(2)
r = resolve("smollm2", None)
kcfg = KangarooConfig(gamma=6, eta=0.7)
m = KangarooModel.from_pretrained(r.folder, r.adapter, exit_layer=2, dtype=torch.bfloat16, kangaroo=kcfg)
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(r.folder)
enc = lambda t: list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
qs = bench.per_category(bench.read_questions(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 3, "data", "spec_bench", "question.jsonl")), 1)
prompts = [p.ids for p in bench.build_prompts(qs, enc, "chat", int(sys.argv[2]) if len(sys.argv) > 2 else 3)]
fracs = [int(x) for x in sys.argv[1].split(",")]
ntok = 256
times = {(f, k): [] for f in fracs for k in ("plain", "kang")}
outs = {}
m.max_len = 1024
for ids in prompts[:1]:
    m.generate(ids, max_new_tokens=8); m.generate(ids, max_new_tokens=8, kangaroo=None)
for rnd in range(3):
    for pi, ids in enumerate(prompts):
        for f in fracs:
            os.environ["KR_PF_FRAC"] = str(f)
            for k, cfg in (("plain", None), ("kang", kcfg)):
                t0 = time.perf_counter()
                o = m.generate(ids, max_new_tokens=ntok, kangaroo=cfg)
                times[(f, k)].append((pi, time.perf_counter() - t0))
                outs.setdefault((pi, k), o.tolist())
                assert outs[(pi, k)] == o.tolist()
for k in ("plain", "kang"):
    base = {}
    for f in fracs:
        tot = sum(t for _, t in times[(f, k)])
        if f == fracs[0]: base_list = times[(f, k)]
        ratios = [t / b for (_, t), (_, b) in zip(times[(f, k)], base_list)]
        print(f"{k:5s} frac {f:3d}: total {tot:.2f} s, vs first {tot / sum(t for _, t in base_list):.3f}x, paired median {statistics.median(ratios):.3f}x")
