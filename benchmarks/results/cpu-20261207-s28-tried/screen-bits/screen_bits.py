"""Scratch (not a benchmark; run from the repository root): how many head rows the screen would have to compute
exactly if W were quantized to fewer bits (a scale a row, the Cauchy-Schwarz bound of csrc/cpu/head_screen.cpp), on
SmolLM2's real final hidden states (4 held-out prompts, their prompts and 64 greedy tokens)."""
import torch, math
from kangaroo_rt.models import load_named
from kangaroo_rt import bench
torch.manual_seed(0)
m = load_named("smollm2", dtype=torch.bfloat16)
t = m.target if hasattr(m, "target") else m
W = t.lm_head.weight.float()  # (V, K)
V, K = W.shape
print("head", V, K)
# hidden states: run a prompt + greedy continuation through the torch path, collect normed states before the head
from transformers import AutoTokenizer
from kangaroo_rt.models import resolve
tok = AutoTokenizer.from_pretrained(resolve("smollm2").folder)
qs = bench.per_category(bench.read_questions("benchmarks/data/spec_bench/question.jsonl"), 1)[:4]
states = []
for q in qs:
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    out = m.generate(ids, max_new_tokens=64, kangaroo=None)
    full = out  # (1, T)
    T = full.shape[1]
    cache = t.new_cache(1, T + 4)
    pos = torch.arange(T)[None]
    h = t.forward_layers(t.embed(full), pos, 0, t.num_layers, cache, kv_len=T)
    xn = t.norm(h)[0, ids.shape[1] - 1:]  # the decode positions' states
    states.append(xn.float())
X = torch.cat(states)  # (n, K)
print("states", X.shape)
logits = X.double() @ W.double().T
def count(bits):
    qmax = 2 ** (bits - 1) - 1
    s = W.abs().amax(1, keepdim=True) / qmax
    Wh = (W / s).round().clamp(-qmax - 1, qmax) * s
    err = (W - Wh).double().norm(dim=1)  # (V,)
    a = X.double() @ Wh.double().T  # estimate (x exact here)
    R = X.double().norm(dim=1, keepdim=True) * err[None]  # Cauchy-Schwarz W term
    R = R + 1e-6 * X.double().norm(dim=1, keepdim=True) * W.double().norm(dim=1)[None]
    lo = (a - R).max(1, keepdim=True).values
    cand = (a + R >= lo).sum(1)
    return cand.float()
for bits in (8, 6, 5, 4):
    c = count(bits)
    print(f"int{bits}: candidates median {c.median().item():.0f} mean {c.mean().item():.1f} p90 {c.quantile(0.9).item():.0f} max {c.max().item():.0f}")
