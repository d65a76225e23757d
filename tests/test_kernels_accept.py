"""kernels/accept.py (accept kernel, commit) and csrc/cpu/accept.cpp against plain-Python acceptance and the torch
reference."""
import pytest
import torch

from kernel_checks import kernel_module
from kangaroo_rt import _cpu_ext, reference

EOS = 3


def _python_round(drafts, n_drafts, target, out, n_gen, finished, pos, eos):
    """Greedy acceptance + commit, one row at a time, on Python lists (mutated in place)."""
    accepted, nxt, committed = [], [], []
    for r, (row, n, tgt) in enumerate(zip(drafts, n_drafts, target)):
        j = 0
        while j < n and row[j] == tgt[j]:
            j += 1
        accepted.append(j)
        nxt.append(tgt[j])
        committed.append(_python_commit_row(r, row[:j] + [tgt[j]], out, n_gen, finished, eos))
    return [accepted, nxt, committed]


def _python_commit_row(r, run, out, n_gen, finished, eos):
    if finished[r]:
        return 0
    done = 0
    hit = False
    for tok in run:
        out[r][n_gen[r]] = tok
        n_gen[r] += 1
        done += 1
        if tok in eos:
            hit = True
            break
    finished[r] = hit
    return done


def _python_accept_commit(drafts, n_drafts, target, out, n_gen, finished, pos, eos):
    was_active = [not f for f in finished]
    acc, nxt, com = _python_round(drafts, n_drafts, target, out, n_gen, finished, pos, eos)
    for r, on in enumerate(was_active):
        if on:
            pos[r] += acc[r] + 1
    return [acc, nxt, com]


def _state(batch, width, gen):
    out = torch.zeros(batch, width, dtype=torch.long)
    n_gen = torch.randint(0, 4, (batch,), generator=gen)
    finished = torch.rand(batch, generator=gen) < 0.2
    pos = torch.randint(5, 20, (batch,), generator=gen)
    return out, n_gen, finished, pos


def _run_all(fn, drafts, n_drafts, target, state, eos):
    out, n_gen, finished, pos = (t.clone() for t in state)
    res = fn(drafts, n_drafts, target, out, n_gen, finished, pos, eos)
    return [[t.tolist() for t in res], out[:, :-1].tolist(), n_gen.tolist(), finished.tolist(), pos.tolist()]


@pytest.fixture(params=["triton", "cpu"])
def mod(request):
    """The implementations under test: the Triton kernels (kernels/accept.py) and the CPU extension's
    (csrc/cpu/accept.cpp, commit_tokens and accept_greedy_commit: kangaroo_rt._cpu_ext's wrappers)."""
    if request.param == "triton":
        return kernel_module("accept")
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")
    return _cpu_ext


def test_accept_greedy_commit_cases(mod):
    eos = torch.tensor([EOS])
    # rows: no drafts; all accepted (bonus); EOS inside the accepted run; finished row; passes 8 tokens (the
    # ops know no token limit: the caller's finished |= n_gen >= max_new does);
    # the correction is EOS; placeholder after n_drafts.
    drafts = torch.tensor([[-1, -1, -1], [4, 5, 6], [4, EOS, 6], [4, 5, 6], [4, 5, 6], [4, 9, 9], [4, -1, -1]])
    n_drafts = torch.tensor([0, 3, 3, 3, 3, 3, 1])
    target = torch.tensor([[7, 0, 0, 0], [4, 5, 6, 8], [4, EOS, 6, 8], [4, 5, 6, 8], [4, 5, 6, 8],
                           [4, EOS, 6, 8], [4, 5, 6, 8]])
    state = (torch.zeros(7, 16, dtype=torch.long), torch.tensor([0, 1, 2, 3, 7, 0, 0]),
             torch.tensor([False, False, False, True, False, False, False]), torch.tensor([5, 6, 7, 8, 9, 10, 11]))
    got = _run_all(mod.accept_greedy_commit, drafts, n_drafts, target, state, eos)
    ref = _run_all(reference.accept_greedy_commit, drafts, n_drafts, target, state, eos)
    py_state = [t.tolist() for t in state]
    py = _python_accept_commit(drafts.tolist(), n_drafts.tolist(), target.tolist(), *py_state, [EOS])
    assert got == ref
    assert got[0] == py
    assert got[1] == [row[:-1] for row in py_state[0]] and got[2:] == py_state[1:]
    accepted, nxt, committed = got[0]
    assert accepted == [0, 3, 3, 3, 3, 1, 1]
    assert nxt == [7, 8, 8, 8, 8, EOS, 5]
    assert committed == [1, 4, 2, 0, 4, 2, 2]
    assert got[3] == [False, False, True, True, False, True, False]  # row 4 (n_gen 11) runs on


@pytest.mark.parametrize("n_eos", [0, 1, 2])
def test_accept_greedy_commit_random_against_python(n_eos, mod):
    gen = torch.Generator().manual_seed(n_eos)
    eos_ids = [EOS, 5][:n_eos]
    eos = torch.tensor(eos_ids) if eos_ids else None
    for trial in range(8):
        b, k, v = 6, [0, 1, 3, 6][trial % 4], 6
        target = torch.randint(0, v, (b, k + 1), generator=gen)
        n = torch.randint(0, k + 1, (b,), generator=gen)
        drafts = torch.where(torch.rand(b, k, generator=gen) < 0.8, target[:, :k], torch.randint(0, v, (b, k), generator=gen))
        drafts = torch.where(torch.arange(k)[None] < n[:, None], drafts, -1)
        state = _state(b, 12 + k, gen)
        got = _run_all(mod.accept_greedy_commit, drafts, n, target, state, eos)
        assert got == _run_all(reference.accept_greedy_commit, drafts, n, target, state, eos)
        py_state = [t.tolist() for t in state]
        py = _python_accept_commit(drafts.tolist(), n.tolist(), target.tolist(), *py_state, eos_ids)
        assert got[0] == py
        assert got[1] == [row[:-1] for row in py_state[0]] and got[2:] == py_state[1:]
        if hasattr(mod, "accept_greedy"):
            acc, nxt = mod.accept_greedy(drafts, n, target)
            assert [acc.tolist(), nxt.tolist()] == got[0][:2]


def test_commit_tokens_against_python(mod):
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        b, n = 5, 1 + trial
        tokens = torch.randint(0, 6, (b, n), generator=gen)
        count = torch.randint(0, n + 1, (b,), generator=gen)
        eos = torch.tensor([EOS]) if trial % 2 else None
        out, n_gen, finished, _ = _state(b, 8 + n, gen)
        py = [out.tolist(), n_gen.tolist(), finished.tolist()]
        results = []
        for fn in (mod.commit_tokens, reference.commit_tokens):
            o, g, f = out.clone(), n_gen.clone(), finished.clone()
            c = fn(o, g, f, tokens, count, eos)
            results.append((c.tolist(), o[:, :-1].tolist(), g.tolist(), f.tolist()))
        assert results[0] == results[1]
        com = [_python_commit_row(r, tokens[r, :count[r]].tolist(), py[0], py[1], py[2], [EOS] if eos is not None else [])
               for r in range(b)]
        assert results[0] == (com, [row[:-1] for row in py[0]], py[1], py[2])


def _python_accept_sampling(drafts, n_drafts, p, q, u):
    out = []
    for r in range(len(drafts)):
        j = 0
        while j < n_drafts[r] and u[r][j] * q[r][j][drafts[r][j]] < p[r][j][drafts[r][j]]:
            j += 1
        out.append(j)
    return out


def test_accept_sampling_against_python_and_reference():
    mod = kernel_module("accept")
    gen = torch.Generator().manual_seed(4)
    for k in (0, 1, 4):
        b, v = 7, 11
        p = torch.softmax(torch.randn(b, k + 1, v, generator=gen) * 2, -1)
        q = torch.softmax(torch.randn(b, k, v, generator=gen) * 2, -1)
        n = torch.randint(0, k + 1, (b,), generator=gen)
        n[0] = 0
        n[-1] = k
        drafts = torch.multinomial(q.reshape(-1, v), 1, generator=gen).reshape(b, k) if k else torch.zeros(b, 0, dtype=torch.long)
        if k:
            drafts[-1] = p[-1, :k].argmax(-1)  # likely all accepted
            q[-1] = p[-1, :k]
        drafts = torch.where(torch.arange(k)[None] < n[:, None], drafts, -1)
        u = torch.rand(b, k, generator=gen)
        acc, nxt = mod.accept_sampling(drafts, n, p, q, u, torch.Generator().manual_seed(9))
        ref_acc, ref_nxt = reference.accept_sampling(drafts, n, p, q, u, torch.Generator().manual_seed(9))
        assert acc.tolist() == ref_acc.tolist() == _python_accept_sampling(drafts.tolist(), n.tolist(), p.tolist(),
                                                                           q.tolist(), u.tolist())
        assert torch.equal(nxt, ref_nxt)  # same residual sampler, same random stream
        if k:
            assert acc[-1] == k and acc[0] == 0


def _strided(t):
    """t (B,) as a view with stride 2 into a buffer whose other elements are a sentinel."""
    buf = torch.full((2 * t.shape[0],), 99, dtype=t.dtype) if t.dtype != torch.bool else torch.ones(2 * t.shape[0],
                                                                                                      dtype=torch.bool)
    view = buf[::2]
    view.copy_(t)
    return buf, view


def test_strided_per_row_state(mod):
    """Per-row state given as strided views (a column of a (B, 2) tensor, say): the kernels index rows as
    ptr + b, so strided read-only rows are made contiguous and strided in-place rows go to the reference."""
    gen = torch.Generator().manual_seed(7)
    b, k = 5, 3
    target = torch.randint(0, 6, (b, k + 1), generator=gen)
    drafts = torch.where(torch.rand(b, k, generator=gen) < 0.7, target[:, :k], 5)
    n_drafts = torch.tensor([0, 1, 3, 3, 2])
    eos = torch.tensor([EOS])
    out, n_gen, finished, pos = _state(b, 12, gen)
    want = _run_all(reference.accept_greedy_commit, drafts, n_drafts, target, (out, n_gen, finished, pos), eos)
    bufs, views = zip(*(_strided(t) for t in (n_drafts, n_gen, finished, pos)))
    o = out.clone()
    res = mod.accept_greedy_commit(drafts, views[0], target, o, views[1], views[2], views[3], eos)
    got = [[t.tolist() for t in res], o[:, :-1].tolist(), views[1].tolist(), views[2].tolist(), views[3].tolist()]
    assert got == want
    assert all(bool((buf[1::2] == (True if buf.dtype == torch.bool else 99)).all()) for buf in bufs)  # untouched
    if hasattr(mod, "accept_greedy"):
        assert [t.tolist() for t in mod.accept_greedy(drafts, views[0], target)] == want[0][:2]

    count = torch.tensor([0, 1, 4, 2, 3])
    tokens = target
    o1, g1, f1 = out.clone(), n_gen.clone(), finished.clone()
    c1 = reference.commit_tokens(o1, g1, f1, tokens, count, eos)
    (_, count_v), (gbuf, g2), (_, f2) = _strided(count), _strided(n_gen), _strided(finished)
    o2 = out.clone()
    c2 = mod.commit_tokens(o2, g2, f2, tokens, count_v, eos)
    assert [c2.tolist(), o2[:, :-1].tolist(), g2.tolist(), f2.tolist()] == [c1.tolist(), o1[:, :-1].tolist(),
                                                                           g1.tolist(), f1.tolist()]
    assert bool((gbuf[1::2] == 99).all())


def test_cpu_accept_ops_dispatch_and_refuse_bad_inputs():
    """On CPU tensors the round's commit ops go to the CPU extension when it is built; its bindings name what is
    wrong with an input the wrappers would have sent to the reference."""
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")
    from kangaroo_rt import ops

    table = ops.backend_table("cpu")
    assert table["accept_greedy_commit"] == "cpu" and table["commit_tokens"] == "cpu"
    cpu = _cpu_ext.load()
    drafts, n = torch.tensor([[4, 5]]), torch.tensor([2])
    target = torch.tensor([[4, 5, 6]])
    out, n_gen, finished, pos = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, dtype=torch.long), \
        torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="target_tokens must be"):
        cpu.accept_greedy_commit(drafts, n, target[:, :2], out, n_gen, finished, pos, None)
    with pytest.raises(ValueError, match="finished must be"):
        cpu.accept_greedy_commit(drafts, n, target, out, n_gen, finished.long(), pos, None)
    with pytest.raises(ValueError, match="tokens must be"):
        cpu.commit_tokens(out, n_gen, finished, drafts.float(), n, None)
    eos = torch.tensor([2.0])  # float ids: the wrapper sends them to the reference, which compares by value
    assert _cpu_ext.commit_tokens(out.clone(), n_gen.clone(), finished.clone(), torch.tensor([[5, 2, 7]]),
                                  torch.tensor([3]), eos).tolist() == [2]
    accepted, nxt, committed = cpu.accept_greedy_commit(drafts, n, target, out, n_gen, finished, pos, None)
    assert (accepted.item(), nxt.item(), committed.item()) == (2, 6, 3)
    assert out[0, :3].tolist() == [4, 5, 6] and n_gen.item() == 3 and pos.item() == 3
