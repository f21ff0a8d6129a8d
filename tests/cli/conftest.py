"""CLI fixtures: a tiny saved BERT directory (MiniLM's tokenizer), a calibration file, and one
successful conversion shared by the CLI tests."""

from __future__ import annotations

import pytest
from models import CALIB_SENTENCES, save_tiny_bert_dir

from slimformer import cli


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_bert_dir(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CALIB_SENTENCES) + "\n", encoding="utf-8")
    return str(path)


def convert_args(model_dir, out, calib, *extra) -> list[str]:
    return ["convert", str(model_dir), "--out", str(out), "--calib", str(calib), "--max-length", "32",
            *extra]


@pytest.fixture(scope="session")
def converted(tiny_model_dir, calib_file, tmp_path_factory):
    """(artifact dir, dump-ir dir, stdout) of one successful `slimformer convert`."""
    base = tmp_path_factory.mktemp("converted")
    out, dump = base / "tiny-int8", base / "ir"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORMER_KERNELS", "reference")
        mp.setattr(cli.console, "width", 200)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(convert_args(tiny_model_dir, out, calib_file, "--dump-ir", str(dump)))
    assert rc == 0, buf.getvalue()
    return out, dump, buf.getvalue()


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Messages unwrapped (a long path would be folded at 80 columns), kernels in PyTorch."""
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err_console, "width", 400)
    monkeypatch.setenv("SLIMFORMER_KERNELS", "reference")
