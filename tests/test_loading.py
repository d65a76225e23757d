"""Loading targets from HF checkpoint folders and transformers objects, saving them back, and the errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kangaroo_rt
from checks import edit_config
from kangaroo_rt import load_model, save_model

B, T = 2, 7


def _hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97)
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def _ids(seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def _our_logits(model, ids):
    b, t = ids.shape
    positions = torch.arange(t).expand(b, t)
    cache = model.new_cache(b, t + 4)
    with torch.no_grad():
        return model(ids, positions, cache)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def _assert_same_logits(model, hf, atol=1e-5):
    ids = _ids()
    ours = _our_logits(model, ids)
    ref = _hf_logits(hf, ids)
    assert ours.shape == ref.shape == (B, T, 97)
    torch.testing.assert_close(ours.to(ref.dtype), ref, atol=atol, rtol=0)


def _save_bin(hf, folder, shards=1):
    """Write a pytorch_model.bin checkpoint (sharded with an index when shards > 1), as
    transformers < 5 did with safe_serialization=False."""
    os.makedirs(folder, exist_ok=True)
    hf.config.save_pretrained(folder)
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = keys[i::shards]
        torch.save({k: sd[k] for k in chunk}, os.path.join(folder, name))
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)




@pytest.fixture(scope="module")
def hf():
    return _hf_model()


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_single")
    hf.save_pretrained(folder)
    return folder


def _copy_folder(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


# -- round trips -------------------------------------------------------------------------------------

def test_safetensors_single_file_round_trip(hf, saved):
    assert os.path.isfile(os.path.join(saved, "model.safetensors"))
    assert not os.path.exists(os.path.join(saved, "model.safetensors.index.json"))
    model = load_model(saved)
    assert isinstance(model, kangaroo_rt.Transformer)
    assert model.dtype == torch.float32 and model.num_layers == 4
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 97
    _assert_same_logits(model, hf)


def test_logits_differ_for_another_checkpoint(saved):
    """The logit comparison is not vacuous: another model's weights fail it."""
    model = load_model(saved)
    with pytest.raises(AssertionError):
        _assert_same_logits(model, _hf_model(seed=5))


def test_sharded_safetensors_round_trip(hf, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    _assert_same_logits(load_model(tmp_path), hf)


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_round_trip(hf, tmp_path, shards):
    _save_bin(hf, tmp_path, shards=shards)
    assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path))
    _assert_same_logits(load_model(tmp_path), hf)


def test_transformers_safe_serialization_false_round_trip(hf, tmp_path):
    # transformers 5 ignores safe_serialization=False and writes safetensors; older versions write .bin.
    # Either way the folder must load.
    hf.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="20KB")
    _assert_same_logits(load_model(tmp_path), hf)


def test_folder_load_respects_dtype(hf, saved):
    model = load_model(saved, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    _assert_same_logits(model, hf)


def test_rotary_inv_freq_buffers_in_old_checkpoints_are_ignored(hf, saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, folder / "model.safetensors")
    _assert_same_logits(load_model(folder), hf)


def test_tied_embeddings(tmp_path):
    hf = _hf_model(tie_word_embeddings=True)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in names  # transformers drops the tied copy
    model = load_model(tmp_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight
    _assert_same_logits(model, hf)
    # Also from the in-memory model (whose state_dict does carry lm_head.weight).
    model2 = load_model(hf)
    assert model2.lm_head.weight.data_ptr() == model2.embed_tokens.weight.data_ptr()
    _assert_same_logits(model2, hf)


def test_tied_embeddings_saved_with_lm_head_copy(tmp_path):
    """Some tied checkpoints also store lm_head.weight; it must be accepted and the weights stay tied."""
    hf = _hf_model(tie_word_embeddings=True)
    _save_bin(hf, tmp_path)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    _assert_same_logits(model, hf)


def test_load_from_transformers_object_shares_storage(hf):
    model = load_model(hf)
    hf_params = dict(hf.named_parameters())
    ours = dict(model.named_parameters())
    assert ours["embed_tokens.weight"].data_ptr() == hf_params["model.embed_tokens.weight"].data_ptr()
    assert ours["layers.3.mlp.down_proj.weight"].data_ptr() == hf_params["model.layers.3.mlp.down_proj.weight"].data_ptr()
    assert ours["lm_head.weight"].data_ptr() == hf_params["lm_head.weight"].data_ptr()
    assert ours["norm.weight"].data_ptr() == hf_params["model.norm.weight"].data_ptr()
    _assert_same_logits(model, hf)


def test_load_from_transformers_object_converts_dtype(hf):
    model = load_model(hf, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.embed_tokens.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    assert hf.model.embed_tokens.weight.dtype == torch.float32  # the source is left alone
    torch.testing.assert_close(model.embed_tokens.weight, hf.model.embed_tokens.weight.double())
    _assert_same_logits(model, hf)


def test_save_model_loads_in_transformers_and_back(hf, tmp_path):
    model = load_model(hf)
    save_model(model, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    # transformers' names, which stricter readers than transformers (converters, servers) expect.
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(hf.state_dict())
    reloaded_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(reloaded_hf).__name__ == "LlamaForCausalLM"
    ids = _ids()
    torch.testing.assert_close(_hf_logits(reloaded_hf, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)
    ours_again = load_model(tmp_path / "ours")
    for name, p in model.state_dict().items():
        assert torch.equal(ours_again.state_dict()[name], p), name
    _assert_same_logits(ours_again, hf)


def test_save_model_tied_round_trip(tmp_path):
    hf = _hf_model(tie_word_embeddings=True)
    save_model(load_model(hf), tmp_path)
    assert "lm_head.weight" not in set(load_file(tmp_path / "model.safetensors"))
    back = load_model(tmp_path)
    assert back.lm_head.weight is back.embed_tokens.weight
    _assert_same_logits(back, hf)
    reloaded_hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids()
    torch.testing.assert_close(_hf_logits(reloaded_hf, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


# -- errors ------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_folder_without_weights(hf, tmp_path):
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_model(tmp_path)


def test_index_lists_missing_shard(hf, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard.replace(".", r"\.")):
        load_model(tmp_path)


def test_bin_index_lists_missing_shard(hf, tmp_path):
    _save_bin(hf, tmp_path, shards=3)
    os.remove(tmp_path / "pytorch_model-00002-of-00003.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model-00002-of-00003\.bin"):
        load_model(tmp_path)


def _rewrite_tensors(saved, folder, edit):
    folder = _copy_folder(saved, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_missing_tensor_is_named(saved, tmp_path):
    folder = _rewrite_tensors(saved, tmp_path / "ck", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_missing_lm_head_is_named_when_untied(saved, tmp_path):
    folder = _rewrite_tensors(saved, tmp_path / "ck", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: lm_head\.weight"):
        load_model(folder)


def test_extra_tensor_is_named(saved, tmp_path):
    folder = _rewrite_tensors(saved, tmp_path / "ck",
                              lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"unexpected tensors: layers\.0\.mlp\.extra_proj\.weight"):
        load_model(folder)


def test_wrong_shape_tensor_is_named(saved, tmp_path):
    folder = _rewrite_tensors(saved, tmp_path / "ck",
                              lambda t: t.__setitem__("model.layers.2.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: layers\.2\.self_attn\.k_proj\.weight: "
                                         r"checkpoint \(64, 64\) vs model \(32, 64\)"):
        load_model(folder)


def test_truncated_safetensors(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_model(folder)


def test_garbage_safetensors(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_model(folder)


def test_corrupted_bin(hf, tmp_path):
    _save_bin(hf, tmp_path)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path)


class _NotATensor:
    pass


def test_bin_with_arbitrary_objects_is_refused(hf, tmp_path):
    _save_bin(hf, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["payload"] = _NotATensor()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path)


def test_unknown_architecture(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="gpt2"):
        load_model(folder)


def test_config_without_model_type(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("model_type")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        load_model(folder)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(saved, tmp_path, key):
    folder = _copy_folder(saved, tmp_path / "ck")
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    if key == "rope_parameters":
        rope["rope_theta"] = 10000.0
        edit_config(folder, rope_parameters=rope, rope_scaling=None)
    else:
        edit_config(folder, rope_scaling=rope, rope_parameters=None)
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'yarn'"):
        load_model(folder)


def test_unsupported_hidden_act(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    edit_config(folder, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
        load_model(folder)


def test_config_not_json(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "ck")
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(folder)


def test_load_from_unsupported_object():
    with pytest.raises(ValueError, match="cannot load a model from int"):
        load_model(42)
