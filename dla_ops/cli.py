"""The ``dla`` command line."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from dla_ops.lowering import cli as export
    from dla_ops.models import demo, train
    demo.add_arguments(sub.add_parser("demo", help="train tiny DLA and single-state models on a recall task (CPU, minutes)"))
    train.add_arguments(sub.add_parser("train", help="train a DLA language model (byte-level, ships its data)"))
    export.add_arguments(sub.add_parser("export", help="write .pt2 (torch.export) and .mlir (torch-mlir) files"))
    args = parser.parse_args(argv)
    {"demo": demo.main, "train": train.main, "export": export.main}[args.command](args)


if __name__ == "__main__":
    main()
