"""Model cards for ClusterSTM checkpoints.

`build_model_card` fills a `huggingface_hub.ModelCard` from the model config and the run: Hub metadata
(`library_name: transformers`, tags, `pipeline_tag`, datasets, license) with the evaluation results as `model-index`
(`EvalResult`s for Recall@K, accuracy, CIDEr ... which the Trainer's own card drops), and a body saying what the model
is, how to load it, the pretraining recipe, the results table, limitations and the citation.
The template is the `MODEL_CARD_TEMPLATE` string below (see `model_cards/README.md` at the repository root).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..tasks import TASKS as _TASK_REGISTRY
from ..tasks import get_task

DEFAULT_TAGS = ["clusterstm", "video-text", "video-language", "masked-video-modeling", "custom_code"]

PAPER_TITLE = "Cluster-Wise Spatio-Temporal Masking for Efficient Video-Language Pretraining"
PAPER_URL = "https://arxiv.org/abs/2603.22953"
CITATION = """@inproceedings{clusterstm2026,
  title     = {Cluster-Wise Spatio-Temporal Masking for Efficient Video-Language Pretraining},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026},
  eprint    = {2603.22953},
  archivePrefix = {arXiv}
}"""

# task key -> (model-index task type, human name), from the task registry
TASKS = {key: value for task in _TASK_REGISTRY.values() for key, value in task.card_tasks.items()}
# eval-result task name -> registered task (every task's name and aliases, from `clusterstm.tasks.TASKS`)
_TASK_ALIASES = {alias: task.name for task in _TASK_REGISTRY.values() for alias in (task.name, *task.aliases)}

MODEL_CARD_TEMPLATE = """
# {model_name}

{model_name} is a video-language model pretrained with **ClusterSTM** ({paper_title}, CVPR 2026,
[arXiv:2603.22953]({paper_url})). During pretraining, the visual tokens of every frame are clustered (density peak
clustering) and only the token with the highest temporal density is kept in each cluster, so every frame keeps the
same number of tokens while whole semantic regions are never dropped; a frozen CLIP-like teacher provides per-token
video-text relevance that the student learns to reconstruct.

{model_summary}

## How to use

The modelling code travels with the checkpoint (`custom_code`), so only `transformers` is needed:

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

inputs = processor(videos=[video_frames], text=["a dog runs on the beach"], return_tensors="pt", padding=True)
outputs = model(**inputs)
```

## Pretraining recipe

{recipe_table}

## Evaluation results

{results_table}

## Limitations

- {limitations}
- Retrieval numbers depend on the protocol (split, one or several captions per video, dual-softmax re-ranking or not):
  compare only results obtained with the same protocol, recorded above.
- Captioning scores use pycocoevalcap; the tokenizer (Java PTB or the pure-python approximation) is recorded with the
  results because it changes the scores slightly. SPICE is not computed.
- The model inherits the biases of its pretraining data and of the teacher model; it is not intended for
  surveillance or for decisions about people.

## Citation

```bibtex
{citation}
```
"""


# `namespace/name` (or a bare canonical name) as the Hub spells repository ids; nothing with path syntax.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_LOSS_WEIGHT_KEYS = ("contrastive", "matching", "mlm", "relevance", "alignment")


def hub_model_reference(value: Any) -> tuple[str | None, str | None]:
    """`(base_model for the card metadata, text naming the model)` of a model reference.

    Only a value that looks like a Hub id (`namespace/name`, no path syntax) and is not an existing local folder
    becomes `base_model` (which the Hub renders as a link). A local folder (absolute, `./`, `~` or existing path) is
    named by its folder name only, so no local absolute path (user names, mount points) ever lands in a published
    card and no broken Hub link is made; other free text is shown as given and never linked.
    """
    if value is None:
        return None, None
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if not text.strip():
        return None, None
    local = os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text)
    if not local and _HUB_ID.match(text) and ".." not in text:
        return text, text
    if not local:
        return None, text  # free text ("tiny CLIP trained by the demo"): shown, never linked
    name = Path(text.rstrip("/\\")).name
    return None, f"{name} (local checkpoint)" if name else None


def _config_dict(config_or_dict: Any) -> dict[str, Any]:
    if config_or_dict is None:
        return {}
    if isinstance(config_or_dict, dict):
        return dict(config_or_dict)
    if hasattr(config_or_dict, "to_dict"):
        return config_or_dict.to_dict()
    raise ValueError(f"config_or_dict must be a PretrainedConfig or a dict, got {type(config_or_dict).__name__}")


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _metric_entries(task: str, metrics: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """(task key, metric type, display name, value) for the known metrics of a task; `eval_` prefixes ignored."""
    return get_task(task).card_entries(metrics)


def _eval_results(eval_results: list[dict[str, Any]] | None) -> list[EvalResult]:
    results: list[EvalResult] = []
    for item in eval_results or []:
        task = _TASK_ALIASES.get(str(item.get("task", "")).replace("-", "_"))
        if task is None:
            raise ValueError(f"eval result task must be one of {sorted(_TASK_ALIASES)}, got {item.get('task')!r}")
        if "dataset_name" not in item or "metrics" not in item:
            raise ValueError("every eval result needs 'dataset_name' and 'metrics'")
        metrics = item["metrics"]
        dataset_args = {"protocol": item["protocol"]} if item.get("protocol") else None
        metric_args = {"tokenizer": metrics["tokenizer"]} if isinstance(metrics.get("tokenizer"), str) else None
        entries = _metric_entries(task, metrics)
        if not entries:
            raise ValueError(f"no known metric in eval result for {item['dataset_name']!r}: {sorted(metrics)}")
        for task_key, mtype, name, value in entries:
            task_type, task_name = TASKS[task_key]
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=item.get("dataset_type", item["dataset_name"]),
                    dataset_name=item["dataset_name"],
                    dataset_split=item.get("dataset_split"),
                    dataset_args=dataset_args,
                    metric_type=mtype,
                    metric_name=name,
                    metric_value=round(float(value), 4),
                    metric_args=metric_args,
                )
            )
    return results


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def build_model_card(
    config_or_dict: Any,
    run_info: dict[str, Any],
    eval_results: list[dict[str, Any]] | None = None,
    pipeline_tag: str | None = "feature-extraction",
    train_results: dict[str, Any] | None = None,
) -> ModelCard:
    """Build the model card of a ClusterSTM checkpoint.

    Args:
        config_or_dict: the model config (a `ClusterSTMConfig` or its `to_dict()`); masking settings and loss weights
            are read from it when `run_info` does not give them.
        run_info: facts about the run. Keys used (all optional): `model_name`, `repo_id`, `license` (default
            `apache-2.0`), `datasets` (list of dataset ids/names), `base_model`, `tags` (extra tags), `language`,
            `teacher`, `mask_strategy`, `mask_ratio`, `objectives` (dict name -> weight), `train_data` (text; alias
            `dataset`), `steps`, `num_frames`, `image_size`, `batch_size`, `learning_rate`, `summary` (free text),
            `limitations` (text). `base_model` and `teacher` may be local folders: they are then named by their
            folder name (see `hub_model_reference`), never by their path.
        eval_results: list of `{"task": "retrieval"|"qa"|"captioning", "dataset_name", "dataset_type",
            "dataset_split", "protocol", "metrics": <dict returned by clusterstm.metrics / eval_results.json>}`.
        pipeline_tag: Hub pipeline tag (`"feature-extraction"` for the base model, `None` to omit).
        train_results: the `train_results.json` of the run (pretraining or `Trainer`); fills what `run_info` does
            not give: steps (`global_step`), global batch size (`train_global_batch_size`), masking, learning rate.

    Returns:
        A `huggingface_hub.ModelCard` whose metadata holds the results as `model-index`.
    """
    if not isinstance(run_info, dict):
        raise ValueError(f"run_info must be a dict, got {type(run_info).__name__}")
    config = _config_dict(config_or_dict)
    model_name = run_info.get("model_name") or run_info.get("repo_id", "clusterstm-model").split("/")[-1]
    repo_id = run_info.get("repo_id") or f"your-username/{model_name}"
    results = _eval_results(eval_results)

    train_results = dict(train_results or {})
    datasets = run_info.get("datasets")
    base_model, base_model_text = hub_model_reference(run_info.get("base_model"))
    _, teacher_text = hub_model_reference(_first(run_info.get("teacher"), config.get("teacher_name_or_path")))
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license=run_info.get("license", "apache-2.0"),
        tags=DEFAULT_TAGS + [t for t in run_info.get("tags", []) if t not in DEFAULT_TAGS],
        pipeline_tag=pipeline_tag,
        datasets=list(datasets) if datasets else None,
        language=run_info.get("language"),
        base_model=base_model,
        eval_results=results or None,
    )

    masking = config.get("masking", {}) if isinstance(config.get("masking"), dict) else {}
    # The config stores one `<name>_loss_weight` per objective (0 = off).
    config_weights = {
        name: config[f"{name}_loss_weight"] for name in _LOSS_WEIGHT_KEYS if config.get(f"{name}_loss_weight")
    }
    objectives = run_info.get("objectives") or config.get("loss_weights") or config_weights or None
    train_data = _first(
        run_info.get("train_data"), run_info.get("dataset"), ", ".join(datasets) if datasets else None, "n/a"
    )
    batch_size = _first(
        run_info.get("batch_size"),
        train_results.get("train_global_batch_size"),
        train_results.get("total_train_batch_size"),
        "?",
    )
    recipe = [
        ["Teacher", _first(teacher_text, "none")],
        [
            "Masking strategy",
            _first(
                run_info.get("mask_strategy"),
                train_results.get("mask_strategy"),
                config.get("mask_strategy"),
                masking.get("strategy"),
                "cluster-wise (ClusterSTM)",
            ),
        ],
        [
            "Mask ratio",
            _first(
                run_info.get("mask_ratio"),
                train_results.get("mask_ratio"),
                config.get("mask_ratio"),
                masking.get("mask_ratio"),
                "n/a",
            ),
        ],
        [
            "Objectives (weights)",
            ", ".join(f"{k} ({v})" for k, v in objectives.items())
            if isinstance(objectives, dict)
            else _first(objectives, "n/a"),
        ],
        ["Pretraining data", train_data],
        ["Steps", _first(run_info.get("steps"), train_results.get("global_step"), "n/a")],
        [
            "Frames x resolution",
            f"{_first(run_info.get('num_frames'), config.get('vision_config', {}).get('num_frames'), '?')} x {_first(run_info.get('image_size'), config.get('vision_config', {}).get('image_size'), '?')}",
        ],
        [
            "Global batch size / learning rate",
            f"{batch_size} / {_first(run_info.get('learning_rate'), train_results.get('learning_rate'), '?')}",
        ],
    ]
    if base_model_text is not None:
        recipe.insert(0, ["Initialised from", base_model_text])
    if results:
        rows = [
            [
                r.task_name,
                r.dataset_name,
                r.dataset_split or "",
                (r.dataset_args or {}).get("protocol", ""),
                r.metric_name,
                r.metric_value,
            ]
            for r in results
        ]
        results_table = _markdown_table(["Task", "Dataset", "Split", "Protocol", "Metric", "Value"], rows)
        tokenizers = {r.metric_args["tokenizer"] for r in results if r.metric_args and "tokenizer" in r.metric_args}
        if tokenizers:
            results_table += f"\n\nCaptioning tokenizer: {', '.join(sorted(tokenizers))}."
    else:
        results_table = "No evaluation results were recorded for this checkpoint."

    body = MODEL_CARD_TEMPLATE.format(
        model_name=model_name,
        repo_id=repo_id,
        paper_title=PAPER_TITLE,
        paper_url=PAPER_URL,
        model_summary=run_info.get("summary", ""),
        recipe_table=_markdown_table(["Setting", "Value"], recipe),
        results_table=results_table,
        limitations=run_info.get(
            "limitations", "Small or synthetic pretraining runs do not reproduce the paper's numbers."
        ),
        citation=CITATION,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(
    folder: str | Path,
    config_or_dict: Any,
    run_info: dict[str, Any],
    eval_results: list[dict[str, Any]] | None = None,
    pipeline_tag: str | None = "feature-extraction",
) -> Path:
    """Build the model card and save it as `folder/README.md`; returns the path.

    A `train_results.json` in `folder` (written by pretraining and by `Trainer`) fills the recipe facts `run_info`
    leaves out.
    """
    path = Path(folder) / "README.md"
    results_path = Path(folder) / "train_results.json"
    train_results = json.loads(results_path.read_text()) if results_path.is_file() else None
    card = build_model_card(
        config_or_dict, run_info, eval_results, pipeline_tag=pipeline_tag, train_results=train_results
    )
    card.save(path)
    return path
