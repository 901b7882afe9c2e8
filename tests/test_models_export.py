"""timm -> ONNX export (models/export.py) and the zoo table (models/zoo.py).

The torch tier exports small models at 64 px with seeded random weights, so each test
stays within a few seconds; nothing is downloaded (pretrained=False or local files).
"""
import collections
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import need_shared
from onnxquant.models import ZOO, get, names

SMALL = "mobilevit_xxs"  # 1.3 M params; has Softmax attention and convs inside blocks
SIZE = 64


@pytest.fixture
def torch():
    pytest.importorskip("timm", reason="timm not installed (pip install onnxquant[torch])")
    return pytest.importorskip("torch", reason="torch not installed (pip install onnxquant[torch])")


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _torch_out(model, x, torch):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_zoo_table_is_consistent():
    assert len(set(names(include_large=True))) == len(ZOO) >= 13
    assert "efficientformer_l7" not in names() and get("efficientformer_l7").large
    assert get("fastvit_t8").softmax == 0 and get("mobilevitv2_050").matmul == 0
    with pytest.raises(KeyError, match="known"):
        get("resnet50")


def test_import_needs_no_torch():
    code = "import sys, onnxquant.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.torch
def test_export_round_trips(tmp_path, torch, rng):
    from onnxquant.models.export import build, export

    torch.manual_seed(0)
    path = export(SMALL, tmp_path / "m.onnx", input_size=SIZE)
    torch.manual_seed(0)
    model, size = build(SMALL, input_size=SIZE)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)  # batch 2: dynamic axis
    np.testing.assert_allclose(_ort(path, x), _torch_out(model, x, torch), atol=1e-4, rtol=0)

    proto = onnx.load(str(path))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    entry = get(SMALL)
    assert (ops["Softmax"], ops["Conv"], ops["MatMul"]) == (entry.softmax, entry.conv,
                                                            entry.matmul)
    assert not [op for op in ops if "Attention" in op]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["timm_name"] == SMALL and meta["weights"] == "random-init"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


@pytest.mark.torch
def test_local_pth_weights_with_prefix_and_inferred_classes(tmp_path, torch, rng):
    import timm

    from onnxquant.models.export import export

    torch.manual_seed(1)
    model = timm.create_model(SMALL, num_classes=7).eval()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    path = export(SMALL, tmp_path / "m.onnx", weights=tmp_path / "w.pth", input_size=SIZE)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    out = _ort(path, x)
    assert out.shape == (2, 7)
    np.testing.assert_allclose(out, _torch_out(model, x, torch), atol=1e-4, rtol=0)


@pytest.mark.torch
def test_reference_checkpoint_reloads(tmp_path, torch, rng):
    from onnxquant.models.export import export

    weights = need_shared("reference", "mobilevit_xxs.imagenette.safetensors")
    reference = need_shared("reference", "mobilevit_xxs.imagenette.onnx")
    path = export(SMALL, tmp_path / "m.onnx", weights=weights, input_size=128)
    x = rng.random((2, 3, 128, 128), dtype=np.float32)
    np.testing.assert_allclose(_ort(path, x), _ort(reference, x), atol=1e-4, rtol=0)


@pytest.mark.torch
def test_unknown_name_suggests_close_names(tmp_path, torch, capsys):
    from onnxquant.models.export import ExportError, export, main

    with pytest.raises(ExportError, match="close names: mobilevit_xxs"):
        export("mobilevit_xx", tmp_path / "m.onnx")
    assert main(["mobilevit_xx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown timm model 'mobilevit_xx'") and "\n" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.torch
def test_mismatched_weights_name_the_problem(tmp_path, torch):
    from safetensors.torch import save_file

    from onnxquant.models.export import ExportError, export

    save_file({"head.fc.weight": torch.zeros(10, 320)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ExportError, match="missing keys .*--num-classes"):
        export(SMALL, tmp_path / "m.onnx", weights=tmp_path / "w.safetensors")
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(ExportError, match="cannot read weights"):
        export(SMALL, tmp_path / "m.onnx", weights=tmp_path / "bad.pth")
    with pytest.raises(ExportError, match="not found"):
        export(SMALL, tmp_path / "m.onnx", weights=tmp_path / "absent.pt")
    with pytest.raises(ExportError, match="does not run at 192 px"):
        export("efficientformer_l1", tmp_path / "m.onnx", input_size=192)


@pytest.mark.torch
def test_zoo_cache_exports_once(tmp_path, torch, monkeypatch):
    from onnxquant.models.export import zoo_cache

    monkeypatch.setenv("ONNXQUANT_ZOO_CACHE", str(tmp_path))
    first = zoo_cache(SMALL, input_size=SIZE)
    assert first.is_relative_to(tmp_path) and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert zoo_cache(SMALL, input_size=SIZE) == first and first.stat().st_mtime_ns == stamp


@pytest.mark.torch
def test_large_models_use_external_data(tmp_path, torch, monkeypatch, rng):
    from onnxquant import model_io
    from onnxquant.models.export import export

    monkeypatch.setattr(model_io, "EXTERNAL_THRESHOLD", 0)  # treat every model as > 2 GiB
    path = export(SMALL, tmp_path / "m.onnx", input_size=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < 2**20  # weights are in the side file
    x = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    assert np.isfinite(_ort(path, x)).all()
