"""The decode path on a CUDA GPU: exact in fp32, well-formed and seeded in half precision."""
import pytest
import torch

import kangaroo_rt as K
from checks import assert_same_tokens
from kangaroo_rt.testing import agreeing_pair, tiny_config

pytestmark = pytest.mark.gpu


def _pair(dtype):
    cfg = tiny_config(vocab_size=512, hidden_size=128, num_layers=6, num_heads=2, num_kv_heads=1, intermediate_size=256)
    target, adapter = agreeing_pair(cfg, 2)
    return K.KangarooModel(target.to("cuda", dtype), adapter.to("cuda", dtype), exit_layer=2)


def test_greedy_lossless_fp32_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _pair(torch.float32)
    ids = torch.randint(0, 512, (3, 9), device="cuda")
    plain = model.generate(ids, max_new_tokens=32, kangaroo=None)
    for gamma, eta in ((1, 0.0), (4, 0.6), (6, 0.0)):
        out = model.generate(ids, max_new_tokens=32, kangaroo=K.KangarooConfig(gamma=gamma, eta=eta))
        assert_same_tokens(model.target, ids, torch.ones_like(ids), plain, out, f"gamma={gamma}, eta={eta}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_is_seeded(dtype):
    model = _pair(dtype)
    ids = torch.randint(0, 512, (4, 7), device="cuda")
    out = model.generate(ids, max_new_tokens=24, return_dict_in_generate=True)
    assert out.sequences.shape == (4, 31) and out.sequences.device.type == "cuda"
    assert bool((out.sequences >= 0).all()) and bool((out.sequences < 512).all())
    assert min(out.mat) >= 1.0
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw))
