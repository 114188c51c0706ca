"""The ``dla`` command line."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from dla_ops.models import train
    train.add_arguments(sub.add_parser("train", help="train a DLA language model (byte-level, ships its data)"))
    args = parser.parse_args(argv)
    if args.command == "train":
        train.main(args)


if __name__ == "__main__":
    main()
