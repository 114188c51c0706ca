"""``dla export``: write the ExportedPrograms (``.pt2``) and MLIR (``.mlir``) of a DLA language model."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.export import Dim


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a directory written by save_pretrained / dla train "
                                        "(default: a freshly initialised model of --preset)")
    from dla_ops.models.train import PRESETS
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--mixer-base", choices=["gla", "delta"], default="gla")
    p.add_argument("--capacity", type=int)
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--batch-size", type=int, default=2,
                   help="example batch, >= 2 (the .pt2 files are dynamic in it; a 1 would be specialised)")
    p.add_argument("--seq-len", type=int, default=16,
                   help="example length; the linalg MLIR is specialised to it (the token loop is unrolled)")
    p.add_argument("--out", default="export", help="output directory")


def main(args: argparse.Namespace) -> None:
    from dla_ops.models import DLAConfig, DLAForCausalLM
    from dla_ops.models.train import PRESETS
    from .export import LogitsModule, export_decode_step, export_forward
    from .mlir import export_mlir

    if args.checkpoint:
        model = DLAForCausalLM.from_pretrained(args.checkpoint)
    else:
        fields = dict(PRESETS[args.preset], mixer_base=args.mixer_base, tau=args.tau)
        if args.capacity is not None:
            fields["capacity"] = args.capacity
        model = DLAForCausalLM(DLAConfig(**fields))
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    written = []
    torch.export.save(export_forward(model, ids), out / "forward.pt2")
    torch.export.save(export_decode_step(model, args.batch_size), out / "decode_step.pt2")
    written += ["forward.pt2", "decode_step.pt2"]
    try:
        import torch_mlir  # noqa: F401
    except ImportError:
        print("torch-mlir is not installed: no .mlir files (pip install torch-mlir)")
    else:
        dyn = {"input_ids": {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=1 << 20)}}
        (out / "forward.raw.mlir").write_text(str(export_mlir(LogitsModule(model), ids, dynamic_shapes=dyn)))
        (out / "forward.linalg.mlir").write_text(
            str(export_mlir(LogitsModule(model), ids, output_type="linalg-on-tensors")))
        written += ["forward.raw.mlir", f"forward.linalg.mlir (B={args.batch_size}, T={args.seq_len})"]
    print(f"wrote to {out}: " + ", ".join(written))
