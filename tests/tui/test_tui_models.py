"""Pilot tests of the models screen against the FakeDownloader: the catalog listing, download with
progress, cancel and resume, offline and failed downloads, delete, loading a model in a worker, the
quantization it loads with, and the catalog's columns at 120 columns."""
from __future__ import annotations

import threading

import pytest
from textual.widgets import DataTable, ProgressBar

from chatapp.chat.fake import FakeDownloader, FakeEngine
from chatapp.tui.backend import LoadOptions
from chatapp.tui.screens.models import ModelsScreen
from chatapp.tui.widgets.model_info import ModelInfo

from .conftest import SIZE, wait_until

pytestmark = pytest.mark.asyncio


def text_of(screen, selector: str) -> str:
    return str(screen.query_one(selector).render())


def status(screen, model_id: str) -> str:
    return str(screen.query_one(DataTable).get_cell(model_id, "Status"))


async def open_models(pilot, model_id: str) -> ModelsScreen:
    await pilot.press("ctrl+o")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    screen = pilot.app.screen
    table = screen.query_one(DataTable)
    table.move_cursor(row=table.get_row_index(model_id))
    await pilot.pause()
    return screen


class Gate(FakeDownloader):
    """A FakeDownloader that pauses after each progress event until the test lets it go on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.step = threading.Semaphore(0)

    def download(self, entry, progress=None, cancel=None):
        def gated(p):
            progress(p)
            self.step.acquire(timeout=5)
        return super().download(entry, progress=gated, cancel=cancel)


async def test_catalog_lists_every_model_and_labels_demos(build, catalog):
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "odinnext")
        table = screen.query_one(DataTable)
        assert table.row_count == len(catalog)
        assert status(screen, "odinnext") == "not downloaded"
        for entry in catalog.values():
            if entry.demo:
                assert status(screen, entry.id).startswith("demo · random weights")
        row = table.get_row("odinnext")
        assert row[2] == catalog["odinnext"].architecture and row[5] == "2,048"
        assert catalog["odinnext"].license in row
        assert catalog["odinnext"].source.repo in text_of(screen, "#models-summary")


async def test_download_shows_bytes_speed_eta_then_cancel_and_resume(build):
    downloader = Gate(chunk_bytes=1_000_000, speed_bps=2_000_000)
    app = build(downloader=downloader)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "odinnext")
        await pilot.press("d")
        await wait_until(pilot, lambda: "odinnext" in screen.progress)
        downloader.step.release()
        await wait_until(pilot, lambda: screen.progress["odinnext"].done_bytes >= 2_000_000)
        transfer = text_of(screen, "#models-transfer")
        assert "1.9 MiB / 3.8 MiB" in transfer and "1.9 MiB/s" in transfer and "ETA 1.0 s" in transfer
        assert screen.query_one(ProgressBar).percentage == pytest.approx(2_000_000 / 4_001_000)
        assert status(screen, "odinnext") == "downloading 50%"
        await pilot.press("x")
        downloader.step.release()
        await wait_until(pilot, lambda: not screen.cancels, what="the cancel")
        assert "cancelled" in text_of(screen, "#models-message")
        assert status(screen, "odinnext").startswith("partial")
        kept = downloader.done["odinnext"]
        assert kept >= 2_000_000
        first_event = len(downloader.events)
        for _ in range(10):
            downloader.step.release()
        await pilot.press("d")
        await wait_until(pilot, lambda: not screen.cancels and status(screen, "odinnext") == "downloaded")
        assert downloader.events[first_event].done_bytes > kept  # resumed, not restarted
        assert "downloaded" in text_of(screen, "#models-message")


async def test_offline_is_one_clear_message(build):
    app = build(downloader=FakeDownloader(offline=True))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom")
        await pilot.press("d")
        await wait_until(pilot, lambda: not screen.cancels and text_of(screen, "#models-message"))
        message = text_of(screen, "#models-message")
        assert message.startswith("Axiom") and "Offline" in message and "no network" in message
        assert "Traceback" not in message and message.count("\n") == 0
        assert screen.query_one("#models-message").has_class("-error")
        assert status(screen, "axiom") == "not downloaded"


async def test_failed_download_says_so_and_a_retry_resumes(build):
    downloader = FakeDownloader(fail_at=1_500_000)
    app = build(downloader=downloader)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "genesis")
        await pilot.press("d")
        await wait_until(pilot, lambda: not screen.cancels and text_of(screen, "#models-message"))
        assert "connection lost" in text_of(screen, "#models-message")
        assert status(screen, "genesis").startswith("partial")
        await pilot.press("d")
        await wait_until(pilot, lambda: status(screen, "genesis") == "downloaded")


async def test_delete_frees_the_files_after_confirming(build):
    downloader = FakeDownloader()
    app = build(downloader=downloader)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom")
        await pilot.press("d")
        await wait_until(pilot, lambda: status(screen, "axiom") == "downloaded")
        assert "on disk: 3.8 MiB" in text_of(screen, "#models-summary")
        await pilot.press("delete")
        await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "Confirm")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: status(screen, "axiom") == "not downloaded")
        assert "3.8 MiB freed" in text_of(screen, "#models-message")


async def test_loading_a_model_runs_in_a_worker_and_shows_device_dtype_memory(build, catalog):
    stages = []

    def loader(entry, progress, quantize):
        for stage in ("locating files", "loading weights"):
            stages.append(stage)
            progress(stage)
        return FakeEngine(entry_id=entry.id)

    app = build(engine=None, loader=loader)
    async with app.run_test(size=SIZE) as pilot:
        assert "No model loaded" in str(app.chat_screen.query_one(ModelInfo).render())
        screen = await open_models(pilot, "genesis-tiny")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.entry_id == "genesis-tiny")
        assert stages == ["locating files", "loading weights"]
        info = str(app.chat_screen.query_one(ModelInfo).render())
        assert catalog["genesis-tiny"].name in info and "cpu · float32" in info and "random weights" in info
        memory = str(app.chat_screen.query_one("#memory").render())
        assert "weights" in memory and "11.4 MiB" in memory
        assert not screen.is_attached


async def test_load_failure_and_not_downloaded_are_explained(build):
    def loader(entry, progress, quantize):
        raise RuntimeError("genesis-tiny: weights are damaged")

    app = build(engine=None, loader=loader)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "odinnext")
        await pilot.press("enter")
        assert "not downloaded yet: press d" in text_of(screen, "#models-message")
        table = screen.query_one(DataTable)
        table.move_cursor(row=table.get_row_index("genesis-tiny"))
        await pilot.press("enter")
        await wait_until(pilot, lambda: "damaged" in str(app.chat_screen.query_one(ModelInfo).render()))
        assert app.session is None
        assert any("damaged" in n.message for n in app._notifications)


async def test_opening_on_a_model_that_is_not_downloaded_shows_it_on_the_models_screen(build):
    loads = []
    app = build(engine=None, model_id="genesis", loader=lambda entry, progress, quantize: loads.append(entry))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        assert app.screen.entry.id == "genesis" and not loads
        assert any("not downloaded yet" in n.message for n in app._notifications)


async def test_opening_on_a_demo_loads_it_with_the_system_prompt(build):
    app = build(engine=None, model_id="genesis-tiny", system_prompt="Be brief.",
                loader=lambda entry, progress, quantize: FakeEngine(entry_id=entry.id))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.entry_id == "genesis-tiny")
        assert app.chat_screen.conv.system_prompt == "Be brief."


async def test_cancel_without_a_download_says_so_and_status_lines_stay_with_their_row(build):
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom")
        await pilot.press("x")
        message = screen.query_one("#models-message")
        assert "nothing to cancel" in str(message.render())
        await open_models(pilot, "odinnext")
        assert str(message.render()).strip() == ""


def loads_into(calls: list):
    """A loader that records (model id, quantize asked) and gives a FakeEngine quantized as asked."""
    def loader(entry, progress, quantize):
        calls.append((entry.id, quantize))
        quant = quantize or entry.quantize
        return FakeEngine(entry_id=entry.id, quantize=quant, weights_bytes=3_000_000 if quant == "int8" else 12_000_000)
    return loader


async def test_a_model_loads_with_the_quantization_chosen_on_the_models_screen(build):
    calls = []
    app = build(engine=None, loader=loads_into(calls))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom-tiny")
        select = screen.query_one("#models-quantize")
        assert select.value == "none" and not select.disabled  # the catalog's default
        assert "the default" in text_of(screen, "#models-quantize-help")
        await pilot.press("q")
        assert select.value == "int8" and "int8" in text_of(screen, "#models-quantize-help")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.entry_id == "axiom-tiny")
        assert calls == [("axiom-tiny", "int8")]
        memory = str(app.chat_screen.query_one("#memory").render())
        assert "2.9 MiB int8" in memory  # the engine's (quantized) weight bytes, named as such
        # Untouched, the default is left to the engine (the catalog's CPU default).
        screen = await open_models(pilot, "genesis-tiny")
        assert screen.query_one("#models-quantize").value == "none"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.entry_id == "genesis-tiny")
        assert calls[-1] == ("genesis-tiny", None)


async def test_enter_in_the_open_quantization_list_picks_without_loading(build):
    calls = []
    app = build(engine=None, loader=loads_into(calls))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom-tiny")
        select = screen.query_one("#models-quantize")
        select.focus()
        await pilot.press("space")
        await wait_until(pilot, lambda: select.expanded)
        await pilot.press("down", "down", "enter")
        await wait_until(pilot, lambda: not select.expanded)
        assert select.value == "int4" and calls == [] and app.screen is screen


@pytest.mark.parametrize("options, why", [(LoadOptions(eager=True), "--eager"), (LoadOptions(device="cuda"), "GPU")])
async def test_quantization_is_not_offered_where_the_run_cannot_use_it(build, options, why):
    calls = []
    app = build(engine=None, loader=loads_into(calls), load_options=options)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom-tiny")
        assert screen.query_one("#models-quantize").disabled
        assert why in text_of(screen, "#models-quantize-help")
        await pilot.press("q")
        assert why in text_of(screen, "#models-message") and screen.query_one("#models-quantize").value == "none"


async def test_the_command_lines_quantize_is_where_the_models_screen_starts(build):
    calls = []
    app = build(engine=None, loader=loads_into(calls), load_options=LoadOptions(quantize="int4"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot, "axiom-tiny")
        assert screen.query_one("#models-quantize").value == "int4"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.entry_id == "axiom-tiny")
        assert calls == [("axiom-tiny", "int4")]


async def test_every_licence_fits_at_120_columns_and_the_detail_gives_it_whole(build, catalog):
    app = build()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_models(pilot, "axiom")
        table = screen.query_one(DataTable)
        assert table.virtual_size.width <= table.size.width  # nothing scrolled off to the right
        assert f"licence: {catalog['axiom'].license}" in text_of(screen, "#models-summary")
