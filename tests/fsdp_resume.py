"""Resume FSDP2 training from a DCP folder ckconv wrote. Run under torchrun (gloo, CPU):

    torchrun --nproc-per-node 2 tests/fsdp_resume.py MODEL DCP_DIR BATCH OUT

MODEL is ``net`` (tests/deepspeed_writers/train.py's Net with its two param groups) or ``mlp`` (:func:`mlp`, one
group: ``AdamW(model.parameters())``). Every rank builds the model, shards it with ``fully_shard`` (FSDP2), builds
AdamW and resumes the way torch documents it: ``get_state_dict`` -> ``dcp.load`` -> ``set_state_dict``. Then one
step on BATCH (``torch.save``'d inputs and targets, the same on every rank, so the averaged gradient is the
batch's own) and rank 0 saves to OUT every parameter after the step and the optimizer state, as full tensors keyed
by parameter name.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "deepspeed_writers"))
import train  # noqa: E402  (Net, its param groups, its loss)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def model_of(kind):
    return train.make("net") if kind == "net" else mlp()


def optimizer_of(kind, model):
    """AdamW as the run that saved the checkpoint built it (its values come from the checkpoint)."""
    if kind == "net":
        return torch.optim.AdamW(train.param_groups(model), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def resume(kind, folder, batch, work, timeout=300) -> dict:
    """Run this script on two ranks for the DCP ``folder``; -> what rank 0 saved (``params``, ``optimizer``)."""
    import socket
    import subprocess

    work = Path(work)
    torch.save(batch, work / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", f"127.0.0.1:{port}", __file__, kind, str(folder),
                           str(work / "batch.pt"), str(work / "resumed.pt")],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(work / "resumed.pt", weights_only=True)


def main():
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.fsdp import fully_shard

    kind, folder, batch_file, out = sys.argv[1:5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = model_of(kind)
    fully_shard(model)  # before the optimizer: it must hold the sharded parameters
    optimizer = optimizer_of(kind, model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    batch = torch.load(batch_file, weights_only=True)
    optimizer.zero_grad()
    train.loss_of(model, batch).backward()
    optimizer.step()
    params = {n: p.full_tensor() for n, p in model.named_parameters()}  # every rank takes part in the gathers
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        torch.save({"params": params, "optimizer": full, "world": dist.get_world_size(),
                    "sharded": sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")},
                   out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
