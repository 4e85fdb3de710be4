"""Write real DeepSpeed ZeRO checkpoints on the CPU, with DeepSpeed's own answers beside them.

Run under torchrun (one job per world size; every configuration is trained inside the same processes, so the
DeepSpeed start-up is paid once):

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 tests/deepspeed_writers/train.py OUT zero2-fp32 ...

A configuration is ``[squeezenet-]zero{1,2,3}-{fp32,bf16}`` (``squeezenet``: torchvision's, for ``--arch``). For
each, ``OUT/<config>-w<world>/`` gets:

* ``ds/``: the checkpoint folder DeepSpeed wrote (``latest``, ``global_step2/``, and ``global_step3/`` written one
  step later with ``save_latest=False``);
* ``reference.pt`` (rank 0): DeepSpeed's own answers, all taken through DeepSpeed's API: ``fp32`` is
  ``get_fp32_state_dict_from_zero_checkpoint(ds)``; ``exp_avg``/``exp_avg_sq`` per parameter name from
  ``safe_get_full_optimizer_state``; ``step`` per parameter from the base optimizer's state; ``batch`` the inputs
  of the step after the checkpoint and ``next_fp32`` every parameter after that step (``safe_get_full_fp32_param``).

The model has a frozen layer, a tied (shared) weight, a float and an int64 buffer, two parameter groups
and sizes no world size divides, so ZeRO pads. fp16 needs mkldnn fp16 on the CPU, which most CPUs lack.
"""

import os
import sys

import torch
import torch.nn as nn

STEPS = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 7))
        self.register_buffer("count", torch.tensor([5, 7]))
        self.frozen = nn.Linear(7, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 11)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        h = self.emb(x)
        a = torch.relu(self.norm(self.lin1(h))) * self.scale.to(h.dtype)
        return self.head(h), self.frozen(a)


def squeezenet():
    """A torchvision model (for ``--arch``), its first convolution frozen; no dropout, so that a step can be
    repeated outside DeepSpeed."""
    import torchvision

    model = torchvision.models.squeezenet1_1(num_classes=10, dropout=0.0)
    model.features[0].requires_grad_(False)
    return model


MODELS = {"net": Net, "squeezenet": squeezenet}


def make(kind):
    torch.manual_seed(0)
    return MODELS[kind]()


def loss_of(model, batch):
    x, y = batch
    out = model(x)
    logits, side = out if isinstance(out, tuple) else (out, None)
    extra = side.float().pow(2).mean() if side is not None else 0.0
    return nn.functional.cross_entropy(logits.float(), y) + extra


def param_groups(model):
    """Net: two groups of trainable parameters (decay, no decay); squeezenet: ``model.parameters()``, one group."""
    if not isinstance(model, Net):
        return list(model.parameters())
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0, "lr": 0.02}]


def batch_for(kind, step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "net":
        return torch.randint(0, 11, (4,), generator=g), torch.randint(0, 11, (4,), generator=g)
    return torch.randn(2, 3, 48, 48, generator=g), torch.randint(0, 10, (2,), generator=g)


def train(out, config):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    *kind, stage, precision = config.split("-")
    kind = kind[0] if kind else "net"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    folder = os.path.join(out, f"{config}-w{world}")
    ds_dir = os.path.join(folder, "ds")
    model = make(kind)
    optimizer = torch.optim.AdamW(param_groups(model), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
        "zero_optimization": {"stage": int(stage[-1])}, "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told: an engine setting, not optimizer state
        "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    for step in range(STEPS):
        loss = loss_of(engine, batch_for(kind, step, rank))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ds_dir, client_state={"epoch": 3, "note": "seeded run"})
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link the moments lazily, and
        engine.optimizer._hp_optimizer_states_linked = False  # not on every path: link them now for the getters
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = dict(engine.module.named_parameters())
    moments = {key: {n: safe_get_full_optimizer_state(params[n], key).clone() for n in names}
               for key in ("exp_avg", "exp_avg_sq")}
    steps = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
    # one more step, every rank on the same batch so that the mean gradient is the single-batch gradient
    batch = batch_for(kind, 99, 0)
    engine.backward(loss_of(engine, batch))
    engine.step()
    engine.save_checkpoint(ds_dir, tag=f"global_step{STEPS + 1}", save_latest=False)
    next_fp32 = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
    torch.distributed.barrier()
    if rank == 0:
        reference = {"fp32": get_fp32_state_dict_from_zero_checkpoint(ds_dir), "steps": steps, "batch": batch,
                     "next_fp32": next_fp32, "param_names": names, **moments}
        torch.save(reference, os.path.join(folder, "reference.pt"))
    torch.distributed.barrier()
    engine.destroy()


def main():
    out, configs = sys.argv[1], sys.argv[2:]
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for config in configs:
        train(out, config)


if __name__ == "__main__":
    main()
