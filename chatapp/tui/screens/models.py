"""The models screen: the catalog (name, architecture, size, context, licence, downloaded or not),
downloads with a real progress bar (bytes, speed, ETA) that cancel and resume, delete with disk use,
and loading the selected model (the app loads it in a worker and shows the stages) with a chosen
weight-only quantization (widgets/quantize_choice.py).

Downloads run in thread workers that only post `DownloadProgressed`/`DownloadFinished`.
"""
from __future__ import annotations

import threading
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, ProgressBar, Static

from ..backend import error_text
from ..figures import human_duration
from ...units import human_bytes, human_count
from ...textsafe import plain
from ..keys import bindings
from ..messages import DownloadFinished, DownloadProgressed
from ..widgets.quantize_choice import QuantizeChoice
from .dialogs import Confirm

COLUMNS = ("Model", "Status", "Architecture", "Params", "Download", "Context", "Licence")


def short_licence(text: str) -> str:
    """The table's licence cell: an identifier as it is ("Apache-2.0"), a sentence by its first word
    (the detail below the table gives the whole text), so the column fits a 120-column terminal."""
    return text.split()[0] + "…" if " " in text.strip() else text


class ModelsScreen(Screen):
    CSS_PATH = "models.tcss"
    BINDINGS = bindings("models")

    def __init__(self, select: str | None = None) -> None:
        super().__init__()
        self.select = select
        """Model id to put the cursor on (default: the loaded model)."""
        self.cancels: dict[str, threading.Event] = {}
        """Cancel flags of the downloads in progress, by model id."""
        self.progress: dict[str, Any] = {}
        """Latest progress record of each download in progress."""

    def compose(self) -> ComposeResult:
        yield Static("Models", id="models-title")
        yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        with Vertical(id="models-detail"):
            yield Static("", id="models-summary", markup=False)
            start = self.app.catalog.get(self._start() or "") or next(iter(self.app.catalog.values()), None)
            yield QuantizeChoice(self.app.load_options, start)
            yield ProgressBar(total=100, show_eta=False, id="models-progress")
            yield Static("", id="models-transfer", markup=False)
            yield Static("", id="models-message", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        for entry in self.app.catalog.values():
            table.add_row(*self._cells(entry), key=entry.id)
        start = self._start()
        if start in self.app.catalog:
            table.move_cursor(row=table.get_row_index(start))
        table.focus()
        self._show_detail()

    def _start(self) -> str | None:
        """The model id the cursor starts on."""
        return self.select or getattr(self.app, "entry_id", None)

    # Table.
    def _status(self, entry) -> str:
        if entry.id in self.progress:
            p = self.progress[entry.id]
            frac = p.done_bytes / p.total_bytes if p.total_bytes else 0.0
            return f"downloading {frac * 100:.0f}%"
        loaded = " · loaded" if entry.id == getattr(self.app, "entry_id", None) else ""
        if entry.demo:
            return "demo · random weights" + loaded
        if self.app.downloader.is_downloaded(entry):
            return "downloaded" + loaded
        partial = self._disk(entry)
        return f"partial {human_bytes(partial)}" if partial else "not downloaded"

    def _disk(self, entry) -> int:
        try:
            return int(self.app.downloader.disk_usage(entry))
        except Exception:  # a broken cache must not hide the catalog; the detail line reports it
            return 0

    def _cells(self, entry) -> tuple[str, ...]:
        size = "built here" if entry.demo else (human_bytes(entry.source.size_bytes) if entry.source else "?")
        return (entry.name, self._status(entry), entry.architecture, human_count(entry.params), size,
                f"{entry.context:,}", short_licence(entry.license))

    def _refresh_row(self, entry_id: str) -> None:
        table = self.query_one(DataTable)
        entry = self.app.catalog[entry_id]
        for name, value in zip(COLUMNS, self._cells(entry)):
            table.update_cell(entry_id, name, value)

    @property
    def entry(self):
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return self.app.catalog.get(key.value)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.say("")  # a status line belongs to the row it was said for
        self._show_detail()

    def _show_detail(self) -> None:
        entry = self.entry
        if entry is None:
            return
        lines = [f"{entry.name}  ({entry.id})", entry.summary]
        if entry.source:
            lines.append(f"source: {entry.source.repo} @ {entry.source.revision}")
        lines.append(f"licence: {entry.license}")
        used = self._disk(entry)
        if used:
            lines.append(f"on disk: {human_bytes(used)}")
        self.query_one("#models-summary", Static).update(plain("\n".join(lines)))
        self.query_one(QuantizeChoice).show(entry)
        self._show_progress(entry.id)

    # Quantization.
    def action_quantize(self) -> None:
        """Cycle the selected model's quantization: none -> int8 -> int4."""
        if self.entry is not None:
            why_not = self.query_one(QuantizeChoice).cycle(self.entry)
            if why_not:
                self.say(why_not)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Enter picks an option in the open quantization list; it loads only from the table.
        return not (action == "load" and self.query_one(QuantizeChoice).expanded)

    def _show_progress(self, entry_id: str) -> None:
        bar = self.query_one(ProgressBar)
        transfer = self.query_one("#models-transfer", Static)
        p = self.progress.get(entry_id)
        bar.display = transfer.display = p is not None
        if p is None:
            return
        bar.update(total=max(p.total_bytes, 1), progress=p.done_bytes)
        eta = human_duration(p.eta_s) if p.eta_s is not None else "?"
        transfer.update(f"{human_bytes(p.done_bytes)} / {human_bytes(p.total_bytes)} · "
                        f"{human_bytes(p.speed_bps)}/s · ETA {eta} · {p.file}")

    def say(self, text: str, error: bool = False) -> None:
        message = self.query_one("#models-message", Static)
        message.set_class(error, "-error")
        message.update(plain(text))

    # Actions.
    def action_load(self) -> None:
        entry = self.entry
        if entry is None:
            return
        if not entry.demo and not self.app.downloader.is_downloaded(entry):
            self.say(f"{entry.name} is not downloaded yet: press d to download it "
                     f"({human_bytes(entry.source.size_bytes) if entry.source else 'size unknown'}).", error=True)
            return
        self.app.load_model(entry, self.query_one(QuantizeChoice).asked(entry))
        self.dismiss()

    def action_download(self) -> None:
        entry = self.entry
        if entry is None or entry.id in self.cancels:
            return
        if entry.demo:
            self.say(f"{entry.name} is a demo: its random weights are made on this machine when you load it.")
            return
        if self.app.downloader.is_downloaded(entry):
            self.say(f"{entry.name} is already downloaded.")
            return
        self.cancels[entry.id] = threading.Event()
        self.say(f"Downloading {entry.name}…")
        self._download(entry, self.cancels[entry.id])

    @work(thread=True, group="download")
    def _download(self, entry, cancel: threading.Event) -> None:
        try:
            path = self.app.downloader.download(
                entry, progress=lambda p: self.post_message(DownloadProgressed(entry.id, p)), cancel=cancel)
        except Exception as e:  # reported on screen as one sentence, never raised into the UI
            self.post_message(DownloadFinished(entry.id, error=error_text(e), cancelled=cancel.is_set()))
            return
        self.post_message(DownloadFinished(entry.id, path=path, cancelled=cancel.is_set()))

    def action_cancel_download(self) -> None:
        entry = self.entry
        if entry is not None and entry.id in self.cancels:
            self.cancels[entry.id].set()
            self.say(f"Cancelling {entry.name}…")
        elif entry is not None:
            self.say(f"{entry.name} is not downloading: nothing to cancel (d downloads it).")

    def on_download_progressed(self, event: DownloadProgressed) -> None:
        if event.entry_id not in self.cancels:
            return
        self.progress[event.entry_id] = event.progress
        self._refresh_row(event.entry_id)
        if self.entry is not None and self.entry.id == event.entry_id:
            self._show_progress(event.entry_id)

    def on_download_finished(self, event: DownloadFinished) -> None:
        self.cancels.pop(event.entry_id, None)
        self.progress.pop(event.entry_id, None)
        name = self.app.catalog[event.entry_id].name
        if event.cancelled:
            self.say(f"{name}: download cancelled; press d to resume where it stopped.")
        elif event.error:
            offline = event.error.startswith("Offline")
            self.say(f"{name}: {event.error}" + ("" if offline else " Press d to retry; finished files are kept."),
                     error=True)
        else:
            self.say(f"{name} downloaded. Press Enter to load it.")
        self._refresh_row(event.entry_id)
        self._show_detail()

    def action_delete_model(self) -> None:
        entry = self.entry
        if entry is None or entry.id in self.cancels:
            return
        used = self._disk(entry)
        if not used:
            self.say(f"{entry.name} has no files on disk.")
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.app.downloader.delete(entry)
            except Exception as e:  # shown, never raised into the UI
                self.say(f"Could not delete {entry.name}: {error_text(e)}", error=True)
                return
            self.say(f"Deleted {entry.name} ({human_bytes(used)} freed).")
            self._refresh_row(entry.id)
            self._show_detail()

        self.app.push_screen(Confirm(f"Delete the files of {entry.name}?", detail=f"{human_bytes(used)} on disk"),
                             answered)

    def action_close(self) -> None:
        self.dismiss()

