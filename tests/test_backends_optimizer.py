"""``AGIP.step`` on every fused backend against ``reference``, at the optimizer level: a
tiny LM, 15 steps, pruning from step 2 with regrowth, a saliency EMA and the TA term on,
two prunable-or-not param groups with different lr and weight decay, for every score.

Before each step the backend's model and optimizer state are set to the reference's, so
ulp-level drift cannot move a boundary: each step then checks that theta, the masks and
the regrown count are identical, and that the update Δw is within MAX_ULPS of the
operands (the bound is on the update, not on w, so a wrong small term cannot hide)."""
import pytest
import torch

import agip
from backend_cases import MAX_ULPS, sync_optimizers, ulps
from conftest import TinyLM, batch

STEPS = 15


def groups(model):
    gs = agip.param_groups(model, weight_decay=0.05)
    gs[0]["lr"] = 2e-2  # the prunable group: its own lr
    return gs


def make(backend, saliency, fisher_power, moment="current"):
    model = TinyLM()
    opt = agip.AGIP(groups(model), lr=1e-2, target_sparsity=0.6, total_steps=STEPS, warmup_steps=1,
                    schedule="exp", tau=3.0, regrow_fraction=0.2, saliency_ema=0.5, ta_gamma=3.0, ta_clip=5.0,
                    stability=True, saliency=saliency, fisher_power=fisher_power, fisher_moment=moment, backend=backend)
    return model, opt


@pytest.mark.parametrize("saliency,fisher_power,moment", [("taylor", 0.5, "current"), ("fisher", 0.5, "current"),
                                                          ("fisher", 0.25, "current"), ("fisher", 0.25, "previous")])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_optimizer_step_matches_reference(backend, saliency, fisher_power, moment, monkeypatch):
    module = pytest.importorskip(f"agip.backends.{backend}", reason=f"the {backend} backend is not available")
    if backend == "triton":
        monkeypatch.setattr(module, "block", 64)  # many programs, partial last blocks
    ref_model, ref_opt = make("reference", saliency, fisher_power, moment)
    model, opt = make(backend, saliency, fisher_power, moment)
    pruned_steps = 0
    for t in range(STEPS):
        sync_optimizers(ref_model, ref_opt, model, opt)
        before = [p.detach().clone() for p in ref_model.parameters()]
        for m, o in ((ref_model, ref_opt), (model, opt)):
            loss = m(batch(t))
            loss.backward()
            o.step(loss=loss)
            o.zero_grad()
        r_ref, r = ref_opt.sparsity_report(), opt.sparsity_report()
        for key in ("theta", "regrown", "n_pruned", "layer_density"):
            assert r[key] == r_ref[key], (t, key)
        for (name, a), b, old in zip(ref_model.named_parameters(), model.parameters(), before):
            d_ref, d = a.detach() - old, b.detach() - old
            assert ulps(d_ref, d, old) <= MAX_ULPS, (t, name)
            assert torch.equal(a == 0, b == 0), (t, name)
        pruned_steps += r["theta"] is not None and r["n_pruned"] > 0
    assert ref_opt.sparsity_report()["n_pruned"] >= int(0.6 * ref_opt._flat.n_prunable)
    assert ref_opt.sparsity_report()["regrown"] > 0 and pruned_steps >= STEPS - 2
