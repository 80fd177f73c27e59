"""Worker of tests/test_corpora.py: one process of a 2-process streamed read (2 dataloader workers each) over webdataset
shards, through the same pieces as `scripts/pretrain.py --streaming` (ShardedStream, the collator, `stream_batches`).

    torchrun --nproc_per_node 2 tests/stream_worker.py SHARDS STUDENT_DIR OUT_DIR

Writes `OUT_DIR/rank{r}.json`: for epochs 0 and 1, the clip keys this process consumed and its number of batches.
"""

import json
import os
import sys


def main(shards: str, student_dir: str, out_dir: str) -> None:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from clusterstm.data.readers import VideoTextCollator
    from clusterstm.data.sources import load_training_corpus
    from clusterstm.data.streaming import ShardedStream, StreamTracker
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.training.pretraining import cpu_distributed_launch, stream_batches

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=cpu_distributed_launch())
    corpus = load_training_corpus(train_file=shards, streaming=True)
    processor = ClusterSTMProcessor.from_pretrained(student_dir)
    collator = VideoTextCollator(processor, resolver=corpus.resolver)
    stream = ShardedStream(
        corpus.dataset,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=3,
        shuffle_buffer_size=4,
    )
    loader = DataLoader(stream, batch_size=2, collate_fn=collator, num_workers=2, drop_last=True)
    tracker = StreamTracker(2)
    record = {}
    for epoch in range(2):
        stream.set_epoch(epoch)
        tracker.start_epoch(epoch)
        keys, batches = [], 0
        for batch in stream_batches(loader, accelerator, tracker):
            keys.extend(batch["clip_key"])
            batches += 1
        record[str(epoch)] = {"keys": keys, "batches": batches, "state": tracker.state_dict()["workers"]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as handle:
        json.dump({k: {"keys": v["keys"], "batches": v["batches"]} for k, v in record.items()}, handle)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
