"""transformers.Trainer with AGIP, 2 processes under torchrun (accelerate's DDP on gloo).

Run by tests/test_distributed.py: ``torchrun --nproc_per_node 2 tests/hf_ddp_worker.py OUT``;
each rank writes its weights, masks, losses and report to ``OUT.<rank>``. The optimizer is
built before the Trainer initialises the process group: AGIP takes the group at its first step.
"""
import os
import sys

import torch

# this checkout's agip, its root off sys.path (tests/conftest.py says why)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _checkout  # noqa: E402, F401

import agip  # noqa: E402
import agip.hf  # noqa: E402
from agip.launch import teardown  # noqa: E402

T = 6


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=101):
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(out: str) -> None:
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-3, target_sparsity=0.4, total_steps=T)
    agip.hf.attach(model, opt)
    from test_hf import first_step_loss  # (this folder is the script's: first on sys.path)

    first = first_step_loss(model)  # this rank's first batch's mean cross-entropy
    args = transformers.TrainingArguments(
        output_dir=os.path.dirname(out), max_steps=T, per_device_train_batch_size=4, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Blocks(),
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)))
    trainer.train()
    import torch.distributed as dist

    masks = {n: opt.state[p]["mask"].clone() for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])
             if "mask" in opt.state[p]}
    first_loss = torch.tensor(first["loss"], dtype=torch.float64)
    dist.all_reduce(first_loss)  # the ranks' batches have as many tokens: E_1 is the mean of their means
    torch.save({"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "masks": masks,
                "losses": list(opt.schedule.losses), "report": opt.sparsity_report(), "world": opt.comm.world,
                "first_loss": float(first_loss) / dist.get_world_size()},
               f"{out}.{dist.get_rank()}")
    teardown(True)  # the ranks leave the group together


if __name__ == "__main__":
    main(sys.argv[1])
