#!/usr/bin/env python
"""Fine-tune / evaluate ClusterSTM on text-video retrieval, video QA or video captioning with the transformers Trainer.

Every `TrainingArguments` flag works (`--do_train`, `--do_eval`, `--do_predict`, `--max_steps`,
`--per_device_train_batch_size`, `--report_to`, `--push_to_hub`, `--hub_model_id`, ...), plus the model and data
arguments of `clusterstm.training.finetuning` (`--task`, `--model_name_or_path`, `--dataset_name synthetic`,
`--train_file`, `--validation_file`, `--video_root`, `--rerank_top_k`, `--dual_softmax`, `--num_beams` ...).
Data formats: docs/DATA_FORMATS.md.

Examples:

    # fine-tune a tiny from-scratch model on the synthetic retrieval task
    python scripts/finetune.py --task retrieval --preset tiny --dataset_name synthetic \
        --do_train --do_eval --max_steps 200 --output_dir runs/retrieval

    # zero-shot retrieval of a pretrained checkpoint on MSR-VTT-style annotations
    python scripts/finetune.py --task retrieval --model_name_or_path runs/pretrain/final \
        --validation_file msrvtt_test.json --video_root videos/ --do_eval --output_dir runs/zeroshot

A single `.json` argument is read as a file of all arguments (as in the transformers examples).
"""

from clusterstm.training.finetuning import main

if __name__ == "__main__":
    main()
