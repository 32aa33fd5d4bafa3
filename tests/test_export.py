"""`stt export`: tiny-cpu as ONNX, TorchScript, a torch.export program and an AOTInductor package,
each loaded back and compared with the eager network on fresh inputs."""

from __future__ import annotations

import pytest
import torch

import stt_model.export as export
from stt_model.build import build_model
from stt_model.checkpoint import atomic_save
from stt_model.cli import main
from stt_model.config import load_config

SHAPE = "2,16,16"  # T, H, W traced: small, and H, W divisible by 2^(levels-1) = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-cpu checkpoint whose weights are all off their initial values (the offset
    predictor starts at zero), with its model.backend set as a training run might have."""
    config = load_config("tiny-cpu")
    config.model.backend = "reference"
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "predictor" in name else 0.05))
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    atomic_save({"config": config.to_dict(), "model": model.state_dict()}, path)
    return path, model


def _export(checkpoint, out, fmt, *extra):
    return main(
        ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), "--input-shape", SHAPE, *extra]
    )


def _fresh(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _check(run, model, shapes):
    with torch.no_grad():
        for seed, shape in enumerate(shapes, start=10):
            x = _fresh(shape, seed)
            torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4)


def _recorded_backends(graph_module: torch.fx.GraphModule) -> list[str]:
    """The backend argument of every stt op call in an exported graph."""
    stt = [n for n in graph_module.graph.nodes if n.op == "call_function" and str(n.target).startswith("stt.")]
    return [n.args[-1] for n in stt]


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_onnx(trained, tmp_path, capsys):
    checkpoint, model = trained
    out = tmp_path / "tiny.onnx"
    assert _export(checkpoint, out, "onnx") == 0
    assert "onnx -> " in capsys.readouterr().out
    # Dynamic batch, T, H, W: another batch, odd T, H giving odd sizes at the SST levels.
    _check(export.load_exported(str(out), "onnx"), model, [(3, 1, 3, 24, 16), (1, 1, 2, 16, 16)])
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_pt2_records_auto_whatever_the_environment_says(trained, tmp_path, monkeypatch):
    checkpoint, model = trained
    # The checkpoint says model.backend: reference, the environment cpu; the graph must say auto.
    monkeypatch.setenv("STT_BACKEND", "cpu")
    out = tmp_path / "tiny.pt2"
    assert _export(checkpoint, out, "pt2") == 0
    with open(out, "rb") as handle:
        program = torch.export.load(handle)
    backends = _recorded_backends(program.graph_module)
    assert len(backends) == 3 * 3 and set(backends) == {"auto"}  # 3 SST blocks, 3 ops each
    _check(program.module(), model, [(1, 1, 2, 16, 16), (3, 1, 3, 24, 16)])


@pytest.mark.slow
def test_pt2_static(trained, tmp_path, capsys):
    checkpoint, model = trained
    out = tmp_path / "tiny.pt2"
    assert _export(checkpoint, out, "pt2", "--static") == 0
    assert "traced at 1x1x2x16x16, input 1x1x2x16x16 only" in capsys.readouterr().out
    with open(out, "rb") as handle:
        run = torch.export.load(handle).module()
    _check(run, model, [(1, 1, 2, 16, 16)])
    with pytest.raises(AssertionError, match="size"):
        run(_fresh((2, 1, 2, 16, 16), 0))


def test_torchscript(trained, tmp_path, monkeypatch):
    checkpoint, model = trained
    monkeypatch.setenv("STT_BACKEND", "reference")  # would run the spec and record no stt op at all
    out = tmp_path / "tiny.ts"
    assert _export(checkpoint, out, "torchscript", "--batch", "2") == 0
    traced = torch.jit.load(str(out))
    graph = str(traced.inlined_graph)
    assert graph.count("stt::spatial_attention") == 3 and graph.count("stt::deform_conv2d") == 3
    assert '"auto"' in graph and '"cpu"' not in graph and "memory_format" not in graph
    _check(traced, model, [(2, 1, 2, 16, 16)])


def test_torchscript_backend_flag_and_overwrite(trained, tmp_path, capsys):
    checkpoint, model = trained
    out = tmp_path / "tiny.ts"
    out.write_text("an older export")
    assert _export(checkpoint, out, "torchscript", "--backend", "cpu") == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "an older export"
    assert _export(checkpoint, out, "torchscript", "--backend", "cpu", "--overwrite") == 0
    graph = str(torch.jit.load(str(out)).inlined_graph)
    assert '"cpu"' in graph and '"auto"' not in graph
    _check(torch.jit.load(str(out)), model, [(1, 1, 2, 16, 16)])


@pytest.mark.slow
def test_aoti_package(trained, tmp_path):
    """AOTInductor compiles for a minute or more on 2 cores: one test."""
    checkpoint, model = trained
    out = tmp_path / "tiny_aoti.pt2"
    assert _export(checkpoint, out, "aoti") == 0
    # Batch 1 (traced at 2) included: channels-last conv weights were wrong there (export.contiguous_copy).
    _check(torch._inductor.aoti_load_package(str(out)), model, [(1, 1, 2, 16, 16), (3, 1, 3, 24, 16)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnx", "--backend", "cpu"], "--backend does not apply to --format onnx"),
        (["--format", "pt2", "--input-shape", "2,16"], "--input-shape must be three positive sizes"),
        (["--format", "pt2", "--input-shape", "2,16,x"], "--input-shape must be three positive sizes"),
        (["--format", "pt2", "--input-shape", "2,12,16"], "must be divisible by 1,8,8"),
        (["--format", "pt2", "--batch", "0"], "--batch must be >= 1"),
        (["--format", "pt2", "--input-shape", "2,8,16"], "a dynamic export traces H and W of at least two multiples"),
    ],
)
def test_bad_options_are_one_line_errors(trained, tmp_path, capsys, args, message):
    checkpoint, _ = trained
    code = main(
        ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.out"), "--input-shape", SHAPE, *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stt export: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_the_checkpoint_or_a_folder(trained, tmp_path, capsys):
    checkpoint, _ = trained
    before = checkpoint.read_bytes()
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "pt2", "--out", str(checkpoint), "--overwrite"])
        == 2
    )
    assert "is the --checkpoint" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "pt2", "--out", str(tmp_path), "--overwrite"]) == 2
    )
    assert "is a folder" in capsys.readouterr().err


def test_an_export_that_differs_from_eager_is_not_written(trained, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained
    loader = export._load

    def off_by_a_little(fmt, path):
        run = loader(fmt, path)
        return lambda x: run(x) + 1e-2

    monkeypatch.setattr(export, "_load", off_by_a_little)
    out = tmp_path / "tiny.ts"
    assert _export(checkpoint, out, "torchscript") == 2
    assert "differs from the eager model by up to 0.01" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
