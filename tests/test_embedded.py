"""The shipped embedded model: loads in kangaroo_rt and transformers alike, adapter strict, lossless, MAT."""
import os

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.embedded import ASSETS, heldout_prompt_ids

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "adapter", "kangaroo.json")),
                                reason="the embedded model's assets are not present")


@pytest.fixture(scope="module")
def model():
    return K.load_default()


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompt_ids(8)


def test_same_logits_as_transformers(model, prompts):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ASSETS, dtype=torch.float32).eval()
    ids = prompts[0]
    with torch.no_grad():
        ref = hf(ids).logits
        pos = torch.arange(ids.shape[1])[None]
        ours = model.target(ids, pos, model.target.new_cache(1, ids.shape[1]))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_shipped_files(model):
    names = set(os.listdir(ASSETS))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "corpus_manifest.json"} <= names
    assert os.path.getsize(os.path.join(ASSETS, "model.safetensors")) <= 32 * 2**20
    adapter_files = set(os.listdir(os.path.join(ASSETS, "adapter")))
    assert {"config.json", "pytorch_model.bin", "kangaroo.json"} <= adapter_files
    official = torch.load(os.path.join(ASSETS, "adapter", "pytorch_model.bin"), weights_only=True)
    assert sorted(official) == sorted(K.adapter.ADAPTER_KEYS)


def test_greedy_lossless(model, prompts):
    for ids in prompts:
        plain = model.generate(ids, max_new_tokens=48, kangaroo=None, ignore_eos=True)
        out = model.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert torch.equal(out, plain)


def test_mat_on_held_out_prompts(model):
    """The model card's protocol (benchmarks/bench_embedded.py): 24 held-out prompts x 128 new tokens,
    batch 1, greedy, the shipped gamma and eta."""
    out = [model.generate(ids, max_new_tokens=128, ignore_eos=True, return_dict_in_generate=True)
           for ids in heldout_prompt_ids(24)]
    mat = sum(sum(o.stats.accepted_lengths[0]) for o in out) / sum(o.stats.rounds[0] for o in out)
    print(f"embedded model MAT on 24 held-out prompts x 128 tokens: {mat:.2f}")
    assert mat >= 2.5


def test_batched_equals_single(model, prompts):
    tok = K.load_tokenizer()
    width = max(p.shape[1] for p in prompts[:4])
    ids = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts[:4]):
        ids[i, width - p.shape[1]:], mask[i, width - p.shape[1]:] = p[0], 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, ignore_eos=True)
    for i, p in enumerate(prompts[:4]):
        alone = model.generate(p, max_new_tokens=24, kangaroo=None, ignore_eos=True)
        assert torch.equal(out[i, width:], alone[0, p.shape[1]:])
