"""The phase time accounting of the CPU extension's one-call regions (csrc/cpu/phase_stats.cpp,
``_cpu_ext.phase_times``): every op of every layer counted under its kind, once per thread that ran it, with the
parts of the model and the row counts told apart; nothing counted while it is off; the tokens the same either way."""
import copy

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import _cpu_ext
from kangaroo_rt.testing import agreeing_pair, tiny_config

OPS = ("input_norm", "qkv", "rope", "attention", "o", "post_norm", "gate_up", "silu", "down")
# The ops with a phase of their own in a layer whose gate/up takes silu along (intermediate a multiple of 16): the
# norms run inside the linears' phases after them, silu inside gate/up's.
PHASED = ("qkv", "rope", "attention", "o", "gate_up", "down")
LAYERS, EXIT = 4, 2


@pytest.fixture(scope="module", autouse=True)
def built():
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(num_layers=LAYERS, vocab_size=97)
    target, adapter = agreeing_pair(cfg, exit_layer=EXIT, seed=0, deep_scale=0.1, head_scale=4.0)
    return K.KangarooModel(target, adapter, exit_layer=EXIT, max_len=128)


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decode(model, new_tokens, kangaroo):
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, kangaroo=kangaroo,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), out.stats


def _timed(model, new_tokens, kangaroo):
    with _cpu_ext.phase_times() as times:
        tokens, stats = _decode(model, new_tokens, kangaroo)
    return times, tokens, stats


def test_kinds_are_named_in_the_documented_order():
    """kr_cpu.h: kind (part * 2 + rows) * KR_CPU_PHASE_OPS + op, then the extras."""
    names = _cpu_ext.load().phase_kinds()
    expected = [f"{part}.{op}{rows}" for part in ("layers", "shallow", "adapter") for rows in ("", "[n]")
                for op in OPS] + ["head", "draft_head", "screen", "other"]
    assert names == expected


def test_plain_steps_count_every_op_of_every_layer_once(model, one_thread):
    short, _, _ = _timed(model, 4, None)
    long, _, _ = _timed(model, 10, None)
    for op in PHASED:  # six more steps, one row each: each phase of each layer six more times
        assert long[f"layers.{op}"][2] - short[f"layers.{op}"][2] == 6 * LAYERS, op
    assert not any(f"layers.{op}" in long for op in set(OPS) - set(PHASED))
    for kind, (body, wait, phases) in long.items():
        assert body >= 0 and wait >= 0 and phases > 0, kind
    assert long["layers.gate_up"][0] > 0
    assert not any(k.startswith(("shallow.", "adapter.")) or k == "draft_head" for k in long)


def test_kangaroo_rounds_name_the_shallow_layers_the_adapter_and_the_verification(model, one_thread):
    kcfg = K.KangarooConfig(gamma=4, eta=0.0)
    prefill, _, _ = _timed(model, 1, kcfg)  # the prompt's layers and adapter (decoder_layers calls count as layers)
    times, _, stats = _timed(model, 24, kcfg)
    rounds = sum(stats.rounds)
    assert rounds > 0

    def phases(kind):
        return times.get(kind, (0, 0, 0))[2] - prefill.get(kind, (0, 0, 0))[2]

    # every round drafts with the shallow layers (exit layer 2: layers 0-1 of the target), one row at a time
    assert phases("shallow.qkv") % EXIT == 0 and phases("shallow.qkv") >= EXIT * rounds
    assert phases("shallow.qkv[n]") == 0
    assert phases("draft_head") > 0 and phases("adapter.qkv") + phases("adapter.qkv[n]") > 0
    assert phases("adapter.gate_up") == phases("adapter.gate_up[n]") == 0  # an attention-only layer
    # verification runs the deep layers (2-3) over the round's tokens, then the screened head
    verify = phases("layers.qkv[n]") + phases("layers.qkv")
    assert phases("layers.qkv[n]") > 0 and verify == (LAYERS - EXIT) * rounds
    assert phases("screen") > 0 and phases("head") == 0


def test_a_deep_copied_adapter_still_drafts_in_one_call(model, one_thread):
    """A deep copy of the adapter (kangaroo-rt bench --draft-vocab makes one per size) fuses again, so its rounds
    keep the one-call draft chain (shallow layers and draft head as phases) rather than drafting op by op."""
    kcfg = K.KangarooConfig(gamma=4, eta=0.0)
    copied = K.KangarooModel(model.target, copy.deepcopy(model.adapter), exit_layer=EXIT, max_len=128)
    times, tokens, _ = _timed(copied, 12, kcfg)
    assert times.get("shallow.qkv", (0, 0, 0))[2] > 0 and "draft_head" in times
    assert tokens == _decode(model, 12, kcfg)[0]


def test_two_threads_each_count_a_phase(model):
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = _timed(model, 8, None)
        torch.set_num_threads(2)
        two, _, _ = _timed(model, 8, None)
    finally:
        torch.set_num_threads(threads)
    assert two["layers.qkv"][2] == 2 * one["layers.qkv"][2]


def test_off_counts_nothing_and_the_tokens_do_not_change(model):
    cpu = _cpu_ext.load()
    assert cpu.phase_stats_enable(False) is False
    cpu.phase_stats(reset=True)
    kcfg = K.KangarooConfig(gamma=4, eta=0.3)
    plain_off, _ = _decode(model, 16, None)
    kang_off, _ = _decode(model, 16, kcfg)
    assert cpu.phase_stats() == {}
    times, plain_on, _ = _timed(model, 16, None)
    _, kang_on, _ = _timed(model, 16, kcfg)
    assert times and plain_on == plain_off and kang_on == kang_off == plain_off
    assert cpu.phase_stats_enable(False) is False  # phase_times put the setting back


def test_reset_zeroes_and_reading_with_reset_returns_the_totals(model):
    cpu = _cpu_ext.load()
    was = cpu.phase_stats_enable(True)
    try:
        cpu.phase_stats(reset=True)
        _decode(model, 6, None)
        first = cpu.phase_stats(reset=True)
        assert first["layers.qkv"][2] > 0
        assert cpu.phase_stats() == {}
    finally:
        cpu.phase_stats_enable(was)
