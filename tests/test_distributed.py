"""Two REAL processes (torchrun, gloo on CPU) against one process over the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import make_tiny_student

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd, timeout=420):
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("student") / "ckpt", seed=0)


def test_two_processes_match_one_process_contrastive_loss_and_gradients(student, tmp_path):
    worker = str(REPO / "tests" / "distributed_worker.py")
    _run([sys.executable, worker, str(student), str(tmp_path / "one"), "4"])
    _run([*TORCHRUN, worker, str(student), str(tmp_path / "two"), "4"])

    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert one["world"] == 1 and all(r["world"] == 2 for r in ranks)
    # Each process returns the loss of its local rows against ALL gathered negatives; their mean is the global loss.
    global_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(global_loss, one["loss"], rtol=1e-5, atol=1e-6)
    # The two halves differ (a real split, not two copies of the same computation).
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
    # Masks depend on (seed, step, global sample index) only, not on the number of processes.
    torch.testing.assert_close(torch.cat([r["bool_masked_pos"] for r in ranks]), one["bool_masked_pos"])
    # DDP-averaged gradients of the local losses equal the gradient of the one-process loss over the global batch.
    assert set(one["grads"]) == set(ranks[0]["grads"])
    assert "clusterstm.logit_scale" in one["grads"] and "clusterstm.visual_projection.weight" in one["grads"]
    for name, grad in one["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], ranks[0]["grads"][name], rtol=0, atol=0, msg=name)


def test_two_process_pretraining_with_uneven_last_batch_finishes(student, tmp_path):
    out = tmp_path / "run"
    # 5 clips, 2 processes x 2 per device: one full global batch per epoch and one left-over clip, dropped on
    # every process alike (an uneven batch would make the contrastive all-gather hang).
    _run(
        [
            *TORCHRUN,
            "scripts/pretrain.py",
            "--model_name_or_path",
            str(student),
            "--dataset_name",
            "synthetic",
            "--num_train_clips",
            "5",
            "--output_dir",
            str(out),
            "--num_train_epochs",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--checkpointing_steps",
            "1",
            "--dataloader_num_workers",
            "0",
            "--logging_steps",
            "1",
            "--disable_tqdm",
        ],
        timeout=420,
    )
    results = json.loads((out / "train_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["global_step"] == 2 and results["train_global_batch_size"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all((p / "training_state.json").is_file() for p in out.glob("checkpoint-*"))
    assert not list(out.glob(".tmp-checkpoint-*"))
    # Both processes saved their RNG state into the same (atomically renamed) checkpoint.
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
