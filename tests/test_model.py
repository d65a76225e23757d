"""Our Llama-family model equals transformers' in fp32: prefill, step-by-step decode, generate."""
import copy

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.testing import agreeing_pair, random_target, tiny_config

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=120, bos_token_id=None, eos_token_id=None)

CASES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "llama3-rope": ("LlamaForCausalLM", "LlamaConfig", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "linear-rope-tied-bias-mha": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True, attention_bias=True,
        num_key_value_heads=4)),
    "llama-gqa4-hd32": ("LlamaForCausalLM", "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2,
                                                                 hidden_size=128, head_dim=32)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_theta=1e6)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=None)),
}


def _hf_model(case, seed=0):
    model_cls, cfg_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_prefill_and_decode(case):
    hf = _hf_model(case)
    ours = K.load_model(hf)
    b, t = 2, 13
    ids = torch.randint(0, SMALL["vocab_size"], (b, t))
    with torch.no_grad():
        ref = hf(ids).logits
        positions = torch.arange(t).expand(b, t)
        cache = ours.new_cache(b, 32)
        full = ours(ids, positions, cache)
        torch.testing.assert_close(full, ref, atol=1e-4, rtol=0)
        # Prefill 5 tokens, then one token at a time over the static cache.
        cache = ours.new_cache(b, 32)
        steps = [ours(ids[:, :5], positions[:, :5], cache)]
        for i in range(5, t):
            steps.append(ours(ids[:, i:i + 1], positions[:, i:i + 1], cache, kv_len=i + 1))
        torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-4, rtol=0)


def test_layer_range_forward_composes():
    hf = _hf_model("llama")
    ours = K.load_model(hf)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        c = ours.new_cache(2, 16)
        h1 = ours.forward_layers(ours.embed(ids), pos, 0, 1, c)
        torch.testing.assert_close(h1, ref.hidden_states[1], atol=1e-5, rtol=0)
        h = ours.forward_layers(h1, pos, 1, ours.num_layers, c)
        torch.testing.assert_close(ours.head(h), ref.logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="layer range"):
        ours.forward_layers(h1, pos, 2, 9, c)


@pytest.mark.parametrize("case", ["llama", "qwen2", "llama3-rope"])
def test_greedy_tokens_match_transformers_generate(case):
    hf = _hf_model(case, seed=1)
    model = K.KangarooModel.from_pretrained(hf, None, exit_layer=1)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 8), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                      pad_token_id=0)
    ours = model.generate(ids, max_new_tokens=20, kangaroo=None)
    assert torch.equal(ours, ref)


def test_ragged_batch_equals_each_row_alone():
    cfg = tiny_config(num_layers=4)
    model = K.KangarooModel(random_target(cfg, seed=3), None, exit_layer=2)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (3, 11, 1, 7, 5)]
    width = max(len(p) for p in prompts)
    for side in ("left", "right"):
        ids = torch.full((len(prompts), width), 5, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
            ids[i, sl], mask[i, sl] = p, 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, kangaroo=None)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, kangaroo=None)[0, len(p):]
            assert torch.equal(out[i, width:], alone), (side, i)


def test_padding_content_does_not_matter():
    cfg = tiny_config(num_layers=3)
    model = K.KangarooModel(random_target(cfg, seed=3), None, exit_layer=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    a = model.generate(ids, attention_mask=mask, max_new_tokens=10, kangaroo=None)
    ids2 = ids.clone()
    ids2[0, :4] = torch.tensor([1, 2, 3, 4])
    b = model.generate(ids2, attention_mask=mask, max_new_tokens=10, kangaroo=None)
    assert torch.equal(a[:, 9:], b[:, 9:])


def test_plain_sampling_is_seeded_and_respects_top_k():
    cfg = tiny_config(num_layers=3)
    model = K.KangarooModel(random_target(cfg, seed=3), None, exit_layer=1)
    ids = torch.randint(0, cfg.vocab_size, (4, 5))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, seed=9, kangaroo=None)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw))
    # top_k=1 is greedy whatever the temperature.
    greedy = model.generate(ids, max_new_tokens=8, kangaroo=None)
    assert torch.equal(model.generate(ids, **{**kw, "top_k": 1}), greedy)


def test_eos_per_row_and_padding():
    cfg = tiny_config(num_layers=3)
    model = K.KangarooModel(random_target(cfg, seed=3), None, exit_layer=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(8))
    free = model.generate(ids, max_new_tokens=15, kangaroo=None)
    eos = int(free[1, 5 + 3])
    out = model.generate(ids, max_new_tokens=15, kangaroo=None, eos_token_id=eos, pad_token_id=-1)
    for r in range(3):
        new = free[r, 5:]
        hits = (new == eos).nonzero()
        if len(hits):
            stop = hits[0].item() + 1
            assert torch.equal(out[r, 5:5 + stop], new[:stop])
            assert bool((out[r, 5 + stop:] == -1).all())
        else:
            assert torch.equal(out[r, 5:], new)


def test_static_cache_is_reused_across_calls():
    cfg = tiny_config(num_layers=3)
    model = K.KangarooModel(random_target(cfg, seed=3), None, exit_layer=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    model.generate(ids, max_new_tokens=10, kangaroo=None)
    cache = model.decoder.cache
    model.generate(ids[:1, :3], max_new_tokens=6, kangaroo=None)
    assert model.decoder.cache is cache  # smaller request: no reallocation


def test_sliding_window_beyond_the_window_is_refused():
    hf = _hf_model("mistral")
    hf.config.sliding_window = 16
    model = K.KangarooModel.from_pretrained(hf, None, exit_layer=1)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 4))
    model.generate(ids, max_new_tokens=8, kangaroo=None)  # fits in the window
    with pytest.raises(ValueError, match="sliding_window"):
        model.generate(ids, max_new_tokens=40, kangaroo=None)


def _unfused_copy(model):
    """The same weights with every projection called on its own (no FusedRows)."""
    other = K.Transformer(model.config)
    other.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    other.inv_freq = model.inv_freq
    return other.eval()


def test_a_deep_copy_fuses_again_and_shares_no_memory():
    """nn.Parameter's deep copy clones its data, so the copied views would no longer be views of the copied fused
    tensors: the copy fuses again (its q/k/v and gate/up served by one call over its own memory), leaves the one-call
    plans (packed copies included) to be built again, and computes what the original does."""
    model = random_target(tiny_config(), seed=3)
    adapter = K.Adapter.random(model.config, seed=4)
    ids = torch.randint(0, 97, (1, 5))
    pos = torch.arange(5)[None]
    with torch.no_grad():
        want = model(ids, pos, model.new_cache(1, 8))  # (builds the one-call plans where the extension serves)
        copied = copy.deepcopy(model)
        assert "_stacks" not in copied.__dict__
        a, b = model.layers[1].self_attn, copied.layers[1].self_attn
        assert b.qkv is not a.qkv and b.qkv.serves((b.q_proj, b.k_proj, b.v_proj))
        assert b.q_proj.weight.data_ptr() == b.qkv.weight.data_ptr() != a.qkv.weight.data_ptr()
        assert torch.equal(b.qkv.weight, a.qkv.weight)
        assert copied.layers[1].mlp.gate_up.serves((copied.layers[1].mlp.gate_proj, copied.layers[1].mlp.up_proj))
        assert torch.equal(copied(ids, pos, copied.new_cache(1, 8)), want)
        copied.layers[0].self_attn.k_proj.weight.add_(1.0)  # the copy's memory is its own
        assert torch.equal(model(ids, pos, model.new_cache(1, 8)), want)
        adapter_copy = copy.deepcopy(adapter)
        a = adapter_copy.layers[0].self_attn
        assert "_cpu_entry" not in adapter_copy.__dict__ and a.qkv.serves((a.q_proj, a.k_proj, a.v_proj))
        assert a.qkv.weight.data_ptr() != adapter.layers[0].self_attn.qkv.weight.data_ptr()


def test_pickling_leaves_the_one_call_plans_out_and_fuses_on_load(tmp_path):
    """torch.save of a model and adapter that have decoded (their one-call plans built, a bf16 model's packed copies
    among them) writes neither, and the loaded pair serves fused and decodes the same tokens."""
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, exit_layer=2, seed=0)
    target, adapter = target.to(torch.bfloat16), adapter.to(torch.bfloat16)
    kcfg = K.KangarooConfig(gamma=4, eta=0.2)
    ids = torch.tensor([[5, 9, 13, 2]])
    want = K.KangarooModel(target, adapter, exit_layer=2, max_len=64).generate(ids, max_new_tokens=12, kangaroo=kcfg)
    torch.save((target, adapter), tmp_path / "pair.pt")
    loaded, loaded_adapter = torch.load(tmp_path / "pair.pt", weights_only=False)
    assert "_stacks" not in loaded.__dict__ and "_cpu_entry" not in loaded_adapter.__dict__
    attn = loaded.layers[2].self_attn
    with torch.no_grad():
        assert attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
    model = K.KangarooModel(loaded, loaded_adapter, exit_layer=2, max_len=64)
    assert torch.equal(model.generate(ids, max_new_tokens=12, kangaroo=kcfg), want)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_projections_change_no_result_and_keep_the_parameters(model_type, tmp_path):
    """q/k/v and gate/up served by one call each give the per-layer results (bit for bit on the CPU extension,
    whose rows are independent); parameter names, the state dict, in-place loading, .to() and saving are as
    without fusion."""
    model = random_target(tiny_config(model_type=model_type), seed=3)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    with torch.no_grad():
        assert attn.qkv is not None and attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.weight.data_ptr() == attn.qkv.weight[attn.n_heads * attn.head_dim:].data_ptr()
    plain = _unfused_copy(model)
    assert plain.layers[0].self_attn.qkv is None
    assert set(plain.state_dict()) == set(model.state_dict())
    ids = torch.randint(0, 97, (2, 6))
    pos = torch.arange(6)[None].expand(2, 6)
    with torch.no_grad():
        fused_logits = model(ids, pos, model.new_cache(2, 16))
        plain_logits = plain(ids, pos, plain.new_cache(2, 16))
        if K.ops.backend_table("cpu")["linear"] == "cpu":
            assert torch.equal(fused_logits, plain_logits)
        torch.testing.assert_close(fused_logits, plain_logits)
        # in-place loading writes through the views into the fused tensor
        new_q = torch.randn_like(attn.q_proj.weight)
        model.load_state_dict({**model.state_dict(), "layers.0.self_attn.q_proj.weight": new_q})
        assert torch.equal(attn.qkv.weight[:new_q.shape[0]], new_q)
        # .to() gives the parameters new memory and fuses again
        model.to(torch.float64)
        assert attn.qkv.weight.dtype == torch.float64 and attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
    # a re-assigned parameter ends the fused call: the layers are then called one by one
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        assert not attn.qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
    # gradients flow to the parameters (the fused call is not used while autograd records)
    model.float()
    mlp.gate_proj.weight.requires_grad_(True)
    with torch.enable_grad():
        assert not mlp.gate_up.serves((mlp.gate_proj, mlp.up_proj))
        mlp(torch.randn(1, 2, 64)).sum().backward()
    assert mlp.gate_proj.weight.grad is not None
    K.save_model(model, tmp_path / "saved")  # safetensors refuses shared memory: saving copies
    assert (tmp_path / "saved" / "model.safetensors").is_file()
