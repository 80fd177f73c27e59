"""Can the matching head learn, and can it re-rank? A probe of the fusion layers + matching head alone.

The towers of a checkpoint (`--checkpoint`, e.g. a pretrained run of `ablation.py matching`; default: a freshly
initialised tiny ClusterSTM) encode `--num_clips` synthetic training clips and the benchmark's test clips once
(unmasked) and stay frozen; only the fusion layers and the matching head train, with the product's
`video_text_matching_loss` (negatives drawn from the frozen contrastive similarities; with a fresh checkpoint use
`--negatives uniform`). So the probe asks what the matching path itself can learn from fixed video tokens, given far
more steps than pretraining gives it.

Every `--eval_every` steps it reports, on the test clips: how often the match probability of a caption's own clip
beats the other clip the contrastive similarity ranks highest (the candidates re-ranking must demote; `win_hard` per
caption, `auc_hard` over all caption pairs; 0.5 = chance),
and text->video R@1 ranked by the contrastive similarity vs after the head re-ranks the top 16 (by its probability
alone, `ClusterSTMForVideoTextRetrieval.rerank`).

`--head_input` chooses how the head reads the fused caption tokens: `mean` and `softmin` are the product's
`matching_pooling` settings (`matching_logits`); `cls` reads the fused [CLS] state alone (the head before issue 21).

Usage:

    python benchmarks/matching_probe.py --head_input mean --negatives uniform --steps 150
    python benchmarks/matching_probe.py --checkpoint RUN/pretrained --head_input softmin --negatives hard --steps 800
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import clusterstm.models.modeling_clusterstm as modeling
from clusterstm.data.synthetic import SyntheticVideoTextConfig, generate_synthetic_benchmark
from clusterstm.hub.export import init_checkpoint
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
from clusterstm.training.teacher_training import normalize_frames

RERANK_TOP_K = 16


def load_model(
    checkpoint: str | None, seed: int
) -> tuple[modeling.ClusterSTMForVideoTextRetrieval, ClusterSTMProcessor]:
    if checkpoint is not None:
        model = modeling.ClusterSTMForVideoTextRetrieval.from_pretrained(checkpoint, use_safetensors=True)
        return model, ClusterSTMProcessor.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        init_checkpoint("tiny", folder, seed=seed)
        return modeling.ClusterSTMForVideoTextRetrieval.from_pretrained(folder), ClusterSTMProcessor.from_pretrained(
            folder
        )


@torch.no_grad()
def encode_split(model, processor, split: dict, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Frozen tower outputs of one split: video tokens and embeddings, text states and embeddings, token ids."""
    videos = np.asarray(split["video"])
    # The checkpoint's frame count, evenly subsampled from the benchmark's clips (as the ablation grids do).
    num_frames = model.config.vision_config.num_frames
    videos = videos[:, :: max(1, videos.shape[1] // num_frames)][:, :num_frames]
    tokens = processor.tokenizer(
        list(split["caption"]), padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    video_embeds, video_tokens = zip(
        *(
            model.encode_videos(normalize_frames(videos[i : i + batch_size]), return_tokens=True)
            for i in range(0, len(videos), batch_size)
        )
    )
    text = model.clusterstm.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return {
        "video_embeds": torch.cat(video_embeds),
        "video_tokens": torch.cat(video_tokens),
        "text_states": text.last_hidden_state,
        "text_embeds": model.encode_texts(tokens["input_ids"], tokens["attention_mask"]),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }


@torch.no_grad()
def evaluate(model, test: dict[str, torch.Tensor]) -> dict[str, float]:
    """AUC vs the hardest other clip, and t2v R@1 by contrastive similarity vs after re-ranking the top 16."""
    model.eval()
    ids, mask, tokens = test["input_ids"], test["attention_mask"], test["video_tokens"]
    similarity = test["text_embeds"] @ test["video_embeds"].T
    truth = torch.arange(similarity.shape[0])
    hardest = similarity.clone().fill_diagonal_(-torch.inf).argmax(dim=1)
    positive = model.match_scores(tokens, ids, mask)
    negative = model.match_scores(tokens[hardest], ids, mask)

    def win_rate(pos: torch.Tensor, neg: torch.Tensor) -> float:
        return round(((pos > neg).float() + 0.5 * (pos == neg).float()).mean().item(), 4)

    reranked = model.rerank(similarity, tokens, ids, mask, top_k=RERANK_TOP_K, fusion="matching")
    model.train()
    return {
        "win_hard": win_rate(positive, negative),
        "auc_hard": win_rate(positive[:, None], negative[None]),
        "t2v_r1_contrastive": round(100.0 * (similarity.argmax(1) == truth).float().mean().item(), 1),
        "t2v_r1_reranked": round(100.0 * (reranked.argmax(1) == truth).float().mean().item(), 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="Towers to freeze (default: a fresh tiny ClusterSTM).")
    parser.add_argument("--head_input", choices=("cls", "mean", "softmin"), default="mean")
    parser.add_argument("--negatives", choices=modeling.MATCHING_NEGATIVES, default="uniform")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_clips", type=int, default=256, help="Synthetic training clips.")
    parser.add_argument("--num_test", type=int, default=100, help="Synthetic test clips (evaluation).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--eval_every", type=int, default=100, help="0: evaluate at the end only.")
    parser.add_argument("--output_file", default=None, help="Also write the log as JSON here.")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model, processor = load_model(args.checkpoint, args.seed)
    if args.head_input == "cls":
        # The pre-issue-21 head: the fused [CLS] state alone.
        modeling.matching_features = lambda fused, attention_mask: fused[:, 0]
        model.config.matching_pooling = "mean"
    else:
        model.config.matching_pooling = args.head_input
    model.requires_grad_(False)
    params = [*model.fusion_model.parameters(), *model.itm_head.parameters()]
    for param in params:
        param.requires_grad_(True)

    data = generate_synthetic_benchmark(
        SyntheticVideoTextConfig(num_train=args.num_clips, num_val=0, num_test=args.num_test, num_compositional=0),
        splits=("train", "test"),
    )
    model.eval()
    train, test = encode_split(model, processor, data["train"]), encode_split(model, processor, data["test"])
    model.train()
    scale = model.clusterstm.logit_scale.exp().detach()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    settings = {"checkpoint": args.checkpoint, "head_input": args.head_input, "negatives": args.negatives}
    history, log, start = [], [{**settings, "step": 0, **evaluate(model, test)}], time.perf_counter()
    print(json.dumps(log[0]), flush=True)
    for step in range(1, args.steps + 1):
        idx = torch.randperm(args.num_clips, generator=generator)[: args.batch_size]
        loss = modeling.video_text_matching_loss(
            model.fusion_model,
            model.itm_head,
            train["text_states"][idx],
            train["attention_mask"][idx],
            train["video_tokens"][idx],
            scale * train["text_embeds"][idx] @ train["video_embeds"][idx].T,
            input_ids=train["input_ids"][idx],
            negatives=args.negatives,
            pooling=model.config.matching_pooling,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
        evaluate_now = step == args.steps or (args.eval_every > 0 and step % args.eval_every == 0)
        if step % args.log_every == 0 or evaluate_now:
            window = history[-args.log_every :]
            entry = {
                **settings,
                "step": step,
                "matching_loss_mean_last": round(sum(window) / len(window), 4),
                **(evaluate(model, test) if evaluate_now else {}),
                "seconds": round(time.perf_counter() - start, 1),
                "load": round(os.getloadavg()[0], 2),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
