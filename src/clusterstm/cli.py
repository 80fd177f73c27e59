"""The ``clusterstm`` console command.

Sub-commands import what they need only when they run, and ``import clusterstm`` does not import torch or
transformers, so ``clusterstm --help`` (and every sub-command's ``--help``) answers without loading them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_init(args: argparse.Namespace) -> int:
    from .hub.export import init_checkpoint

    path = init_checkpoint(args.preset, args.output_dir, tokenizer_name_or_path=args.tokenizer, seed=args.seed)
    print(f"Wrote a {args.preset} ClusterSTM checkpoint with random weights to {path}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub.publish import push_checkpoint

    result = push_checkpoint(args.folder, args.hub_model_id, private=args.private, revision=args.revision)
    print(f"Pushed {args.folder} to {result}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize_video

    paths = visualize_video(args.checkpoint, args.video, args.caption, output_dir=args.output_dir)
    for path in paths:
        print(path)
    return 0


def _cmd_precompute_targets(args: argparse.Namespace) -> int:
    from .teacher.cache import main as precompute_main

    precompute_main(args.arguments)
    return 0


def _cmd_export_synthetic(args: argparse.Namespace) -> int:
    from .data.export import export_synthetic
    from .data.synthetic import SyntheticVideoTextConfig

    config = SyntheticVideoTextConfig(
        num_frames=args.num_frames,
        image_size=args.image_size,
        num_train=args.num_train,
        num_val=args.num_eval,
        num_test=args.num_eval,
        num_compositional=args.num_eval,
        seed=args.seed,
    )
    written = export_synthetic(
        args.format, args.output_dir, config, splits=args.splits, samples_per_shard=args.samples_per_shard
    )
    for split, paths in written.items():
        print(f"{split}: {len(paths)} file(s), e.g. {paths[0]}" if paths else f"{split}: nothing written")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``clusterstm`` command (no heavy imports: help must stay instant)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="clusterstm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="write a Hub-ready checkpoint folder with random weights")
    init.add_argument("--preset", choices=["tiny", "base"], default="tiny", help="model size (default: %(default)s)")
    init.add_argument("--output_dir", required=True, help="folder to write the checkpoint to")
    init.add_argument("--tokenizer", default=None, help="a local BERT-style tokenizer folder (default: train one)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    init.set_defaults(func=_cmd_init)

    push = sub.add_parser("push", help="upload a checkpoint folder to the Hub")
    push.add_argument("folder", help="a checkpoint folder written by this package")
    push.add_argument("--hub_model_id", required=True, help="the Hub repository, e.g. user/clusterstm-tiny")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to push to (default: the main branch)")
    push.set_defaults(func=_cmd_push)

    demo = sub.add_parser("demo", help="the end-to-end demo on the embedded synthetic benchmark")
    demo.add_argument("--output_dir", default="demo_output", help="where everything goes (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, weights and training (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a minutes-long smoke version (used by the tests)")
    demo.set_defaults(func=_cmd_demo)

    export = sub.add_parser(
        "export-synthetic", help="write the synthetic benchmark as jsonl+mp4, parquet (bytes) or webdataset shards"
    )
    export.add_argument(
        "--format",
        choices=["jsonl", "parquet", "webdataset"],
        required=True,
        help="layout to write (see docs/DATA_FORMATS.md)",
    )
    export.add_argument("--output_dir", required=True, help="folder to write the splits into")
    export.add_argument(
        "--splits",
        nargs="+",
        default=["train", "validation", "test", "compositional"],
        help="splits to write (default: %(default)s)",
    )
    export.add_argument("--num_train", type=int, default=2000, help="training clips (default: %(default)s)")
    export.add_argument("--num_eval", type=int, default=200, help="clips in each of validation/test/compositional")
    export.add_argument("--num_frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    export.add_argument("--image_size", type=int, default=64, help="frame side in pixels (default: %(default)s)")
    export.add_argument("--samples_per_shard", type=int, default=256, help="webdataset: samples per tar shard")
    export.add_argument("--seed", type=int, default=0, help="seed of the benchmark (default: %(default)s)")
    export.set_defaults(func=_cmd_export_synthetic)

    vis = sub.add_parser("visualize", help="relevance heatmaps and cluster/mask figures for one video")
    vis.add_argument("checkpoint", help="a ClusterSTM checkpoint with a teacher, or a CLIP/SigLIP teacher folder")
    vis.add_argument("video", help="a video file (anything PyAV reads)")
    vis.add_argument("caption", help="the text whose relevance to show")
    vis.add_argument("--output_dir", default=".", help="where the PNG files go (default: %(default)s)")
    vis.set_defaults(func=_cmd_visualize)

    # The flags are those of scripts/precompute_teacher_targets.py (parsed there; `--help` lists them).
    precompute = sub.add_parser(
        "precompute-targets",
        help="run a teacher once over a corpus and write a teacher-target cache (parquet shards)",
        add_help=False,
    )
    precompute.set_defaults(func=_cmd_precompute_targets, arguments=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "precompute-targets":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.arguments = extra  # precompute-targets: its own flags, parsed by scripts/precompute_teacher_targets.py
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"clusterstm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
