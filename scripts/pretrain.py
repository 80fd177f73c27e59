#!/usr/bin/env python
"""ClusterSTM pretraining, unchanged from one CPU process to multi-GPU / multi-node:

    python scripts/pretrain.py --model_name_or_path ckpt --dataset_name synthetic --output_dir out --max_steps 100
    accelerate launch --config_file accelerate_configs/ddp_gpu.yaml scripts/pretrain.py ...

See `python scripts/pretrain.py --help` for every flag.
"""

import sys

from clusterstm.training.errors import DiskFullError
from clusterstm.training.pretraining import NonFiniteLossError, main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    # ValueError covers bad flags, a reused --output_dir, a resume with other settings and a damaged checkpoint.
    except (ValueError, NonFiniteLossError, DiskFullError) as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        sys.exit(2)
