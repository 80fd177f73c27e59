"""Publishing ClusterSTM checkpoints to the Hugging Face Hub.

`push_checkpoint` uploads a checkpoint folder (weights, config, processor files, remote-code files, model card) to a
model repository, after checking that the folder is complete: a checkpoint pushed without its remote-code `.py`
files or its processor files loads nowhere (transformers#15224, #46165). The token is passed to `huggingface_hub`
only; it is never printed, logged, or put in an error message.

Only an allow-list of files is uploaded (`select_upload_files`): a training output folder also holds `.env` files,
logs, optimizer/RNG states and half-written `.tmp-checkpoint-*` folders, none of which may leave the machine.
Symbolic links are followed only when their target lies inside the folder; a link pointing outside is refused.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files of a published ClusterSTM checkpoint (`fnmatch` patterns on file names at the top of the folder).
UPLOAD_ALLOW_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "*_clusterstm.py",
    "README.md",
)
# Sub-folders that are part of a documented checkpoint, with the files allowed inside them. `teacher/` is the frozen
# CLIP/SigLIP teacher that `clusterstm visualize` finds next to the student (the demo checkpoint ships one): weights,
# config, image processor and tokenizer only.
UPLOAD_ALLOW_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "teacher": tuple(p for p in UPLOAD_ALLOW_PATTERNS if p not in ("*_clusterstm.py", "README.md")),
}

# Training leftovers excluded even if a pattern above matched (kept for callers that pass extra ignore patterns).
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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def select_upload_files(
    folder: str | Path, ignore_patterns: Sequence[str] | None = None
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files of `folder` that `push_checkpoint` uploads, and those it leaves out.

    A file is uploaded when its name matches `UPLOAD_ALLOW_PATTERNS` at the top of the folder, or the patterns of an
    allowed sub-folder (`UPLOAD_ALLOW_SUBFOLDERS`, e.g. `teacher/config.json`), and no pattern of `ignore_patterns`.
    Everything else (`.env`, `logs/`, `checkpoint-*/`, `.tmp-checkpoint-*/`, optimizer/RNG states, any other file)
    stays local. A symbolic link (file or sub-folder) is followed only when its target is inside the folder.

    Returns:
        `([(path in the repo, real local path), ...], [left-out entries, relative to the folder])`, both sorted.

    Raises:
        `ValueError`: an allow-listed entry is a symbolic link whose target lies outside the folder (the message
            names the link, not the target's content).
    """
    root = Path(folder).resolve()
    ignore = list(DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    selected: list[tuple[str, Path]] = []
    left_out: list[str] = []

    def real_inside(entry: Path, repo_path: str) -> Path:
        real = entry.resolve()
        if entry.is_symlink() and not _inside(real, root):
            raise ValueError(
                f"Refusing to upload {repo_path!r}: it is a symbolic link pointing outside the checkpoint folder "
                f"{Path(folder).name!r}. Replace it by a copy of the file if it really belongs to the model."
            )
        return real

    for entry in sorted(Path(folder).iterdir()):
        name = entry.name
        if name in UPLOAD_ALLOW_SUBFOLDERS and entry.is_dir():
            sub_root = real_inside(entry, name + "/")
            for child in sorted(sub_root.iterdir()):
                repo_path = f"{name}/{child.name}"
                if (
                    child.is_file()
                    and _matches(child.name, UPLOAD_ALLOW_SUBFOLDERS[name])
                    and not _matches(repo_path, ignore)
                ):
                    selected.append((repo_path, real_inside(child, repo_path)))
                else:
                    left_out.append(repo_path + ("/" if child.is_dir() else ""))
            continue
        if entry.is_file() and _matches(name, UPLOAD_ALLOW_PATTERNS) and not _matches(name, ignore):
            selected.append((name, real_inside(entry, name)))
        else:
            left_out.append(name + ("/" if entry.is_dir() else ""))
    return selected, left_out


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

    Creates the repository if needed (`exist_ok`), creates the branch `revision` if given, then uploads the
    allow-listed files of the folder (`select_upload_files`: weights, configs, processor/tokenizer files, remote
    code, model card, `teacher/`) in one commit; nothing else leaves the machine. Every `--push_to_hub` of the
    package goes through this function.

    Args:
        folder: checkpoint folder (`save_pretrained` output with processor files, remote code and README.md).
        hub_model_id: `namespace/name` of the repository.
        private: create the repository as private (only applies when it is created).
        revision: branch to push to (created from `main` if missing); `None` pushes to `main`.
        token: Hub token; `None` uses huggingface_hub's usual lookup (HF_TOKEN, cached login). Never logged.
        commit_message: message of the upload commit.
        endpoint: Hub endpoint; `None` uses `HF_ENDPOINT` / huggingface.co.
        require_processor, require_model_card: relax the completeness check (e.g. for intermediate pushes).
        ignore_patterns: glob patterns excluded on top of the allow-list (defaults to `DEFAULT_IGNORE_PATTERNS`).

    Returns:
        `huggingface_hub.CommitInfo` of the upload (`.commit_url`, `.oid`, `.repo_url`).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(hub_model_id, str) or hub_model_id.count("/") != 1 or not all(hub_model_id.split("/")):
        raise ValueError(f"hub_model_id must look like 'namespace/name', got {hub_model_id!r}")
    check_checkpoint_folder(folder, require_processor=require_processor, require_model_card=require_model_card)
    # Decide what is uploaded (and refuse outside links) before the first request.
    files, left_out = select_upload_files(folder, ignore_patterns)
    if left_out:
        logger.info("Not uploaded (not part of a published checkpoint): %s", ", ".join(left_out))

    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Pushing %s to %s", Path(folder).name, repo_url)
    if revision is not None and revision != "main":
        api.create_branch(hub_model_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files]
    commit = api.create_commit(
        repo_id=hub_model_id,
        operations=operations,
        commit_message=commit_message,
        repo_type="model",
        revision=revision,
    )
    logger.info("Pushed commit %s", commit.oid)
    return commit
