"""Trace drafts: per round the draft confidences c_1..c_g (gamma drafts, eta 0) and the accepted count.

    python draft_trace.py dev 24 512 OUT.json   (TRACE_GAMMA=10 for gamma 10; needs the sharegpt data stage)
"""
import json, sys, time, os
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "scripts"))
import torch
torch.set_num_threads(2)
import kangaroo_rt
from kangaroo_rt import speculative as sp
from kangaroo_rt.config import KangarooConfig

src = sys.argv[1]; n = int(sys.argv[2]); max_new = int(sys.argv[3]); out = sys.argv[4]
model = kangaroo_rt.load_default(name="smollm2", dtype=torch.bfloat16)
tok = kangaroo_rt.models.load_tokenizer("smollm2")
if src == "dev":
    os.environ.setdefault("SHAREGPT_WORK", os.path.join(ROOT, "runs", "sharegpt"))
    import train_smollm2_sharegpt as t
    prompts = t._dev_prompts(n)
else:
    raise SystemExit("dev only")
D = sp.Decoder
D._cpu_chain = lambda self, *a, **k: None
D._cpu_decode = lambda self, *a, **k: None
rec = {"confs": [], "acc": []}
cur = []
orig_propose = D.propose
def propose(self, hidden, sampler, active, step=0):
    tkn, conf, probs = orig_propose(self, hidden, sampler, active, step)
    cur.append(float(conf[0]))
    return tkn, conf, probs
D.propose = propose
orig_verify = D.verify
def verify(self, state, chain, k, kv_len):
    r = orig_verify(self, state, chain, k, kv_len)
    rec["confs"].append(list(cur)); rec["acc"].append(int(r[1][0])); cur.clear()
    return r
D.verify = verify
kcfg = KangarooConfig(gamma=int(os.environ.get("TRACE_GAMMA", "6")), eta=0.0)
t0 = time.time()
for i, ids in enumerate(prompts):
    model.generate(ids, max_new_tokens=max_new, eos_token_id=tok.eos_token_id, kangaroo=kcfg)
    print(i, len(rec["acc"]), f"{time.time()-t0:.0f}s", flush=True)
json.dump(rec, open(out, "w"))
