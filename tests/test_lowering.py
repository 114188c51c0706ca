"""The compiler path: torch.compile with dynamic shapes, torch.export (forward and decode step,
save/load), the dla-op decompositions, MLIR import through torch-mlir, and ``dla export``."""
from __future__ import annotations

import io

import pytest
import torch
from torch.export import Dim

from dla_ops.lowering import DECOMPOSITIONS, LogitsModule, export_decode_step, export_forward, export_mlir
from helpers import tiny_lm


def tiny(base="delta", layers=2):
    return tiny_lm(base, layers=layers, capacity=3)


def dla_nodes(ep):
    return [n for n in ep.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "dla"]


def _ids(B, T, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def test_dynamic_compile_does_not_recompile_when_batch_or_length_change():
    m = tiny().train()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    loss_fn = lambda ids: m(ids, labels=ids, use_cache=False).loss
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend=counting_backend)
    for B, T in [(2, 20), (3, 33), (5, 7), (2, 64)]:
        ids = _ids(B, T)
        torch.testing.assert_close(compiled(ids), loss_fn(ids))
    assert len(graphs) == 1
    compiled(_ids(1, 9))     # a dimension becoming 1 may specialise once, no more
    compiled(_ids(1, 15))
    assert len(graphs) <= 2


def test_export_forward_has_symbolic_shapes_and_round_trips():
    m = tiny()
    ep = export_forward(m, _ids(2, 8))
    nodes = dla_nodes(ep)
    assert len(nodes) == 2 and all(n.target == torch.ops.dla.fwd.default for n in nodes)
    o_meta = nodes[0].meta["val"][0]
    assert all(isinstance(s, torch.SymInt) for s in o_meta.shape[:2]) and tuple(o_meta.shape[2:]) == (2, 16)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    ids = _ids(3, 21, seed=1)          # not the example's shape
    with torch.no_grad():
        expected = m(ids, use_cache=False).logits
    assert torch.equal(loaded.module()(ids), ep.module()(ids))
    torch.testing.assert_close(ep.module()(ids), expected)


def test_export_decode_step_round_trips_with_the_cache_as_a_pytree():
    m = tiny("gla")
    ep = export_decode_step(m, batch_size=2)
    assert [n.target for n in dla_nodes(ep)] == [torch.ops.dla.decode_step.default] * 2
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    step = torch.export.load(buf).module()
    ids = _ids(3, 12, seed=2)          # batch 3: the export is dynamic in it
    with torch.no_grad():
        cache = m(ids[:, :10], use_cache=True).dla_cache
        for t in (10, 11):             # a two-step generation loop through the exported step
            logits, cache = step(ids[:, t:t + 1], cache)
        full = m(ids, use_cache=False).logits
    torch.testing.assert_close(logits[:, 0], full[:, 11], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["gla", "delta"])
def test_decompositions_compute_the_same_as_the_ops(base):
    m = tiny(base)
    ids = _ids(2, 9)
    ep = export_forward(m, ids, dynamic=False).run_decompositions(DECOMPOSITIONS)
    assert not dla_nodes(ep)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), m(ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    step = export_decode_step(m, batch_size=2, dynamic=False).run_decompositions(DECOMPOSITIONS)
    assert not dla_nodes(step)
    with torch.no_grad():
        cache = m(ids[:, :8], use_cache=True).dla_cache
        logits, _ = step.module()(ids[:, 8:], cache)
        torch.testing.assert_close(logits, m(ids[:, 8:], dla_cache=cache, use_cache=True).logits)


def test_mlir_raw_keeps_the_dla_op_with_symbolic_shapes():
    pytest.importorskip("torch_mlir")
    ids = _ids(2, 6)
    dyn = {"input_ids": {0: Dim("b", min=1, max=64), 1: Dim("t", min=2, max=4096)}}
    ir = str(export_mlir(LogitsModule(tiny(layers=1)), ids, dynamic_shapes=dyn))
    ops = [line for line in ir.splitlines() if "torch.operator" in line]
    assert len(ops) == 1 and '"torch.dla.fwd"' in ops[0]
    # inputs q: [B, T, H, DK]; results o [B, T, H, DV], I, boundary, merge, states [N, H, K, DK, DV], ...
    result_types = ops[0].split("->")[1]
    assert "!torch.vtensor<[?,?,2,16],f32>" in result_types
    assert "!torch.vtensor<[?,?,2],i1>" in result_types and "!torch.vtensor<[?,?,2],si64>" in result_types
    assert "!torch.vtensor<[?,2,3,16,16],f32>" in result_types


def test_mlir_linalg_on_tensors_lowers_a_small_dla_model():
    pytest.importorskip("torch_mlir")
    ir = str(export_mlir(LogitsModule(tiny(layers=1)), _ids(2, 6), output_type="linalg-on-tensors"))
    assert "torch.operator" not in ir and "!torch.vtensor" not in ir
    assert ir.count("linalg.generic") > 50 and "math.exp" in ir and "math.sqrt" in ir
    assert "func.func @main(%arg0: tensor<2x6xi64>) -> tensor<2x6x64xf32>" in ir
    with pytest.raises(ValueError, match="needs static shapes"):
        export_mlir(LogitsModule(tiny(layers=1)), _ids(2, 6), output_type="linalg-on-tensors",
                    dynamic_shapes={"input_ids": {1: Dim("t", min=2)}})


def test_the_dla_export_command(tmp_path):
    pytest.importorskip("torch_mlir")
    from dla_ops.cli import main
    main(["export", "--mixer-base", "gla", "--seq-len", "4", "--out", str(tmp_path)])
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"forward.pt2", "decode_step.pt2", "forward.raw.mlir", "forward.linalg.mlir"}
    assert '"torch.dla.fwd"' in (tmp_path / "forward.raw.mlir").read_text()
    ep = torch.export.load(tmp_path / "forward.pt2")
    assert ep.module()(_ids(2, 5)).shape == (2, 5, 256)
