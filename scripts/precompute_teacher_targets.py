#!/usr/bin/env python
"""Run a frozen teacher once over a corpus and write its targets as a cache for `scripts/pretrain.py --teacher_targets`:

    python scripts/precompute_teacher_targets.py --model_name_or_path ckpt --teacher_name_or_path teacher \
        --dataset_name synthetic --mask_strategy cluster --mask_ratio 0.8 --output_dir targets
    python scripts/pretrain.py --model_name_or_path ckpt --dataset_name synthetic --teacher_targets targets ...

The data flags are those of scripts/pretrain.py. See `--help` and docs/TEACHER_TARGETS.md.
"""

import sys

from clusterstm.teacher.cache import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:
        print(f"precompute_teacher_targets.py: error: {error}", file=sys.stderr)
        sys.exit(2)
