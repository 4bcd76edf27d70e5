"""An optimizer's reports and persistent state (``sparsity_report``, ``state_dict``,
``load_state_dict`` of :class:`agip.TAAdamW` and :class:`agip.AGIP`), kept apart from the
step so that the classes read like torch's own optimizers.
"""
from __future__ import annotations

import warnings

import torch


def sparsity_report(opt) -> dict:
    """Achieved sparsity over the prunable set and over all parameters, per-layer
    density, R_t, theta, regrown count and skipped steps (docs/algorithm.md §2.4)."""
    flat = opt._flat
    names, sums, sizes = [], [], []
    for b, s in flat.prunable_slots():
        names.append(s.name)
        sums.append(b.mask[s.start : s.start + s.numel].sum())
        sizes.append(s.numel)
    if sums:  # per layer, summed over ranks when sharded (algorithm.md §6)
        counts = torch.stack([torch.stack(sums).to(torch.int64), torch.tensor(sizes, device=flat.device)])
        kept, sizes = flat.comm.sum_counts(counts).tolist()
    else:
        kept = []
    n_pruned = sum(sizes) - sum(kept)
    N, total = flat.n_prunable_global, flat.numel_global
    return {
        "step": opt._step,
        "target_sparsity": opt.schedule.target,
        "scheduled_sparsity": opt.schedule.ratio,
        "sparsity_prunable": n_pruned / N if N else 0.0,
        "sparsity_all": n_pruned / total if total else 0.0,
        "n_pruned": int(n_pruned),
        "n_prunable": N,
        "n_params": total,
        "theta": opt._last["theta"],
        "regrown": opt._last["regrown"],
        "alpha": opt._last["alpha"],
        "grad_norm": opt._last["grad_norm"],
        "clip": opt._last["clip"],
        "ta_scale": opt._last["ta_scale"],
        "skipped_steps": opt.skipped_steps,
        "rebound_grads": flat.rebound_grads,
        "rebound_params": flat.rebound_params,
        "layer_density": {n: (k / z if z else 1.0) for n, k, z in zip(names, kept, sizes)},
    }


def state_dict(opt, sd: dict) -> dict:
    """torch's state dict ``sd`` (``state`` per parameter index, ``param_groups``) plus
    ``agip``: step counters, schedule state, loss window and the last decision."""
    sd["agip"] = {
        "step": opt._step,
        "skipped_steps": opt.skipped_steps,
        "schedule": opt.schedule.state_dict(),
        "last": dict(opt._last),
        "config": opt.config.as_dict(),
        "world_size": opt.comm.world,
        "sharded": opt.comm.sharded,
    }
    norms = getattr(opt._selection, "input_norms", None)
    if norms is not None:  # §2.5c, in the order of the prunable parameters
        sd["agip"]["input_norms"] = [norms[id(s.param)].clone() for _, s in opt._flat.prunable_slots()]
    return sd

def load_state_dict(opt, state_dict: dict) -> None:
    """Restore moments, masks, saliency EMA, schedule, loss window and counters.

    Everything is checked before anything is copied, so a mismatched state dict
    leaves the optimizer as it was.
    """
    if not isinstance(state_dict, dict) or "agip" not in state_dict:
        raise ValueError("not an AGIP state dict (no 'agip' entry); was it saved from torch.optim.AdamW?")
    saved_world = state_dict["agip"].get("world_size", 1)
    if saved_world != opt.comm.world and (state_dict["agip"].get("sharded") or opt.comm.sharded):
        raise ValueError(f"this state dict holds the shards of {saved_world} process(es), but this run has "
                         f"{opt.comm.world}: resume with --nproc_per_node {saved_world}, or write a full "
                         "checkpoint (agip.checkpoint.save_full) and start from it")
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
    index, copies = 0, []
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"param group {gi}: state dict has {len(sg['params'])} parameters, optimizer {len(g['params'])}")
        if bool(sg.get("prune", False)) != g["prune"]:
            raise ValueError(f"param group {gi}: 'prune' is {sg.get('prune')} in the state dict, {g['prune']} here")
        for p, pid in zip(g["params"], sg["params"]):
            saved = state_dict["state"].get(pid, {})
            for key, dst in opt.state[p].items():
                if key not in saved:
                    raise ValueError(f"state dict lacks {key!r} for parameter {index} (group {gi})")
                src = saved[key]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{key!r} of parameter {index}: shape {tuple(src.shape)} in the state dict, {tuple(dst.shape)} here")
                copies.append((dst, src))
            index += 1
    extra = state_dict["agip"]
    saved_cfg = extra.get("config", {})
    config = opt.config.as_dict()
    norms = extra.get("input_norms")
    slots = [s for _, s in opt._flat.prunable_slots()]
    if norms is not None:
        if not hasattr(opt._selection, "set_input_norms"):
            raise ValueError("this state dict holds input norms (nm_input_power > 0, an N:M pattern); this optimizer "
                             "has no N:M pattern: build it with the run's sparsity_pattern and nm_input_power")
        if len(norms) != len(slots) or any(n.numel() != s.shape[s.input_dim] for n, s in zip(norms, slots)):
            raise ValueError("the state dict's input norms do not match this optimizer's prunable parameters")
    changed = sorted(k for k in config if k in saved_cfg and saved_cfg[k] != config[k])
    if changed:
        warnings.warn(f"resuming with changed settings {changed}; the new values apply from here on", stacklevel=2)
    for dst, src in copies:
        dst.copy_(src)
    for g, sg in zip(groups, saved_groups):
        for key, val in sg.items():
            if key not in ("params", "param_names", "prune"):
                g[key] = val
    opt._step = int(extra["step"])
    opt.skipped_steps = int(extra["skipped_steps"])
    opt.schedule.load_state_dict(extra["schedule"])
    opt._last.update(extra.get("last", {}))
    if norms is not None:
        opt._selection.set_input_norms({id(s.param): n.float().to(opt._flat.device) for n, s in zip(norms, slots)})
