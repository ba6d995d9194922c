"""`smollchat serve --quantize`: every model the server loads is quantized as asked (issue 14), in the
engine's child process (the default) and in the server's own (--no-engine-process)."""
from __future__ import annotations

import pytest

from chatapp.chat.fake import FakeEngine
from chatapp.cli import main


def test_serve_loads_with_the_quantization_asked(monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    import chatapp.chat.engine_host as engine_host
    import chatapp.engine.runtime as runtime

    asked = []

    def loader(where):
        def load(entry, progress=None, **kw):
            asked.append((where, entry.id, kw.get("quantize")))
            return FakeEngine(entry=entry, quantize=kw.get("quantize") or "none")
        return load

    monkeypatch.setattr(engine_host, "load_engine_process", loader("child"))
    monkeypatch.setattr(runtime, "load_engine", loader("here"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", "--model", "axiom-tiny", "--quantize", "int8"]) == 0
    assert main(["serve", "--model", "axiom-tiny", "--quantize", "int4", "--no-engine-process"]) == 0
    assert main(["serve", "--model", "axiom-tiny"]) == 0
    assert asked == [("child", "axiom-tiny", "int8"), ("here", "axiom-tiny", "int4"),
                     ("child", "axiom-tiny", None)]  # None: each catalog entry's default
