"""Worker of tests/test_distributed.py: one contrastive forward/backward over a fixed global batch.

Run with plain `python` (one process, the whole batch) or under `torchrun --nproc_per_node 2` (each process its
share); every process writes its local loss, its (DDP-averaged) gradients and its masks to `OUT/rank{r}.pt`.

    python tests/distributed_worker.py STUDENT_DIR OUT_DIR GLOBAL_BATCH
"""

import os
import sys
from types import SimpleNamespace

import torch


def main(student_dir: str, out_dir: str, global_batch: int) -> None:
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.training.pretraining import _unused_parameters_probe, cpu_distributed_launch, pretraining_forward

    accelerator = Accelerator(cpu=cpu_distributed_launch())
    rank, world = accelerator.process_index, accelerator.num_processes
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
    local = global_batch // world

    model = ClusterSTMForPreTraining.from_pretrained(student_dir)
    # Only the contrastive objective (its negatives cross processes); random masking checks that masks do not
    # depend on the split of the batch either.
    for name in ("relevance_loss_weight", "matching_loss_weight", "mlm_loss_weight", "alignment_loss_weight"):
        setattr(model.config, name, 0.0)
    masking = SimpleNamespace(
        mask_strategy="random", mask_ratio=0.5, dc_ratio=0.02, dpc_k=5, mask_features="teacher", seed=7
    )
    model.train()

    generator = torch.Generator().manual_seed(1234)
    vision = model.config.vision_config
    pixel_values = torch.randn(
        global_batch, vision.num_frames, 3, vision.image_size, vision.image_size, generator=generator
    )
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (global_batch, 12), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    attention_mask = torch.ones_like(input_ids)
    rows = slice(rank * local, (rank + 1) * local)
    batch = {"pixel_values": pixel_values[rows], "input_ids": input_ids[rows], "attention_mask": attention_mask[rows]}

    if world > 1:
        # As the training loop does: DDP needs the parameters this configuration never uses frozen.
        probe = {k: v.clone() for k, v in batch.items()}
        unused = set(_unused_parameters_probe(model, probe, lambda m, b: m(**b)))
        for name, parameter in model.named_parameters():
            if name in unused:
                parameter.requires_grad_(False)
    model = accelerator.prepare(model)
    outputs = pretraining_forward(model, batch, masking, step=0, sample_offset=rank * local)
    accelerator.backward(outputs.loss)
    inner = accelerator.unwrap_model(model)
    grads = {name: p.grad.detach().clone() for name, p in inner.named_parameters() if p.grad is not None}
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            "loss": outputs.loss.detach(),
            "contrastive_loss": outputs.contrastive_loss.detach(),
            "grads": grads,
            "bool_masked_pos": outputs.bool_masked_pos,
            "world": world,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
