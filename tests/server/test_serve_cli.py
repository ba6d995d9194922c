"""`smollchat serve --quantize`: every model the server loads is quantized as asked (issue 14)."""
from __future__ import annotations

import pytest

from chatapp.chat.fake import FakeEngine
from chatapp.cli import main


def test_serve_loads_with_the_quantization_asked(monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    import chatapp.engine.runtime as runtime

    asked = []

    def load_engine(entry, **kw):
        asked.append((entry.id, kw.get("quantize")))
        return FakeEngine(entry=entry, quantize=kw.get("quantize") or "none")

    monkeypatch.setattr(runtime, "load_engine", load_engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", "--model", "axiom-tiny", "--quantize", "int8"]) == 0
    assert asked == [("axiom-tiny", "int8")]
    assert main(["serve", "--model", "axiom-tiny"]) == 0
    assert asked[-1] == ("axiom-tiny", None)  # each catalog entry's default
