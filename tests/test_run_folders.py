"""Output folders, run identity, checkpoint integrity, model card, launcher precision and the host-sync-free loop."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_helpers import make_tiny_student
from safetensors.torch import load_file

from clusterstm.training import pretraining
from clusterstm.training.checkpointing import (
    CHECKPOINT_MARKER,
    CheckpointIntegrityError,
    OutputFolderError,
    find_latest_checkpoint,
    rotate_checkpoints,
)
from clusterstm.training.pretraining import PretrainingArguments, run_pretraining

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("models") / "student", seed=0)


def _args(student, out, **kwargs):
    base = dict(
        model_name_or_path=str(student),
        output_dir=str(out),
        dataset_name="synthetic",
        num_train_clips=8,
        per_device_train_batch_size=4,
        max_steps=4,
        checkpointing_steps=2,
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to="none",
        learning_rate=1e-3,
        mask_strategy="random",
    )
    base.update(kwargs)
    return PretrainingArguments(**base)


def _marker(checkpoint):
    return json.loads((checkpoint / CHECKPOINT_MARKER).read_text())


def test_reused_output_dir_is_refused_unless_overwrite(student, tmp_path):
    out = tmp_path / "run"
    run_pretraining(_args(student, out))
    first_id = _marker(out / "checkpoint-4")["run_identity"]["run_id"]
    with pytest.raises(OutputFolderError, match=r"already holds checkpoints .*checkpoint-2, checkpoint-4"):
        run_pretraining(_args(student, out, max_steps=2))
    # The refused run touched nothing.
    assert _marker(out / "checkpoint-4")["run_identity"]["run_id"] == first_id
    results = run_pretraining(_args(student, out, max_steps=2, overwrite_output_dir=True))
    assert results["global_step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    second_id = _marker(out / "checkpoint-2")["run_identity"]["run_id"]
    assert second_id != first_id and results["run_id"] == second_id


def _fake_checkpoint(root, step, run_id, saved_at):
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    state = {"global_step": step, "saved_at": saved_at, "run_identity": {"run_id": run_id, "settings": {}}}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(state))


def test_rotation_never_deletes_the_current_runs_newest(tmp_path):
    # An older run's checkpoints at higher steps, then this run's 1..4: sorting by step would delete this run's.
    _fake_checkpoint(tmp_path, 5, "old", saved_at=10)
    _fake_checkpoint(tmp_path, 6, "old", saved_at=11)
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step, "new", saved_at=100 + step)
    deleted = rotate_checkpoints(tmp_path, 2, run_id="new")
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2", "checkpoint-5", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    # `latest` is the newest saved, not the highest step.
    _fake_checkpoint(tmp_path, 9, "new", saved_at=50)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_resume_with_changed_settings_names_the_difference(student, tmp_path):
    out = tmp_path / "run"
    run_pretraining(_args(student, out, max_steps=2))
    resume = str(out / "checkpoint-2")
    with pytest.raises(OutputFolderError, match=r"mask_ratio: 0\.8 -> 0\.5.*per_device_train_batch_size: 4 -> 2"):
        run_pretraining(
            _args(
                student, out, resume_from_checkpoint=resume, max_steps=3, mask_ratio=0.5, per_device_train_batch_size=2
            )
        )
    with pytest.raises(OutputFolderError, match=r"mlm_loss_weight: 1\.0 -> 0\.0"):
        changed = make_tiny_student(tmp_path / "changed", seed=0, mlm_loss_weight=0.0)
        run_pretraining(_args(changed, out, resume_from_checkpoint=resume, max_steps=3))
    results = run_pretraining(
        _args(student, out, resume_from_checkpoint=resume, max_steps=3, mask_ratio=0.5, ignore_resume_mismatch=True)
    )
    assert results["global_step"] == 3
    # Same run id: the resumed run is the same run, with its new settings recorded.
    identity = _marker(out / "checkpoint-2")["run_identity"]
    assert results["run_id"] == identity["run_id"]


def test_corrupted_weights_fall_back_or_are_named(student, tmp_path, caplog):
    out = tmp_path / "run"
    run_pretraining(_args(student, out, max_steps=4))
    # Copies: safetensors may map the file, which is rewritten below.
    intact = {name: t.clone() for name, t in load_file(out / "checkpoint-4" / "model.safetensors").items()}
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(255 - b for b in data[-100:-90])  # flipped bytes inside the tensor data, same size
    weights.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        results = run_pretraining(_args(student, out, max_steps=4, resume_from_checkpoint="latest"))
    assert any(
        "checkpoint-4" in r.getMessage() and "model.safetensors" in r.getMessage() and "altered" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    # Resumed from checkpoint-2 and retrained steps 3-4: the same weights as the uninterrupted run.
    assert results["global_step"] == 4
    rewritten = load_file(out / "checkpoint-4" / "model.safetensors")
    for name, tensor in intact.items():
        assert torch.equal(tensor, rewritten[name]), name

    # Truncated, named explicitly: the error names the file.
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CheckpointIntegrityError, match=r"checkpoint-4/model\.safetensors is truncated"):
        run_pretraining(_args(student, out, max_steps=4, resume_from_checkpoint=str(out / "checkpoint-4")))
    # Every checkpoint damaged: `latest` refuses, naming the newest bad file.
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "optimizer.bin").write_bytes(b"x")
    with pytest.raises(CheckpointIntegrityError, match="No intact checkpoint"):
        run_pretraining(_args(student, out, max_steps=4, resume_from_checkpoint="latest"))


def test_pretraining_output_has_a_pushable_model_card(student, tmp_path):
    from clusterstm.hub.publish import find_missing_checkpoint_files

    out = tmp_path / "run"
    run_pretraining(_args(student, out, max_steps=1, checkpointing_steps=None))
    assert find_missing_checkpoint_files(out) == []
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card
    assert str(student) not in card and str(tmp_path) not in card  # no local absolute paths


def test_launcher_decides_precision(student, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = [
        "scripts/pretrain.py",
        "--model_name_or_path",
        str(student),
        "--dataset_name",
        "synthetic",
        "--num_train_clips",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--report_to",
        "none",
        "--disable_tqdm",
        "--mask_strategy",
        "random",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--mixed_precision",
        "bf16",
        "--num_processes",
        "1",
        "--cpu",
    ]
    result = subprocess.run(
        launch + common + ["--output_dir", str(tmp_path / "a")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "train_results.json").read_text())["mixed_precision"] == "bf16"
    # An explicit flag wins over the launcher, and says so.
    result = subprocess.run(
        [sys.executable] + common + ["--output_dir", str(tmp_path / "b"), "--mixed_precision", "no"],
        cwd=REPO,
        env=dict(env, ACCELERATE_MIXED_PRECISION="bf16"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "train_results.json").read_text())["mixed_precision"] == "no"
    assert "overrides the launcher's bf16" in result.stderr


def test_hot_loop_reads_the_device_only_at_logging_steps(student, tmp_path, monkeypatch):
    """Host reads (`item`, `tolist`, `bool`, `float`, `int`) made by the training loop's own code: only the
    statistics flushes of logging/checkpoint steps and the end, never per micro-batch or per step."""
    reads = []
    source = pretraining.__file__

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            # The sampler's once-per-epoch order is a CPU tensor made on the host: not a device read.
            if caller.f_code.co_filename == source and caller.f_code.co_name != "__iter__":
                reads.append((name, caller.f_code.co_name, caller.f_lineno))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counting(name)
    results = run_pretraining(
        _args(
            student,
            tmp_path / "run",
            max_steps=4,
            checkpointing_steps=None,
            logging_steps=2,
            gradient_accumulation_steps=2,
        )
    )
    monkeypatch.undo()
    assert results["global_step"] == 4
    # Logging at steps 2 and 4, plus the final flush: 3 reads for 4 steps x 2 micro-batches.
    assert reads == [("tolist", "flush", reads[0][2])] * 3, reads


def test_nan_policy_skip_is_device_side_and_leaves_the_optimizer_untouched(student, tmp_path, monkeypatch):
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    original = ClusterSTMForPreTraining.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(ClusterSTMForPreTraining, "forward", forward)
    results = run_pretraining(_args(student, tmp_path / "run", max_steps=3, checkpointing_steps=3, nan_policy="skip"))
    assert results["nan_steps_skipped"] == 1 and results["global_step"] == 3
    optimizer_state = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.bin", weights_only=False)
    steps = {float(s["step"]) for s in optimizer_state["state"].values()}
    assert steps == {2.0}  # the skipped step advanced no parameter's Adam step count
    assert all(torch.isfinite(v).all() for s in optimizer_state["state"].values() for v in s.values())


def test_build_optimizer_is_fused_on_cpu_and_cuda(student):
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    model = ClusterSTMForPreTraining.from_pretrained(student)
    optimizer = pretraining.build_optimizer(model, _args(student, "o"))
    assert optimizer.defaults["fused"] is True
    model.to("meta")
    assert not pretraining.build_optimizer(model, _args(student, "o")).defaults["fused"]


def test_fsdp_final_save_uses_the_gathered_state_dict(student, tmp_path):
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    model = ClusterSTMForPreTraining.from_pretrained(student)
    processor = ClusterSTMProcessor.from_pretrained(student)
    gathered = {name: torch.full_like(value, 0.5) for name, value in model.state_dict().items()}
    pretraining.save_final_model(model, processor, tmp_path / "out", state_dict=gathered)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved and all(torch.equal(value, torch.full_like(value, 0.5)) for value in saved.values())
    assert saved["clusterstm.logit_scale"].shape == (1,)
    assert "save_pretrained" not in vars(model)  # the override is gone again
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.skipif(
    os.environ.get("CLUSTERSTM_TEST_COMPILE") != "1",
    reason="torch.compile of the whole pretraining model takes ~5 min on 2 shared CPU cores; set CLUSTERSTM_TEST_COMPILE=1",
)
def test_torch_compile_two_steps(student, tmp_path):
    start = time.perf_counter()
    results = run_pretraining(
        _args(student, tmp_path / "run", max_steps=2, checkpointing_steps=None, torch_compile=True)
    )
    assert results["global_step"] == 2 and torch.isfinite(torch.tensor(results["train_loss"]))
    print(f"2 compiled steps in {time.perf_counter() - start:.1f}s")


def test_deepspeed_config_validates():
    """accelerate_configs' DeepSpeed config, with the `auto` values Accelerate fills from the script, as DeepSpeed
    itself parses it (skipped where `deepspeed` is not installed)."""
    pytest.importorskip("deepspeed")
    import yaml
    from deepspeed.runtime.config import DeepSpeedConfig

    launcher = yaml.safe_load((REPO / "accelerate_configs" / "deepspeed_zero2.yaml").read_text())
    assert launcher["distributed_type"] == "DEEPSPEED"
    config = json.loads((REPO / launcher["deepspeed_config"]["deepspeed_config_file"]).read_text())
    filled = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
    }
    config.update({key: value for key, value in filled.items() if config.get(key) == "auto"})
    config["bf16"]["enabled"], config["fp16"]["enabled"] = True, False
    parsed = DeepSpeedConfig(config, world_size=1)
    assert parsed.zero_optimization_stage == 2 and parsed.bf16_enabled


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_full_disk_is_named(student, tmp_path, monkeypatch, where):
    import errno

    from accelerate import Accelerator

    from clusterstm.training.errors import DiskFullError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(Accelerator, "save_state", full)
    else:
        monkeypatch.setattr(pretraining, "save_final_model", full)
    with pytest.raises(
        DiskFullError, match=r"The disk is full.*" + ("checkpoint-1" if where == "checkpoint" else "final model")
    ):
        run_pretraining(_args(student, tmp_path / "run", max_steps=1, checkpointing_steps=1))
