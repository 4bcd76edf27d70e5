"""Must show 1: no pruning and no TA is torch.optim.AdamW + clip_grad_norm_ (docs/algorithm.md §1)."""
import copy

import pytest
import torch

import agip

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def run_pair(max_grad_norm, lr=5e-5, steps=20, opt_cls=agip.AGIP, **kw):
    if kw.get("backend") == "cpp":
        pytest.importorskip("agip.backends.cpp", reason="the C++ backend did not build here")
    m1 = tiny_gpt2()
    m2 = copy.deepcopy(m1)
    o1 = opt_cls(agip.param_groups(m1), lr=lr, ta_gamma=0, max_grad_norm=max_grad_norm, **kw)
    o2 = torch.optim.AdamW(agip.param_groups(m2), lr=lr, weight_decay=0.01)
    for t in range(steps):
        x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(t))
        for m, o in ((m1, o1), (m2, o2)):
            loss = m(x, labels=x).loss
            loss.backward()
            if o is o2:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm)
                o.step()
            else:
                o.step(loss=loss)
            o.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    scale = max(a.abs().max().item() for a in m1.parameters())
    return diff, scale


CPU_BACKENDS = ["reference", "cpp"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agip_without_pruning_and_ta_is_adamw_with_clipping(backend):
    diff, scale = run_pair(max_grad_norm=1.0, target_sparsity=0.0, backend=backend)
    assert diff <= 1e-6 * scale, (diff, scale)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_taadamw_with_gamma_zero_is_adamw(backend):
    diff, scale = run_pair(max_grad_norm=1.0, opt_cls=agip.TAAdamW, backend=backend)
    assert diff <= 1e-6 * scale, (diff, scale)


def test_without_clipping_the_reference_update_is_bitwise_adamw():
    # with no clip coefficient in play the reference mirrors torch line by line
    diff, _ = run_pair(max_grad_norm=None, lr=1e-3, target_sparsity=0.0, backend="reference")
    assert diff == 0.0


def test_groups_split_prunable_decay_and_no_decay():
    groups = agip.param_groups(tiny_gpt2())
    prune = [n for g in groups if g["prune"] for n, _ in g["params"]]
    no_decay = [n for g in groups if g["weight_decay"] == 0 for n, _ in g["params"]]
    assert prune and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in prune)
    assert len(prune) == 2 * 4  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert "transformer.wte.weight" in no_decay and "transformer.h.0.ln_1.weight" in no_decay
    assert all(not n.startswith("lm_head") for n in prune)  # tied with wte, appears once


def update_diff(backend, max_grad_norm, wd=0.1, eps=1e-3, lr=1e-3, steps=20):
    """max |Δθ_agip − Δθ_torch| and max |Δθ_torch| over the run (updates, not weights:
    a bound on the weights would hide a missing weight-decay or eps term)."""
    if backend == "cpp":
        pytest.importorskip("agip.backends.cpp", reason="the C++ backend did not build here")
    m1 = tiny_gpt2()
    m2 = copy.deepcopy(m1)
    start = [p.detach().clone() for p in m1.parameters()]
    o1 = agip.TAAdamW(agip.param_groups(m1, weight_decay=wd), lr=lr, eps=eps, weight_decay=wd, ta_gamma=0,
                      max_grad_norm=max_grad_norm, backend=backend)
    o2 = torch.optim.AdamW(agip.param_groups(m2, weight_decay=wd), lr=lr, eps=eps, weight_decay=wd)
    for t in range(steps):
        x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(t))
        for m, o in ((m1, o1), (m2, o2)):
            m(x, labels=x).loss.backward()
            if o is o2:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm)
                o.step()
            else:
                o.step()
            o.zero_grad()
    d1 = [a.detach() - s for a, s in zip(m1.parameters(), start)]
    d2 = [b.detach() - s for b, s in zip(m2.parameters(), start)]
    return max((a - b).abs().max().item() for a, b in zip(d1, d2)), max(b.abs().max().item() for b in d2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_updates_match_adamw_with_every_term_visible(backend, max_grad_norm):
    diff, scale = update_diff(backend, max_grad_norm)
    assert diff <= 1e-5 * scale, (diff, scale)
