"""Row-count invariance of the CPU decode path: a verify pass over k+1 tokens gives, bit for bit, the logits of
k+1 single steps, in fp32 and bf16, so Kangaroo equals plain decoding exactly in every dtype (issue 28).

It needs the CPU extension's linear kernel (torch's CPU GEMM rounds a row differently with the row count) and
attention that runs one query at a time on CPU (kangaroo_rt.reference.attention)."""
import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import _cpu_ext, ops
from kangaroo_rt.model import Transformer
from kangaroo_rt.testing import agreeing_pair, tiny_config

pytestmark = pytest.mark.skipif(not _cpu_ext.is_built(), reason="the CPU extension kangaroo_rt._cpu is not built")

# SmolLM2's layer shapes (hidden 576, 9 query / 3 KV heads of 64, MLP 1536), fewer layers and a smaller vocabulary.
SMOL = dict(hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=2048)


def _logits(model, ids, prompt, split, batch_rows=None):
    """Prefill ``prompt`` tokens, then the rest one token at a time (split) or in one pass over more key slots
    than it needs -> (B, n, V)."""
    b, n = ids.shape
    cache = model.new_cache(b, n + 4)
    model(ids[:, :prompt], torch.arange(prompt).expand(b, prompt), cache, kv_len=n + 4)
    if split:
        return torch.cat([model(ids[:, t:t + 1], torch.full((b, 1), t), cache, kv_len=t + 1)  # as the decoder
                          for t in range(prompt, n)], dim=1)
    return model(ids[:, prompt:], torch.arange(prompt, n).expand(b, n - prompt), cache, kv_len=n + 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@torch.no_grad()
def test_verify_logits_equal_single_steps_bit_for_bit(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = Transformer.random(tiny_config(num_layers=3, **SMOL), seed=0, dtype=dtype)
        ids = torch.randint(0, SMOL["vocab_size"], (1, 14), generator=torch.Generator().manual_seed(1))
        for k1 in (2, 5, 7):  # k+1 tokens in one verify pass
            single = _logits(model, ids[:, :7 + k1], 7, split=True)
            verify = _logits(model, ids[:, :7 + k1], 7, split=False)
            assert torch.equal(single, verify), (dtype, k1, (single.float() - verify.float()).abs().max())
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def test_the_linear_op_of_the_model_is_the_cpu_kernel():
    assert ops.backend_table("cpu")["linear"] == "cpu"


@torch.no_grad()
def test_without_the_invariant_kernel_verify_and_single_steps_part(monkeypatch):
    """The test above can fail: with torch's linear (the torch backend forced) a verify row rounds differently."""
    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0)
    ids = torch.randint(0, SMOL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    single = _logits(model, ids, 7, split=True)
    verify = _logits(model, ids, 7, split=False)
    assert not torch.equal(single, verify)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kangaroo_equals_plain_in_bf16_too(dtype):
    cfg = tiny_config(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      vocab_size=97)
    target, adapter = agreeing_pair(cfg, 2)
    model = K.KangarooModel(target.to(dtype), adapter.to(dtype), exit_layer=2)
    ids = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(3))
    for gamma in (1, 3, 6):
        plain = model.generate(ids, max_new_tokens=24, kangaroo=None, ignore_eos=True)
        spec = model.generate(ids, max_new_tokens=24, kangaroo=K.KangarooConfig(gamma=gamma, eta=0.0),
                              ignore_eos=True)
        assert torch.equal(plain, spec), (dtype, gamma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_verify_reading_more_key_slots_than_a_single_step_gives_its_bits(dtype):
    """The decoder's verify reads the slots of its last query (kv_len = p + k + 1) while the single step at p reads
    p + 1: the extra, masked slots must not change the first queries' bits (the fused CPU kernel blocks over
    the slots it is given)."""
    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0, dtype=dtype)
    ids = torch.randint(0, SMOL["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(1, 96)
    model(ids[:, :70], torch.arange(70)[None], cache, kv_len=70)
    single = torch.cat([model(ids[:, t:t + 1], torch.tensor([[t]]), cache, kv_len=t + 1) for t in range(70, 76)], 1)
    verify = model(ids[:, 70:76], torch.arange(70, 76)[None], cache, kv_len=96)
    assert torch.equal(single, verify)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_bias", [False, True])
@torch.no_grad()
def test_the_one_call_layer_stack_gives_the_bits_of_the_per_op_path(dtype, qkv_bias, monkeypatch):
    """forward_layers runs a whole layer range in one extension call (_cpu_ext.decoder_layers) where every op would
    go to the extension; hidden states, logits and the caches it writes equal the per-op path's bit for bit, for
    decode steps (1 query) and verify passes (several), rows at different positions, and a partial layer range."""
    model = Transformer.random(tiny_config(num_layers=3, model_type="qwen2" if qkv_bias else "llama", **SMOL),
                               seed=0, dtype=dtype)
    assert (model.layers[0].self_attn.q_proj.bias is not None) == qkv_bias
    calls = []
    real, stack = _cpu_ext.decoder_layers, Transformer._cpu_stack
    monkeypatch.setattr(_cpu_ext, "decoder_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SMOL["vocab_size"], (2, 12), generator=gen)

    def run(per_op: bool):
        monkeypatch.setattr(Transformer, "_cpu_stack", (lambda *a: None) if per_op else stack)
        cache = model.new_cache(2, 24)
        out = [model(ids[:, :6], torch.arange(6).expand(2, 6), cache, kv_len=24)]  # a short prefill
        for t in range(6, 8):  # decode steps, the rows one position apart
            pos = torch.tensor([[t], [t + 1]])
            out.append(model(ids[:, t:t + 1], pos, cache, kv_len=t + 2))
        pos = torch.tensor([[8, 9, 10], [9, 10, 11]])  # a verify pass over three tokens
        h = model.forward_layers(model.embed(ids[:, 8:11]), pos, 0, 1, cache, kv_len=12)  # draft layers only
        out += [h, model.head(model.forward_layers(h, pos, 1, 3, cache, kv_len=12))]
        return out, [t.clone() for i in range(3) for t in cache.layer(i)]

    calls.clear()
    fast, fast_cache = run(per_op=False)
    assert len(calls) == 5, "the stack was not used for the prefill, decode and verify steps"
    calls.clear()
    slow, slow_cache = run(per_op=True)
    assert not calls
    for a, b in zip(fast + fast_cache, slow + slow_cache):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_adapter_in_one_call_gives_the_bits_of_its_per_op_path(dtype, monkeypatch):
    """The paper's adapter runs as one attention-only layer of _cpu_ext.decoder_layers (its output normed); its
    output and the cache it writes equal the per-op path's bit for bit: a two-position catch-up over rows at
    different positions, then draft steps. The MLP variant, and a model moved by .to(), keep working (per op or
    fused again)."""
    from kangaroo_rt.adapter import Adapter

    config = tiny_config(num_layers=2, **SMOL)
    target = Transformer.random(config, seed=0, dtype=dtype)
    calls = []
    real = _cpu_ext.decoder_layers
    monkeypatch.setattr(_cpu_ext, "decoder_layers", lambda *a, **k: calls.append(len(a[4])) or real(*a, **k))

    def run(adapter, per_op: bool):
        monkeypatch.setattr(Adapter, "_cpu_layer", (lambda *a: None) if per_op else real_layer)
        cache = adapter.new_cache(2, 16)
        outs = []
        for pos in (torch.tensor([[3, 4], [6, 7]]), torch.tensor([[5], [8]]), torch.tensor([[6], [9]])):
            h = torch.randn(2, pos.shape[1], SMOL["hidden_size"], generator=torch.Generator().manual_seed(
                int(pos[0, 0]))).to(dtype)
            outs.append(adapter(h, pos, *target.rope(pos), cache, kv_len=int(pos.max()) + 1))
        return outs + [cache.k.clone(), cache.v.clone()]

    real_layer = Adapter._cpu_layer
    paper = Adapter.random(config, seed=2, dtype=dtype)
    assert paper.layers[0].self_attn.qkv is not None and paper.layers[0].self_attn.qkv.serves(
        (paper.layers[0].self_attn.q_proj, paper.layers[0].self_attn.k_proj, paper.layers[0].self_attn.v_proj))
    calls.clear()
    fast = run(paper, per_op=False)
    assert calls == [6, 6, 6], "the adapter did not run in one call"
    calls.clear()
    slow = run(paper, per_op=True)
    assert not calls
    for a, b in zip(fast, slow):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    moved = paper.float().to(dtype)  # new memory: fused again
    assert moved.layers[0].self_attn.qkv.serves((moved.layers[0].self_attn.q_proj, moved.layers[0].self_attn.k_proj,
                                                 moved.layers[0].self_attn.v_proj))
    calls.clear()
    mlp = Adapter.random(config, seed=1, dtype=dtype, mlp=True)
    run(mlp, per_op=False)
    assert not calls  # the MLP variant: per op


@torch.no_grad()
def test_the_layer_stack_steps_aside_where_an_op_would_not_use_the_extension(monkeypatch):
    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0)
    h = torch.randn(1, 1, SMOL["hidden_size"])
    pos = torch.zeros(1, 1, dtype=torch.long)
    assert model._cpu_stack(h, pos, 0, 2) is not None
    assert model._cpu_stack(h, pos, 1, 1) is None  # an empty range
    assert model._cpu_stack(torch.randn(1, 65, SMOL["hidden_size"]), pos, 0, 2) is None  # prefill: SDPA serves
    assert model._cpu_stack(h.double(), pos, 0, 2) is None
    with torch.enable_grad():
        assert model._cpu_stack(h, pos, 0, 2) is None
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    assert model._cpu_stack(h, pos, 0, 2) is None
    monkeypatch.delenv("KANGAROO_RT_BACKEND")
    model.layers[1].mlp.gate_proj.weight = torch.nn.Parameter(model.layers[1].mlp.gate_proj.weight.clone())
    assert model._cpu_stack(h, pos, 0, 2) is None  # gate/up no longer fused: per op, one call per layer
    assert model._cpu_stack(h, pos, 0, 1) is not None
    before = model._cpu_stack(h, pos, 0, 1)
    old = model.layers[0].self_attn.o_proj
    model.layers[0].self_attn.o_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    after = model._cpu_stack(h, pos, 0, 1)  # a replaced module is seen: its new weight is what the stack calls
    assert after is not None and after[0][2] is model.layers[0].self_attn.o_proj.weight
    assert before[0][2] is old.weight


@torch.no_grad()
def test_the_adapter_call_plan_follows_its_modules():
    """Adapter._cpu_layer keeps its weight list while nothing it comes from changed, and sees every change."""
    from kangaroo_rt.adapter import Adapter

    config = tiny_config(num_layers=2, **SMOL)
    adapter = Adapter.random(config, seed=0)
    h = torch.randn(1, 1, SMOL["hidden_size"])
    pos = torch.zeros(1, 1, dtype=torch.long)
    first = adapter._cpu_layer(h, pos)
    assert first is not None and adapter._cpu_layer(h, pos) is first  # kept
    attn = adapter.layers[0].self_attn
    old = attn.o_proj
    attn.o_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)  # a replaced module
    replaced = adapter._cpu_layer(h, pos)
    assert replaced is not first and replaced[0][2] is attn.o_proj.weight and replaced[1] is False  # fp32: row-major
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.clone())  # q/k/v no longer fused: per op
    assert adapter._cpu_layer(h, pos) is None
    attn.fuse()
    assert adapter._cpu_layer(h, pos) is not None
    adapter.norm.eps = adapter.norm.eps * 2  # another epsilon than the input norm's: per op
    assert adapter._cpu_layer(h, pos) is None
    adapter.norm.eps = adapter.layers[0].input_layernorm.eps
    assert adapter._cpu_layer(h, pos) is not None
    eps = adapter.config.rms_norm_eps
    adapter.config.rms_norm_eps = eps * 2  # the config edited in place: the call would pass another epsilon
    assert adapter._cpu_layer(h, pos) is None
    adapter.config.rms_norm_eps = eps
    assert adapter._cpu_layer(h, pos) is not None
    with torch.enable_grad():
        assert adapter._cpu_layer(h, pos) is None
    moved = adapter.to(torch.bfloat16)  # new memory, fused again
    entry = moved._cpu_layer(h.bfloat16(), pos)  # bf16: the matrices' packed copies
    qkv = moved.layers[0].self_attn.qkv.weight
    assert entry is not None and entry[1] is True
    assert torch.equal(entry[0][1].view(torch.int16), _cpu_ext.pack_rows_bf16(qkv).view(torch.int16))
    assert entry[0][0] is moved.layers[0].input_layernorm.weight  # norms as they are


@torch.no_grad()
@pytest.mark.parametrize("change", ["param_copy", "load_state_dict", "fused_in_place"])
def test_packed_copies_follow_in_place_changes(change):
    """A bf16 stack streams packed copies of its matrices (_cpu_ext.packed_bf16): an in-place change of a weight
    (a parameter that is a view of a fused projection keeps a version counter of its own) must reach them, so that
    the one-call stack keeps the per-op path's bits after it."""
    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0, dtype=torch.bfloat16)
    h = torch.randn(1, 1, SMOL["hidden_size"]).bfloat16()
    pos = torch.zeros(1, 1, dtype=torch.long)
    cache = model.new_cache(1, 4)
    model.forward_layers(h, pos, 0, 2, cache, 1)  # packs
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    new = torch.randn(attn.k_proj.weight.shape).bfloat16()
    if change == "param_copy":
        attn.k_proj.weight.copy_(new)
    elif change == "load_state_dict":
        attn.k_proj.load_state_dict({"weight": new} | ({"bias": attn.k_proj.bias} if attn.k_proj.bias is not None else {}))
    else:
        mlp.gate_up.weight.mul_(2)  # the fused tensor itself
        new = attn.k_proj.weight.clone()
    assert torch.equal(attn.k_proj.weight, new)
    one_call = model.forward_layers(h, pos, 0, 2, cache, 1)
    real = Transformer._cpu_stack
    try:
        Transformer._cpu_stack = lambda *a: None
        per_op = model.forward_layers(h, pos, 0, 2, cache, 1)
    finally:
        Transformer._cpu_stack = real
    assert torch.equal(one_call, per_op)


@torch.no_grad()
def test_steady_checks_a_call_plan_once_per_scope():
    """Inside model.steady() (a decode call, an engine step) a layer stack's plan is checked at its first use only;
    a change made inside the scope is seen by the next scope, and outside scopes at once."""
    from kangaroo_rt.model import steady

    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0)
    h = torch.randn(1, 1, SMOL["hidden_size"])
    pos = torch.zeros(1, 1, dtype=torch.long)
    attn = model.layers[0].self_attn

    def new_o_proj():
        attn.o_proj = torch.nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
        return attn.o_proj.weight

    first = model._cpu_stack(h, pos, 0, 1)
    with steady():
        assert model._cpu_stack(h, pos, 0, 1) is first  # checked at its first use in the scope
        new_o_proj()
        assert model._cpu_stack(h, pos, 0, 1) is first  # not checked again
    weight = new_o_proj()
    assert model._cpu_stack(h, pos, 0, 1)[0][2] is weight  # outside a scope: every call checks
    with steady():
        weight = new_o_proj()
        assert model._cpu_stack(h, pos, 0, 1)[0][2] is weight  # a new scope checks again


@torch.no_grad()
def test_pack_for_cpu_makes_the_copies_a_decode_step_streams():
    """Transformer.pack_for_cpu (load_model calls it) packs every matrix and the head up front: a decode step after it
    streams those copies and makes no new one, and an fp32 model gets none."""
    model = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0, dtype=torch.bfloat16)
    matrices = [w for layer in model.layers for w in (layer.self_attn.qkv.weight, layer.self_attn.o_proj.weight,
                                                       layer.mlp.gate_up.weight, layer.mlp.down_proj.weight)]
    matrices.append(model.lm_head.weight)
    assert not any(id(w) in _cpu_ext._packed for w in matrices)
    assert model.pack_for_cpu() is model
    copies = [_cpu_ext._packed[id(w)][2] for w in matrices]
    model(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), model.new_cache(1, 4), 1)
    assert all(_cpu_ext._packed[id(w)][2] is c for w, c in zip(matrices, copies))
    stack = model._cpu_stack(torch.zeros(1, 1, SMOL["hidden_size"]).bfloat16(), torch.zeros(1, 1, dtype=torch.long), 0, 2)
    assert stack[3] is True and stack[0][1] is copies[0] and stack[0][5] is copies[3]
    fp32 = Transformer.random(tiny_config(num_layers=2, **SMOL), seed=0)
    assert fp32.pack_for_cpu() is fp32 and id(fp32.layers[0].self_attn.qkv.weight) not in _cpu_ext._packed


@torch.no_grad()
def test_a_fused_projection_called_per_op_follows_its_views_changed_in_place():
    """The per-op path reads a fused projection through the packed copy of its fused tensor: a view (a layer's weight)
    changed in place keeps a version counter of its own, so FusedRows.serves moves the fused tensor's version on and
    the copy is made again; the result stays that of the row-major weight as it is now."""
    from kangaroo_rt.model import _fused_call

    model = Transformer.random(tiny_config(num_layers=1, **SMOL), seed=0, dtype=torch.bfloat16)
    attn = model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(3, SMOL["hidden_size"]).bfloat16()
    before = torch.cat(_fused_call(attn.qkv, layers, x), dim=-1)  # (packs the fused tensor)
    attn.k_proj.weight.copy_(torch.randn(attn.k_proj.weight.shape).bfloat16())
    after = torch.cat(_fused_call(attn.qkv, layers, x), dim=-1)
    want = _cpu_ext.load().linear(x, attn.qkv.weight, attn.qkv.bias)  # row-major: packed by the call, as it is now
    assert not torch.equal(before, after) and torch.equal(after, want)
