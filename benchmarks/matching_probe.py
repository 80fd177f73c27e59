"""Can the matching head learn? A probe of the fusion layers + matching head alone, on fixed tower outputs.

The towers of a freshly initialised tiny ClusterSTM encode `--num_clips` synthetic training clips once (no masking);
then only the fusion layers and the matching head train with the product's `video_text_matching_loss` (uniform
negatives: the contrastive logits are all 0), so that the only thing that can keep the loss at its 1:2 prior
(entropy 0.6365) is the matching path itself. `--head_input cls` reads the fused [CLS] state (the head before
issue 21), `--head_input mean` the caption-token mean (`matching_features`, the product's head now).

Usage:

    python benchmarks/matching_probe.py --head_input cls --steps 150
    python benchmarks/matching_probe.py --head_input mean --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import clusterstm.models.modeling_clusterstm as modeling
from clusterstm.data.synthetic import SyntheticVideoTextConfig, generate_split_metadata, render_clips
from clusterstm.hub.export import init_checkpoint
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head_input", choices=("cls", "mean"), default="mean")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_clips", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=25)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    if args.head_input == "cls":
        # The pre-issue-21 head: the fused [CLS] state alone.
        modeling.matching_features = lambda fused, attention_mask: fused[:, 0]
    with tempfile.TemporaryDirectory() as folder:
        init_checkpoint("tiny", folder, seed=args.seed)
        model = modeling.ClusterSTMForPreTraining.from_pretrained(folder)
        processor = ClusterSTMProcessor.from_pretrained(folder)
    config = SyntheticVideoTextConfig(num_train=args.num_clips)
    rows = generate_split_metadata(config, "train")
    video = render_clips(rows, config)
    inputs = processor(
        videos=list(video),
        text=[row["caption"] for row in rows],
        padding="max_length",
        max_length=32,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        video_tokens = torch.cat(
            [
                model.clusterstm.vision_model(pixel_values=inputs["pixel_values"][i : i + 32]).last_hidden_state
                for i in range(0, len(rows), 32)
            ]
        )
        text_states = model.clusterstm.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
    params = list(model.fusion_model.parameters()) + list(model.itm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    history, log, start = [], [], time.perf_counter()
    for step in range(args.steps):
        idx = torch.randperm(len(rows), generator=generator)[: args.batch_size]
        loss = modeling.video_text_matching_loss(
            model.fusion_model,
            model.itm_head,
            text_states[idx],
            inputs["attention_mask"][idx],
            video_tokens[idx],
            torch.zeros(len(idx), len(idx)),
            input_ids=inputs["input_ids"][idx],
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            window = history[-args.log_every :]
            entry = {
                "head_input": args.head_input,
                "step": step + 1,
                "matching_loss_mean_last": round(sum(window) / len(window), 4),
                "seconds": round(time.perf_counter() - start, 1),
                "load": round(os.getloadavg()[0], 2),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return log


if __name__ == "__main__":
    main()
