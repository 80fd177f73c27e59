"""Publishing ClusterSTM checkpoints to the Hugging Face Hub.

`push_checkpoint` uploads a checkpoint folder (weights, config, processor files, remote-code files, model card) to a
model repository, after checking that the folder is complete: a checkpoint pushed without its remote-code `.py`
files or its processor files loads nowhere (transformers#15224, #46165). The token is passed to `huggingface_hub`
only; it is never printed, logged, or put in an error message.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files of a training output folder that are not part of a published model.
DEFAULT_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "runs/**",
    "**/__pycache__/**",
    "*.pyc",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
]

_PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_TOKENIZER_VOCABS = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_CONFIGS_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json", *_PROCESSOR_CONFIGS)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def _auto_map_modules(auto_map: Any) -> set[str]:
    # auto_map values: "module.Class", "repo--module.Class", or [slow, fast] lists (tokenizers) with None entries.
    values = auto_map.values() if isinstance(auto_map, dict) else []
    modules = set()
    for value in values:
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(reference, str) and "." in reference:
                modules.add(reference.split("--")[-1].rsplit(".", 1)[0])
    return modules


def find_missing_checkpoint_files(
    folder: str | Path, require_processor: bool = True, require_model_card: bool = True
) -> list[str]:
    """What a checkpoint folder lacks to be loadable from the Hub; an empty list when it is complete.

    Checked: `config.json`; `*.safetensors` weights (and every shard of a `model.safetensors.index.json`); a processor
    config and tokenizer files (`require_processor`); every `.py` module referenced by an `auto_map` of the config or
    processor/tokenizer configs, and every module those import relatively (`from .x import y`); `README.md`
    (`require_model_card`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder itself ({folder.name} is not a directory)"]
    missing: list[str] = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        missing.append("config.json")
    if not list(folder.glob("*.safetensors")):
        missing.append("model weights (*.safetensors)")
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        shards = set(json.loads(index_path.read_text()).get("weight_map", {}).values())
        missing.extend(f"weight shard {s}" for s in sorted(shards) if not (folder / s).is_file())
    if require_processor:
        if not any((folder / name).is_file() for name in _PROCESSOR_CONFIGS):
            missing.append(f"processor config (one of {', '.join(_PROCESSOR_CONFIGS)})")
        if not (folder / "tokenizer_config.json").is_file():
            missing.append("tokenizer_config.json")
        if not any((folder / name).is_file() for name in _TOKENIZER_VOCABS):
            missing.append(f"tokenizer vocabulary (one of {', '.join(_TOKENIZER_VOCABS)})")
    modules: set[str] = set()
    for name in _CONFIGS_WITH_AUTO_MAP:
        path = folder / name
        if path.is_file():
            try:
                modules |= _auto_map_modules(json.loads(path.read_text()).get("auto_map", {}))
            except json.JSONDecodeError:
                missing.append(f"a valid {name} (it is not JSON)")
    # Follow relative imports: transformers downloads them too and fails if one is absent.
    seen: set[str] = set()
    while modules:
        module = modules.pop()
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            missing.append(f"remote-code file {module}.py")
            continue
        modules |= set(_RELATIVE_IMPORT.findall(path.read_text()))
    if require_model_card and not (folder / "README.md").is_file():
        missing.append("README.md (model card; see clusterstm.model_card.write_model_card)")
    return missing


def check_checkpoint_folder(
    folder: str | Path, require_processor: bool = True, require_model_card: bool = True
) -> None:
    """Raise `ValueError` naming everything a checkpoint folder lacks (see `find_missing_checkpoint_files`)."""
    missing = find_missing_checkpoint_files(folder, require_processor, require_model_card)
    if missing:
        raise ValueError(f"Checkpoint folder {Path(folder).name!r} is incomplete; missing: " + "; ".join(missing))


def push_checkpoint(
    folder: str | Path,
    hub_model_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload ClusterSTM checkpoint",
    endpoint: str | None = None,
    require_processor: bool = True,
    require_model_card: bool = True,
    ignore_patterns: list[str] | None = None,
):
    """Upload a complete checkpoint folder to a Hub model repository.

    Creates the repository if needed (`exist_ok`), creates the branch `revision` if given, then uploads the folder in
    one commit (training leftovers such as `checkpoint-*/` and optimizer states are skipped).

    Args:
        folder: checkpoint folder (`save_pretrained` output with processor files, remote code and README.md).
        hub_model_id: `namespace/name` of the repository.
        private: create the repository as private (only applies when it is created).
        revision: branch to push to (created from `main` if missing); `None` pushes to `main`.
        token: Hub token; `None` uses huggingface_hub's usual lookup (HF_TOKEN, cached login). Never logged.
        commit_message: message of the upload commit.
        endpoint: Hub endpoint; `None` uses `HF_ENDPOINT` / huggingface.co.
        require_processor, require_model_card: relax the completeness check (e.g. for intermediate pushes).
        ignore_patterns: glob patterns not to upload (defaults to `DEFAULT_IGNORE_PATTERNS`).

    Returns:
        `huggingface_hub.CommitInfo` of the upload (`.commit_url`, `.oid`, `.repo_url`).
    """
    from huggingface_hub import HfApi

    if not isinstance(hub_model_id, str) or hub_model_id.count("/") != 1 or not all(hub_model_id.split("/")):
        raise ValueError(f"hub_model_id must look like 'namespace/name', got {hub_model_id!r}")
    check_checkpoint_folder(folder, require_processor=require_processor, require_model_card=require_model_card)

    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Pushing %s to %s", Path(folder).name, repo_url)
    if revision is not None and revision != "main":
        api.create_branch(hub_model_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=hub_model_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns),
    )
    logger.info("Pushed commit %s", commit.oid)
    return commit
