"""Crash-safe, verifiable training checkpoints and the output folders that hold them.

A checkpoint `output_dir/checkpoint-{step}` is written into a hidden temporary folder and renamed into place only once
complete. Its completion marker (`training_state.json`, written last) carries:

- the training state (step, loss sums, scheduler...);
- the run's identity (`run_identity`: a run id and the settings that change the result), so that a folder is never
  silently shared by two runs and a resume with other settings is refused, naming the difference;
- the save time (`saved_at`, nanoseconds), the order rotation and `latest` use (not the step number, which repeats
  across runs and after resuming from an earlier checkpoint);
- the sha256 of every other file of the checkpoint (`checksums`): resume verifies them, names a truncated or altered
  file, and `latest` falls back to the newest intact checkpoint with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint folder, just before it is renamed into place: a folder without it is incomplete.
CHECKPOINT_MARKER = "training_state.json"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
RUN_IDENTITY_KEY = "run_identity"


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or altered (its sha256 differs from the one recorded at save time)."""


class OutputFolderError(ValueError):
    """The output folder holds another run's checkpoints, or a resume would change the run's settings."""


# ----------------------------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------------------------


def new_run_id() -> str:
    """A fresh run id (random: two runs started with the same settings are still two runs)."""
    return uuid.uuid4().hex[:16]


def run_identity(run_id: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The identity a checkpoint records: the run id and the settings that change the result (JSON-normalised)."""
    return {"run_id": run_id, "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))}


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`name: saved -> current` for every result-changing setting that differs (settings missing on one side
    included)."""
    current = json.loads(json.dumps(current, sort_keys=True, default=str))
    differences = []
    for name in sorted(set(saved) | set(current)):
        if saved.get(name, "<unset>") != current.get(name, "<unset>"):
            differences.append(f"{name}: {saved.get(name, '<unset>')!r} -> {current.get(name, '<unset>')!r}")
    return differences


def read_checkpoint_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The content of a checkpoint's completion marker."""
    return json.loads((Path(checkpoint) / CHECKPOINT_MARKER).read_text())


def check_resume_settings(
    checkpoint: str | os.PathLike, settings: dict[str, Any], ignore_mismatch: bool = False
) -> str | None:
    """
    Compares the settings `checkpoint` was trained with to this run's `settings`; returns the checkpoint's run id
    (`None` for a checkpoint written before run identities existed).

    Raises:
        OutputFolderError: naming every differing setting, unless `ignore_mismatch` (then a warning names them).
    """
    identity = read_checkpoint_state(checkpoint).get(RUN_IDENTITY_KEY)
    if identity is None:
        logger.warning("%s records no run identity (an older checkpoint): its settings cannot be checked.", checkpoint)
        return None
    differences = settings_differences(identity.get("settings", {}), settings)
    if differences:
        listed = "; ".join(differences)
        if not ignore_mismatch:
            raise OutputFolderError(
                f"Resuming from {checkpoint} with settings that change the result ({listed}). Resume with the "
                "checkpoint's settings, start a new run in another --output_dir, or pass --ignore_resume_mismatch "
                "to continue deliberately with the new settings."
            )
        logger.warning("--ignore_resume_mismatch: resuming %s with changed settings (%s).", checkpoint, listed)
    return identity.get("run_id")


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool) -> list[Path]:
    """
    Checks (and with `overwrite`, clears) `output_dir` before a run starts writing into it; main process only.

    A fresh run (not `resuming`) refuses a folder that holds checkpoints (complete or not) of another run: its own
    rotation and `--resume_from_checkpoint latest` would otherwise mix the two runs. With `overwrite`, those
    checkpoints, the training log and the previous results are removed first. Returns the removed paths.

    Raises:
        OutputFolderError: naming the folder and the checkpoints found.
    """
    root = Path(output_dir)
    if resuming or not root.is_dir():
        return []
    # Crash debris (.tmp-checkpoint-*) is removed by every start anyway; `checkpoint-*` folders are a run's.
    found = sorted(path for path in root.iterdir() if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX))
    if not found:
        return []
    if not overwrite:
        names = ", ".join(path.name for path in found[:5]) + (" ..." if len(found) > 5 else "")
        raise OutputFolderError(
            f"--output_dir {root} already holds checkpoints of another run ({names}). Pass --overwrite_output_dir "
            "to remove them and start over, --resume_from_checkpoint to continue that run, or use another folder."
        )
    removed = []
    for path in found + [root / "logs", root / "train_results.json"]:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
        elif path.is_file():
            path.unlink()
            removed.append(path)
    logger.warning("--overwrite_output_dir: removed %d previous checkpoint(s) and logs from %s.", len(found), root)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Listing, ordering, integrity
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def _save_order(path: Path, step: int) -> tuple[int, int]:
    """Save time first (older checkpoints without one sort before every timed one), then the step."""
    try:
        saved_at = int(read_checkpoint_state(path).get("saved_at", 0))
    except (OSError, ValueError):
        saved_at = 0
    return saved_at, step


def list_complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-{step}` folders of `output_dir` that carry the completion marker, oldest first (in the order they
    were saved; the step breaks ties and orders checkpoints written before save times were recorded)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _checkpoint_step(path)
        if step is not None and path.is_dir() and (path / CHECKPOINT_MARKER).is_file():
            found.append((_save_order(path, step), path))
    return [path for _, path in sorted(found)]


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """The sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_checksums(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{relative path: {"sha256", "size"}}` of every file of a checkpoint folder but its completion marker."""
    root = Path(folder)
    checksums = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != CHECKPOINT_MARKER:
            checksums[path.relative_to(root).as_posix()] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return checksums


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """
    Verifies every file recorded in a checkpoint's marker against its size and sha256.

    Raises:
        CheckpointIntegrityError: naming the missing, truncated or altered file.
    """
    root = Path(checkpoint)
    recorded = read_checkpoint_state(root).get("checksums")
    if recorded is None:
        logger.warning("%s records no checksums (an older checkpoint): its files cannot be verified.", root)
        return
    for name, expected in recorded.items():
        path = root / name
        if not path.is_file():
            raise CheckpointIntegrityError(f"Checkpoint {root} is damaged: {path} is missing.")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointIntegrityError(
                f"Checkpoint {root} is damaged: {path} is truncated or extended ({size} bytes, "
                f"{expected['size']} when saved)."
            )
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointIntegrityError(
                f"Checkpoint {root} is damaged: {path} was altered (its sha256 differs from the one recorded when it "
                "was saved)."
            )


def find_latest_checkpoint(output_dir: str | os.PathLike, verify: bool = False) -> Path | None:
    """The newest complete checkpoint of `output_dir`, or None. Half-written checkpoints are never returned.

    With `verify`, damaged checkpoints are skipped with a warning naming the bad file (falling back to the newest
    intact one); if every checkpoint is damaged, the newest one's `CheckpointIntegrityError` is raised.
    """
    checkpoints = list_complete_checkpoints(output_dir)
    if not verify:
        return checkpoints[-1] if checkpoints else None
    first_error = None
    for path in reversed(checkpoints):
        try:
            verify_checkpoint(path)
        except CheckpointIntegrityError as error:
            logger.warning("%s Falling back to an earlier checkpoint.", error)
            first_error = first_error or error
            continue
        return path
    if first_error is not None:
        raise CheckpointIntegrityError(f"No intact checkpoint in {output_dir}; the newest: {first_error}")
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike, verify: bool = True) -> Path | None:
    """Turns `--resume_from_checkpoint` (a path or `latest`) into a complete checkpoint folder, or None.

    `latest` falls back past damaged checkpoints (with a warning naming the bad file); an explicitly named checkpoint
    that is damaged raises `CheckpointIntegrityError` naming the file.
    """
    if value is None:
        return None
    if value == "latest":
        latest = find_latest_checkpoint(output_dir, verify=verify)
        if latest is None:
            logger.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch.", output_dir
            )
        return latest
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {value!r} is not a folder.")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint: {value!r} is incomplete (no {CHECKPOINT_MARKER}); use another one."
        )
    if verify:
        verify_checkpoint(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Writing and rotation
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stream_state_file(checkpoint: str | os.PathLike, process_index: int) -> Path:
    """Where a checkpoint keeps the stream position of one process (each process reads its own share)."""
    return Path(checkpoint) / f"stream_state_{process_index}.json"


def save_training_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict[str, Any],
    stream_state: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
) -> Path:
    """
    Saves model, optimizer, scheduler and RNG states (`accelerator.save_state`; under FSDP a full state dict) plus
    `training_state` as `output_dir/checkpoint-{step}`, atomically.

    Everything is written into a hidden temporary folder first; the main process then hashes every file, writes the
    marker (state, `identity`, save time, checksums) and renames the folder into place, so a crash at any point leaves
    either no `checkpoint-{step}` or a complete, verifiable one. Must be called on every process.
    """
    from .errors import explain_disk_full

    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{step}"
    with explain_disk_full(root, f"checkpoint-{step}"):
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if stream_state is not None:
            # Streaming: each process' readers' positions (written before the marker, so complete with it).
            stream_state_file(tmp, accelerator.process_index).write_text(json.dumps(stream_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {
                **training_state,
                "global_step": step,
                "saved_at": time.time_ns(),
                "checksums": checkpoint_checksums(tmp),
            }
            if identity is not None:
                record[RUN_IDENTITY_KEY] = identity
            with open(tmp / CHECKPOINT_MARKER, "w") as handle:
                json.dump(record, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if final.exists():
                # Replacing an older copy of the same step (resumed from an earlier checkpoint): move it aside first.
                stale = root / f"{TMP_CHECKPOINT_PREFIX}{step}-old"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
        accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None, run_id: str | None = None) -> list[Path]:
    """Deletes the oldest complete checkpoints beyond `limit` (main process only); returns the deleted folders.

    Checkpoints are ordered by save time, and those of another run than `run_id` count as older than any of this
    run's, so the newest checkpoints of the current run are never the ones deleted.
    """
    if limit is None:
        return []
    checkpoints = list_complete_checkpoints(output_dir)
    if run_id is not None:

        def is_current(path: Path) -> bool:
            try:
                return (read_checkpoint_state(path).get(RUN_IDENTITY_KEY) or {}).get("run_id") == run_id
            except (OSError, ValueError):
                return False

        # A stable sort: other runs first, each group in save order.
        checkpoints = sorted(checkpoints, key=is_current)
    deleted = checkpoints[: max(0, len(checkpoints) - limit)]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes temporary folders left by a crash during a checkpoint write (main process only)."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_CHECKPOINT_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


__all__ = [
    "CHECKPOINT_MARKER",
    "CHECKPOINT_PREFIX",
    "TMP_CHECKPOINT_PREFIX",
    "CheckpointIntegrityError",
    "OutputFolderError",
    "check_resume_settings",
    "checkpoint_checksums",
    "file_sha256",
    "find_latest_checkpoint",
    "list_complete_checkpoints",
    "new_run_id",
    "prepare_output_dir",
    "remove_incomplete_checkpoints",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
    "run_identity",
    "save_training_checkpoint",
    "settings_differences",
    "stream_state_file",
    "verify_checkpoint",
]
