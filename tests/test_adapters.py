"Cross-checks of llmlit.adapters: roles on transformers' own models and through peft, LoRA vectors, log-probs against TRL, FLOPs against torch's counter"
import importlib.util, os
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM
import llmlit.adapters as ad
from llmlit.data import make_phonebook, phonebook_tokenizer
from llmlit.models import count_params

torch.set_num_threads(1)
ARCHS = list(ad.MODULE_ROLES)
TOK = phonebook_tokenizer(make_phonebook(30))


def _model(arch, n_layers=3, **kw):
    "A tiny random model of `arch` with `n_layers` blocks, eager attention (so torch's FLOP counter sees every matmul)"
    torch.manual_seed(0)
    depth = {'n_layer' if arch == 'gpt2' else 'num_hidden_layers': n_layers}
    return ad.tiny_lm_for(TOK, arch, seq_len=64, attn_implementation='eager', **depth, **kw).eval()

def _peft(model, arch):
    return get_peft_model(model, LoraConfig(r=2, target_modules=list(ad.MODULE_ROLES[arch].values()),
                                            fan_in_fan_out=arch == 'gpt2', init_lora_weights=False))


@pytest.mark.parametrize('arch', ARCHS)
def test_layer_modules_find_every_projection(arch):
    "Each role once per block, and together they are all the matrices inside the blocks"
    m = _model(arch)
    found = ad.layer_modules(m)
    roles = ad.MODULE_ROLES[arch]
    assert sorted((l, r) for _, l, r, _ in found) == sorted((l, r) for l in range(3) for r in roles)
    matrices = {n for n, mod in m.named_modules() if type(mod).__name__ in ('Linear', 'Conv1D') and ('.layers.' in n or '.h.' in n)}
    assert {n for n, *_ in found} == matrices
    assert all(ad.role_of(m, n + '.weight') == (l, r) for n, l, r, _ in found)


@pytest.mark.parametrize('arch', ARCHS)
def test_roles_through_peft(arch):
    "MODULE_ROLES' suffixes as peft targets wrap exactly the role modules; layer_modules and role_of see through the wrapper"
    base = [(l, r) for _, l, r, _ in ad.layer_modules(_model(arch))]
    pm = _peft(_model(arch), arch)
    found = ad.layer_modules(pm)
    assert [(l, r) for _, l, r, _ in found] == base and all(hasattr(mod, 'lora_A') for *_, mod in found)
    names = [n for n, p in pm.named_parameters() if '.lora_' in n]
    assert len(names) == 2*len(found) and sorted(ad.role_of(pm, n) for n in names) == sorted(base*2)


def test_theta_round_trip_and_gradient():
    "set then get returns θ; theta_grad equals autograd on each LoRA matrix; θ = 0 gives the base model's logits"
    pm = _peft(_model('llama'), 'llama')
    theta = torch.randn_like(ad.get_theta(pm))
    ad.set_theta(pm, theta)
    assert torch.equal(ad.get_theta(pm), theta)
    x = torch.randint(4, len(TOK), (2, 7))
    g = ad.theta_grad(pm, pm(input_ids=x).logits.pow(2).mean())
    pm.zero_grad(); pm(input_ids=x).logits.pow(2).mean().backward()
    ref = torch.cat([p.grad.reshape(-1) for p in ad.lora_params(pm)])
    torch.testing.assert_close(g, ref)
    ad.set_theta(pm, torch.zeros_like(theta))   # B = 0: the adapter adds nothing
    with torch.no_grad(), pm.disable_adapter(): plain = pm(input_ids=x).logits
    torch.testing.assert_close(pm(input_ids=x).logits, plain)


def _pairs():
    g = torch.Generator().manual_seed(3)
    lens = [(4, 3), (1, 5), (6, 1), (2, 2)]
    return [(torch.randint(4, len(TOK), (p,), generator=g).tolist(), torch.randint(4, len(TOK), (c,), generator=g).tolist())
            for p, c in lens]

def _batch(pairs, left):
    "Padded (input_ids, attention_mask, completion_mask) of prompt-completion pairs"
    T = max(len(p) + len(c) for p, c in pairs)
    cols = []
    for p, c in pairs:
        pad = T - len(p) - len(c)
        rows = (p + c, [1]*(len(p) + len(c)), [0]*len(p) + [1]*len(c))
        cols.append([[0]*pad + r if left else r + [0]*pad for r in rows])
    return [torch.tensor([c[i] for c in cols]) for i in range(3)]

def _loop_reference(model, pairs):
    "log pi(c | p) row by row on the unpadded sequence, token by token, in float64"
    out = []
    for p, c in pairs:
        lp = model(torch.tensor([p + c])).logits[0].double().log_softmax(-1)
        out.append(sum(lp[len(p) + j - 1, t] for j, t in enumerate(c)))
    return torch.stack(out).float()


@pytest.mark.parametrize('arch', ARCHS)
def test_sequence_logprobs_against_a_loop(arch):
    "Right and left padding both equal the per-row reference (1e-4 absolute on sums of about -20 nats)"
    m, pairs = _model(arch), _pairs()
    with torch.no_grad():
        ref = _loop_reference(m, pairs)
        for left in (False, True): torch.testing.assert_close(ad.sequence_logprobs(m, *_batch(pairs, left)), ref, atol=1e-4, rtol=0)


def test_sequence_logprobs_gradient_and_bf16():
    "The sum is differentiable (a DPO step needs it), and a bf16 model gives fp32 sums near the fp32 model's"
    m, pairs = _model('llama'), _pairs()
    lp = ad.sequence_logprobs(m, *_batch(pairs, True))
    lp.sum().backward()
    assert lp.dtype == torch.float32 and all(p.grad is not None for p in m.parameters() if p.requires_grad)
    with torch.no_grad(): ref = ad.sequence_logprobs(m, *_batch(pairs, False))
    with torch.no_grad(): low = ad.sequence_logprobs(m.to(torch.bfloat16), *_batch(pairs, False))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.1, rtol=0.02)   # bf16 weights and activations: ~3 significant digits


@pytest.mark.skipif(importlib.util.find_spec('trl') is None, reason='TRL is not installed (pip install --no-deps trl)')
def test_sequence_logprobs_against_trl():
    "TRL's preference collator and its summed completion log-probs (ORPO's get_batch_logps) give the same numbers"
    os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.experimental.orpo import ORPOTrainer
    pairs = _pairs()
    rejected = [c[::-1] + [5] for _, c in pairs]
    batch = DataCollatorForPreference(pad_token_id=TOK.pad_token_id)(
        [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for (p, c), r in zip(pairs, rejected)])
    m = _model('qwen2')
    with torch.no_grad():
        logits = m(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
        labels = batch['input_ids'].masked_fill(batch['completion_mask'] == 0, -100)
        trl_lp = ORPOTrainer.get_batch_logps(logits.float(), labels)
        ours = ad.sequence_logprobs(m, batch['input_ids'], batch['attention_mask'], batch['completion_mask'])
    torch.testing.assert_close(ours, trl_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize('arch', ARCHS)
def test_training_flops_equal_torchs_counter(arch):
    """exact equals FlopCounterMode's count of one forward and backward of B*T tokens. Both count 2mnk per matmul of
    the same shapes (mm, addmm, bmm, eager attention), so the tolerance is zero; norms, softmax and the optimizer are not
    matmuls in either. SDPA on CPU runs a fused kernel the counter does not see, hence eager attention here."""
    m = _model(arch, n_layers=2, tie_word_embeddings=arch == 'qwen3')
    B, T = 3, 17
    x = torch.randint(4, len(TOK), (B, T))
    with FlopCounterMode(display=False) as fc:
        m(input_ids=x).logits.sum().backward()
    f = ad.training_flops(m, B*T, T)
    assert f['exact'] == fc.get_total_flops()
    assert f['six_nd'] == 6*f['N']*B*T and f['exact'] > f['six_nd']


@pytest.mark.parametrize('embeddings', [True, False])
@pytest.mark.parametrize('target', [3e6, 30e6, 300e6, 3e9])
def test_llama_for_params_hits_the_target(target, embeddings):
    "Within the 1% default tolerance, counted by transformers' own model (meta device), with the stated shape rule"
    c = ad.llama_for_params(target, vocab_size=32000, embeddings=embeddings)
    n = ad.config_params(c, embeddings=embeddings)
    assert abs(n/target - 1) <= 0.01
    d, L, I = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    assert d % 64 == 0 and I % 8 == 0 and c.head_dim == 64 and c.num_key_value_heads == c.num_attention_heads
    if n - (32000*d if embeddings else 0) > target/2:   # (at 3M the 32k-token table leaves room for width 64 only, and depth absorbs the rest)
        assert 2 <= I/d <= 4 and 16 <= d/L <= 256  # near 8/3 and the aspect 64


def test_config_params_counts_a_real_model():
    "The meta-device count equals the parameters of the model built in memory"
    c = ad.llama_for_params(2.5e6, vocab_size=1000, tol=0.02)
    assert ad.config_params(c) == count_params(AutoModelForCausalLM.from_config(c))
