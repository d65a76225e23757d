"""kangaroo_rt.hugepages: moving a model's CPU weights into one mapping advised for 2 MB pages keeps every value,
every view relation (fused q/k/v and gate/up, the tied head) and every generated token; loads place weights
above the size threshold, and KANGAROO_RT_HUGEPAGES=0 turns it off."""
import gc
import os

import pytest
import torch

from kangaroo_rt import KangarooConfig, KangarooModel, huge_mapping, hugepages
from kangaroo_rt.loading import load_model, save_model
from kangaroo_rt.testing import agreeing_pair, tiny_config

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages to advise here")


def _pair(tie: bool = False):
    config = tiny_config(vocab_size=211, hidden_size=128, num_layers=4, intermediate_size=256,
                         tie_word_embeddings=tie)
    return agreeing_pair(config, exit_layer=1, seed=3)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@needs_thp
@pytest.mark.parametrize("tie", [False, True])
def test_place_keeps_values_views_and_tokens(tie):
    target, adapter = _pair(tie)
    model = KangarooModel(target, adapter, exit_layer=1, kangaroo=KangarooConfig(gamma=4, eta=0.3))
    ids = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=24)
        want_plain = model.generate(ids, max_new_tokens=24, kangaroo=None)
    before = _state(target)
    old = {name: p.data_ptr() for name, p in target.named_parameters()}
    moved = hugepages.place(target, min_bytes=0)
    assert moved >= sum(p.numel() * p.element_size() for p in target.parameters())
    after = _state(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.data_ptr() != old[name] for name, p in target.named_parameters())  # every weight moved
    ptrs = sorted(p.data_ptr() for p in target.parameters())
    assert ptrs[-1] - ptrs[0] < moved  # ... into one mapping
    attn, mlp = target.layers[0].self_attn, target.layers[0].mlp
    with torch.no_grad():
        assert attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))  # still views of the fused rows
        assert mlp.gate_up.serves((mlp.gate_proj, mlp.up_proj))
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    if tie:
        assert target.lm_head.weight is target.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=24), want)
        assert torch.equal(model.generate(ids, max_new_tokens=24, kangaroo=None), want_plain)
    assert torch.equal(want, want_plain)


@needs_thp
def test_loading_places_big_models_and_the_switch_turns_it_off(tmp_path, monkeypatch):
    target, _ = _pair()
    save_model(target, tmp_path / "m")
    size = sum(p.numel() * p.element_size() for p in target.parameters())
    monkeypatch.setattr(hugepages, "MIN_BYTES", size // 2)  # this tiny model counts as big
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    ptrs = [p.data_ptr() for p in loaded.parameters()]
    base = min(ptrs)
    assert max(ptrs) - base < 2 * size and base % 64 == 0
    monkeypatch.setenv("KANGAROO_RT_HUGEPAGES", "0")
    assert not hugepages.available()
    assert hugepages.place(loaded, min_bytes=0) == 0
    assert [p.data_ptr() for p in loaded.parameters()] == ptrs


def test_small_models_and_other_devices_are_left_alone():
    target, _ = _pair()
    ptrs = [p.data_ptr() for p in target.parameters()]
    assert hugepages.place(target) == 0  # under MIN_BYTES
    assert [p.data_ptr() for p in target.parameters()] == ptrs
    meta = torch.nn.Linear(4, 4, device="meta")
    assert hugepages.place(meta, min_bytes=0) == 0


def test_huge_page_bytes_reads_this_process():
    got = hugepages.huge_page_bytes()
    assert got == -1 or got >= 0
    if os.path.exists("/proc/self/smaps_rollup"):
        assert got >= 0


@needs_thp
def test_copy_puts_tensors_in_one_mapping_and_keeps_their_values():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randint(-127, 128, (300, 64), generator=gen, dtype=torch.int8),
               torch.randn(300, generator=gen).requires_grad_(),
               torch.randint(0, 9, (300,), generator=gen, dtype=torch.int32)]
    got = hugepages.copy(tensors, min_bytes=0)
    assert [t.dtype for t in got] == [t.dtype for t in tensors] and [t.shape for t in got] == [t.shape for t in tensors]
    assert all(torch.equal(a.detach(), b.detach()) and a.is_contiguous() for a, b in zip(got, tensors))
    assert got[0].data_ptr() % hugepages.HUGE_PAGE == 0 and all(t.data_ptr() % 64 == 0 for t in got)
    assert got[-1].data_ptr() - got[0].data_ptr() < hugepages.HUGE_PAGE  # one mapping, in order
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(got, tensors))
    assert all(a is b for a, b in zip(hugepages.copy(tensors), tensors))  # under MIN_BYTES: the tensors themselves
    want = [t.detach().clone() for t in tensors]
    got_grad_fn = got[1].grad_fn
    del tensors
    last = got[-1]
    del got
    gc.collect()  # the mapping lives while a copy does
    assert torch.equal(last, want[-1])
    assert got_grad_fn is None  # plain copies, outside autograd


@needs_thp
def test_the_screened_head_is_kept_in_huge_pages(monkeypatch):
    from kangaroo_rt import _cpu_ext

    head = torch.nn.Linear(64, 300, bias=False)
    monkeypatch.delenv(_cpu_ext.SCREEN_ENV, raising=False)
    monkeypatch.setattr(huge_mapping, "MIN_BYTES", 1)
    screen = _cpu_ext.head_screen(head)
    assert screen is not None and screen[0].data_ptr() % hugepages.HUGE_PAGE == 0
    want = _cpu_ext.make_head_screen(head.weight.detach())
    assert all(torch.equal(a, b) for a, b in zip(screen, want))
    assert _cpu_ext.head_screen(head) is screen  # made once
    monkeypatch.setenv("KANGAROO_RT_HUGEPAGES", "0")
    assert all(a is b for a, b in zip(hugepages.copy(want, min_bytes=0), want))  # switched off: left alone


@needs_thp
def test_the_kv_cache_takes_huge_pages_from_one_page_on(monkeypatch):
    """A CPU cache of HUGE_PAGE bytes or more: keys and values zeroed in one 2 MB-aligned mapping, shapes, dtypes and
    strides as torch.zeros gives, the two apart (writes to one never show in the other); smaller ones, other
    devices, huge_pages=False and KANGAROO_RT_HUGEPAGES=0 get torch's tensors; huge_pages=True places any size."""
    from kangaroo_rt import StaticKVCache

    def is_huge(cache):  # k on a 2 MB boundary and v right after it, on the next cache line
        at = cache.k.data_ptr()
        return at % hugepages.HUGE_PAGE == 0 and cache.v.data_ptr() == at + (cache.k.nbytes + 63) // 64 * 64

    monkeypatch.delenv("KANGAROO_RT_HUGEPAGES", raising=False)
    shape = (4, 2, 3, 700, 64)  # k + v: 2.15 MB of bf16
    big = StaticKVCache(*shape[:3], shape[3], shape[4], dtype=torch.bfloat16)
    plain = torch.zeros(shape, dtype=torch.bfloat16)
    for t in (big.k, big.v):
        assert t.shape == plain.shape and t.dtype == plain.dtype and t.stride() == plain.stride()
        assert torch.equal(t, plain) and t.data_ptr() % 64 == 0
    big.k.fill_(1.5)
    assert is_huge(big)  # one mapping: v right after k
    assert torch.equal(big.v, plain) and bool((big.k == 1.5).all())
    k0, v0 = big.layer(0)
    k0[0, 0, 5] = 2.0
    assert big.k[0, 0, 0, 5].eq(2.0).all() and big.rows(1, 2).k.shape == (4, 1, 3, 700, 64)

    small = StaticKVCache(2, 1, 3, 64, 64, dtype=torch.bfloat16)  # 98 KB
    assert torch.equal(small.k, torch.zeros_like(small.k)) and not is_huge(small)
    forced = StaticKVCache(2, 1, 3, 64, 64, dtype=torch.float32, huge_pages=True)
    assert is_huge(forced) and torch.equal(forced.v, torch.zeros_like(forced.v))
    assert not is_huge(StaticKVCache(*shape[:3], shape[3], shape[4], dtype=torch.bfloat16, huge_pages=False))
    assert StaticKVCache(*shape[:3], shape[3], shape[4], device="meta", huge_pages=True).k.device.type == "meta"
    monkeypatch.setenv("KANGAROO_RT_HUGEPAGES", "0")
    assert not is_huge(StaticKVCache(*shape[:3], shape[3], shape[4], dtype=torch.bfloat16))
    assert not is_huge(StaticKVCache(2, 1, 3, 64, 64, huge_pages=True))  # switched off: even when asked


def test_a_model_makes_its_cache_with_the_pages_asked_for():
    """Transformer.new_cache passes huge_pages on (None: the cache's own rule)."""
    target, _ = _pair()
    cache = target.new_cache(1, 16, huge_pages=False)
    assert cache.shape == (target.config.num_hidden_layers, 1, target.config.num_key_value_heads, 16,
                           target.config.head_dim)
    if hugepages.available():
        assert target.new_cache(1, 16, huge_pages=True).k.data_ptr() % hugepages.HUGE_PAGE == 0
