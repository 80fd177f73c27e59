#!/usr/bin/env python
"""Train the small CLIP teacher of the synthetic benchmark and save it as an ordinary CLIP checkpoint folder.

python scripts/train_teacher.py --output_dir outputs/teacher --max_steps 300
"""

import sys

from clusterstm.training.teacher_training import main

if __name__ == "__main__":
    main(sys.argv[1:])
