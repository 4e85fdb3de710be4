"""A ZeRO-3 engine's weights as users save them, written by DeepSpeed itself on the CPU with one process:

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 1 tests/deepspeed_writers/zero3_module_state.py OUT

writes ``OUT/ds/`` (``engine.save_checkpoint``: its ``zero_pp_rank_0_mp_rank_00_model_states.pt`` holds the
partitioned placeholders in ``module`` and the real shapes in ``param_shapes``), ``OUT/module_state_dict.pt``
(``torch.save(engine.module.state_dict())``, as users save a model), ``OUT/shapes.pt`` (every parameter's real shape,
as DeepSpeed knows it: ``param.ds_shape``) and ``OUT/reference.pt`` (DeepSpeed's own consolidated weights:
``get_fp32_state_dict_from_zero_checkpoint``). The model, optimizer and batch are train.py's.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def main():
    out = sys.argv[1]
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = train.make("net")
    optimizer = torch.optim.AdamW(train.param_groups(model), lr=0.01)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.backward(train.loss_of(engine, train.batch_for("net", 0, 0)))
    engine.step()
    engine.save_checkpoint(os.path.join(out, "ds"))
    torch.save(engine.module.state_dict(), os.path.join(out, "module_state_dict.pt"))
    torch.save({n: tuple(p.ds_shape) for n, p in engine.module.named_parameters()}, os.path.join(out, "shapes.pt"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    torch.save(get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "ds")), os.path.join(out, "reference.pt"))
    engine.destroy()


if __name__ == "__main__":
    main()
