"""Streaming a corpus over processes and `DataLoader` workers, every sample exactly once per epoch, with exact resume.

[`ShardedStream`] wraps a `datasets.IterableDataset`. Each `DataLoader` worker of each process reads its own part
(`datasets.distributed.split_dataset_by_node` over `num_processes x num_workers` readers: whole shards when their
number divides evenly, else every n-th sample), so the union over readers is the corpus, once. Every row carries its
reader's position (samples read, and the `datasets` `state_dict()` when there is no shuffle buffer); the collator
moves the last one into the batch as `stream_position`, so the training loop knows, for each reader, what it really
consumed (not what workers prefetched). [`StreamTracker`] keeps those positions and turns them into the checkpoint's
stream state; a resumed stream restores each reader's position: with `shuffle_buffer_size=0` through
`IterableDataset.load_state_dict`, otherwise (a shuffle buffer's content is not in a `state_dict`) by replaying the
reader from the start of the epoch without decoding anything. `DataLoader` takes batches from its workers in turn;
after a resume the reader that was next is made worker 0's, so the batch order is the uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

#: Key of the per-row position added by [`ShardedStream`] (removed by the collator).
STREAM_POSITION_KEY = "__stream_position__"


class ShardedStream(torch.utils.data.IterableDataset):
    """
    A `torch` iterable over one process' share of a `datasets.IterableDataset`, split further over the `DataLoader`
    workers.

    Args:
        dataset: The full stream (every process passes the same one).
        rank / world_size: This process and the number of processes.
        seed: Seed of the per-epoch shard order and shuffle buffer (the same on every process).
        shard_files: Webdataset shards of `dataset`, checked to name the corrupt one when reading fails.
        shuffle_buffer_size: Samples in each reader's shuffle buffer; with a buffer the shard order is reshuffled
            every epoch too (`IterableDataset.shuffle`). 0: the corpus order, restored by `load_state_dict`.
    """

    def __init__(
        self,
        dataset: Any,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 0,
        shard_files: list[str] | None = None,
    ):
        super().__init__()
        self.shard_files = list(shard_files or [])
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epoch = 0
        self.resume_state: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume from [`StreamTracker.state_dict`] (applies to the epoch it was saved in)."""
        self.resume_state = copy.deepcopy(state) if state else None

    def reader(self, logical_worker: int, num_workers: int) -> Any:
        """The `datasets.IterableDataset` read by worker `logical_worker` of this process, for the current epoch."""
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if self.shuffle_buffer_size > 0:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        dataset = split_dataset_by_node(
            dataset, rank=self.rank * num_workers + logical_worker, world_size=self.world_size * num_workers
        )
        dataset.set_epoch(self.epoch)
        return dataset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        resume = self.resume_state if self.resume_state and self.resume_state.get("epoch") == self.epoch else None
        if resume is not None and resume.get("num_workers", num_workers) != num_workers:
            raise ValueError(
                f"The checkpoint's stream was read by {resume['num_workers']} dataloader workers per process; resume "
                f"with the same --dataloader_num_workers (got {num_workers})."
            )
        logical = (worker + (resume or {}).get("batch_offset", 0)) % num_workers
        reader = self.reader(logical, num_workers)
        saved = ((resume or {}).get("workers") or {}).get(str(logical))
        count, skip = 0, 0
        if saved:
            count = int(saved["examples"])
            if self.shuffle_buffer_size == 0 and saved.get("state_dict") is not None:
                reader.load_state_dict(saved["state_dict"])
            else:
                skip = count
        track_state = self.shuffle_buffer_size == 0
        for i, batch in enumerate(self._rows(reader)):
            if i < skip:
                continue  # replaying a shuffled reader up to its saved position: rows only, nothing decoded
            count += 1
            row = {key: values[0] for key, values in batch.items()}
            row[STREAM_POSITION_KEY] = {
                "worker": logical,
                "examples": count,
                "state_dict": reader.state_dict() if track_state else None,
            }
            yield row

    def _rows(self, reader: Any):
        try:
            yield from reader.iter(batch_size=1)
        except Exception as error:
            if self.shard_files:
                from .sources import find_corrupt_shard

                found = find_corrupt_shard(self.shard_files)
                if found is not None:
                    shard, message, last_key = found
                    after = f" after sample key {last_key!r}" if last_key else " before its first sample"
                    raise ValueError(
                        f"Corrupt or truncated webdataset shard {shard!r}: {message}{after} ({type(error).__name__})."
                    ) from error
            raise


class StreamTracker:
    """
    Positions of the readers of one process, updated from the `stream_position` of every consumed batch.

    Args:
        num_workers: `DataLoader` workers of this process (0 counts as 1 reader, the main process).
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = max(1, num_workers)
        self.epoch = 0
        self.batch_offset = 0  # logical reader of the loader's worker 0
        self.consumed = 0  # batches consumed since the loader started
        self.workers: dict[str, dict[str, Any]] = {}

    def start_epoch(self, epoch: int, state: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.consumed = 0
        if state and state.get("epoch") == epoch:
            self.batch_offset = int(state.get("batch_offset", 0))
            self.workers = copy.deepcopy(state.get("workers") or {})
        else:
            self.batch_offset = 0
            self.workers = {}

    def update(self, position: dict[str, Any] | None) -> None:
        self.consumed += 1
        if position is not None:
            self.workers[str(position["worker"])] = {
                "examples": int(position["examples"]),
                "state_dict": position.get("state_dict"),
            }

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "num_workers": self.num_workers,
            "batch_offset": (self.batch_offset + self.consumed) % self.num_workers,
            "workers": copy.deepcopy(self.workers),
        }


__all__ = ["STREAM_POSITION_KEY", "ShardedStream", "StreamTracker"]
