"""kernels/sampling.py against reference.greedy_with_confidence (argmax + top-1 probability)."""
import pytest
import torch

from kernel_checks import kernel_module
from kangaroo_rt import reference


@pytest.mark.parametrize("batch,vocab", [(1, 97), (5, 1000), (3, 9000), (8, 32)])
def test_greedy_with_confidence_matches_reference(batch, vocab):
    mod = kernel_module("sampling")
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(batch, vocab, generator=gen) * 4
    token, conf = mod.greedy_with_confidence(logits)
    ref_token, ref_conf = reference.greedy_with_confidence(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, atol=1e-6, rtol=1e-5)


def test_greedy_with_confidence_ties_and_strided_rows():
    mod = kernel_module("sampling")
    logits = torch.zeros(3, 6000)
    logits[1, 4100] = logits[1, 5000] = 2.0  # a tie across blocks: the first maximum wins
    logits[2, 17] = 50.0  # a confident row
    token, conf = mod.greedy_with_confidence(logits[:, :5500])
    assert token.tolist() == [0, 4100, 17]
    torch.testing.assert_close(conf, reference.greedy_with_confidence(logits[:, :5500])[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_with_confidence_cuda(dtype):
    mod = kernel_module("sampling")
    logits = (torch.randn(8, 32000, device="cuda") * 4).to(dtype)
    token, conf = mod.greedy_with_confidence(logits)
    ref_token, ref_conf = reference.greedy_with_confidence(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(conf, ref_conf, atol=1e-5, rtol=1e-4)
