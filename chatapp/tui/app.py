"""The smollchat Textual app and its factory.

`make_app(...)` builds the app from explicit inputs (posting's factory pattern): the CLI calls it
with a model id and system prompt, the tests with a FakeEngine, a temporary Store and a
FakeDownloader. Nothing here imports torch: a model loads into its own process (chat/engine_host.py),
or with --no-engine-process the load worker imports the engine, only when a model is actually loaded.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen

from .. import locations
from ..textsafe import displayable
from ..catalog import CatalogError, ModelEntry, load_catalog
from ..chat.pool import Footprint, ModelPool, rough_footprint
from ..chat.session import Session
from ..contract import INSPECT_DETAIL
from ..chat.store import Store, StoreError
from .backend import Loader, LoadOptions, default_downloader, error_text
from .keys import KEYS, KeymapError, bindings, keys_for, load_keymap
from .messages import ModelLoaded, ModelLoadFailed, ModelLoading
from .screens.chat import ChatScreen
from .screens.compare import CompareScreen, default_words
from .screens.help import HelpScreen
from .screens.models import ModelsScreen
from .themes import DEFAULT_THEME, VARIABLE_DEFAULTS, load_themes, shipped_theme_dir
from .widgets.inspector_actions import recorded_final


class SmollChat(App):
    """The app: holds the services (catalog, store, downloader, model pool) and the chat's model.

    The chat's engine comes from the model pool (chat/pool.py), pinned while it is the chat's; the compare
    screen takes its engines from the same pool, within the same memory budget."""

    CSS_PATH = "app.tcss"
    TITLE = "smollchat"
    BINDINGS = bindings("app")

    def __init__(self, *, catalog: dict[str, ModelEntry], store: Store, downloader: Any, loader: Loader,
                 engine: Any = None, entry: ModelEntry | None = None, model_id: str | None = None,
                 system_prompt: str | None = None, keymap: dict[str, str] | None = None,
                 theme_dirs: Iterable[Path] = (), clock: Callable[[], float] = time.time,
                 notices: Iterable[str] = (), load_options: LoadOptions = LoadOptions(),
                 memory_budget: int | None = None, estimate: Callable[[ModelEntry], Footprint] | None = None) -> None:
        super().__init__()
        self.catalog = catalog
        self.store = store
        self.downloader = downloader
        self.loader = loader
        self.load_options = load_options
        """The command line's device, dtype, compile, --eager and --quantize (the models screen offers
        quantization only where they allow it)."""
        self.pool = ModelPool(catalog, self._pool_load, budget=memory_budget, estimate=estimate or self._estimate)
        """Every engine the app holds (the chat's, pinned as `_main_key`; compare's), within one memory budget."""
        self._main_key: str | None = None
        self.clock = clock
        """Wall clock for ages in the chat list (fixed in snapshot tests)."""
        self.keymap = dict(keymap or {})
        self.initial_system = system_prompt
        self.entry: ModelEntry | None = None
        self.session: Session | None = None
        self.info: dict[str, Any] = {}
        self._start_engine = (engine, entry)
        self._start_model = model_id
        self._theme_dirs = list(theme_dirs)
        self._notices = list(notices)
        self.chat_screen: ChatScreen | None = None

    @property
    def entry_id(self) -> str | None:
        return self.entry.id if self.entry is not None else None

    def notify(self, message: str, *, title: str = "", severity: str = "information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every toast (widgets' and screens' `notify` come here) is plain text: its message and title
        often quote a chat title, a file name or an error, which must neither run as markup nor send
        control sequences to the terminal. `markup` is accepted for Textual's signature and ignored."""
        super().notify(displayable(str(message)), title=displayable(str(title)), severity=severity, timeout=timeout,
                       markup=False)

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(VARIABLE_DEFAULTS)

    def on_mount(self) -> None:
        themes, problems = load_themes(self._theme_dirs)
        for theme in themes:
            self.register_theme(theme)
        saved = self.store.get_setting("theme") if hasattr(self.store, "get_setting") else None
        self.theme = saved if saved in self.available_themes else (
            DEFAULT_THEME if DEFAULT_THEME in self.available_themes else "textual-dark")
        self.set_keymap(self.keymap)
        self.chat_screen = ChatScreen()
        self.push_screen(self.chat_screen)
        for text in [*self._notices, *problems]:
            self.notify(text, severity="warning", timeout=10)
        engine, entry = self._start_engine
        if engine is not None:
            self.use_engine(engine, entry)
        elif self._start_model:
            self._open_model(self._start_model)
        else:
            self._offer_last_model()

    def _offer_last_model(self) -> None:
        """No model asked for: name the last chat's model and how to load it (a model can be many
        GB, so it is never loaded unasked)."""
        try:
            last = self.store.list_chats()[:1]
        except StoreError:
            return
        entry = self.catalog.get(last[0].model_id or "") if last else None
        if entry is not None:
            self.notify(f"Your last chat used {entry.name}: Ctrl+O, then Enter, loads it.", timeout=10)

    def suggested_model(self) -> str | None:
        """The model the models screen starts on: the open chat's, when another (or none) is loaded."""
        screen = self.chat_screen
        conv = screen.conv if screen is not None and screen.is_mounted else None
        wanted = conv.model_id if conv is not None else None
        if wanted is None and self.entry is None:
            try:
                wanted = next((c.model_id for c in self.store.list_chats()[:1]), None)
            except StoreError:
                wanted = None
        return wanted if wanted in self.catalog and wanted != self.entry_id else None

    def watch_theme(self, theme: str) -> None:
        if self.is_mounted and hasattr(self.store, "set_setting"):
            self.store.set_setting("theme", theme)

    # Models.
    def _pool_load(self, entry: ModelEntry, progress: Callable[[str], None]) -> Any:
        """The pool's loader: a variant's quantization (an entry whose quantize differs from the catalog's) is
        asked for explicitly; otherwise the loader applies the entry's default."""
        base = self.catalog.get(entry.id)
        return self.loader(entry, progress, entry.quantize if base is None or base.quantize != entry.quantize else None)

    def _estimate(self, entry: ModelEntry) -> Footprint:
        """A model's bytes before it loads. With the engine in a child process this process stays torch-free,
        so the catalog's figure (chat.pool.rough_footprint); in-process, the engine's own (exact weights and
        state under the command line's load options; it imports torch, as the load right after it does)."""
        opts = self.load_options
        if opts.engine_process:
            return rough_footprint(entry)
        from ..engine.runtime import footprint

        return footprint(entry, device=opts.device, dtype=opts.dtype, quantize="none" if opts.eager else None)

    def _open_model(self, model_id: str) -> None:
        entry = self.catalog.get(model_id)
        if entry is not None and not entry.demo and not self.downloader.is_downloaded(entry):
            self.notify(f"{entry.name} is not downloaded yet: press d to download it.", severity="warning")
            self.push_screen(ModelsScreen(select=entry.id))
        elif entry is not None:
            self.load_model(entry, self.load_options.quantize)
        elif Path(model_id).is_dir():
            self.load_model(Path(model_id), self.load_options.quantize)
        else:
            self.notify(f"Unknown model {model_id!r}; pick one on the models screen.", severity="error")
            self.push_screen(ModelsScreen())

    def load_model(self, entry: ModelEntry | Path, quantize: str | None = None) -> None:
        """Load a catalog entry (or a local model directory) in a worker; the chat screen shows the stages.
        `quantize` (none/int8/int4) overrides the entry's default quantization."""
        name = entry.name if isinstance(entry, ModelEntry) else str(entry)
        self.chat_screen.model_loading(name, "starting")
        if self._main_key is not None:
            # The chat's model no longer needs pinning: it may unload if the new one needs its room.
            self.pool.release(self._main_key)
            self._main_key = None
        self._load(entry, quantize)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, entry: ModelEntry | Path, quantize: str | None) -> None:
        entry_id = entry.id if isinstance(entry, ModelEntry) else str(entry)
        try:
            if isinstance(entry, Path):
                # A local directory goes to the loader as it is (the engine's side reads its config); the pool
                # holds it from then on, charged what it reports.
                engine = self.loader(entry, lambda stage: self.post_message(ModelLoading(entry_id, stage)), quantize)
                entry = engine.entry
                key = self.pool.add_engine(engine, entry_id, pin=True)
            else:
                key = self.pool.add_entry(entry)
                if quantize is not None and quantize != entry.quantize:
                    key = self.pool.variant(key, quantize=quantize)
                engine = self.pool.acquire(key, lambda stage: self.post_message(ModelLoading(entry_id, stage)))
        except Exception as e:  # any load failure is shown as one message; the app keeps running
            self.post_message(ModelLoadFailed(entry_id, error_text(e)))
            return
        self.post_message(ModelLoaded(engine, entry, key))

    def on_model_loading(self, event: ModelLoading) -> None:
        entry = self.catalog.get(event.entry_id)
        self.chat_screen.model_loading(entry.name if entry else event.entry_id, event.stage)

    def on_model_loaded(self, event: ModelLoaded) -> None:
        self.use_engine(event.engine, event.entry, key=event.key)
        self.notify(f"{event.entry.name} is ready on {self.info.get('device', '?')}.")

    def on_model_load_failed(self, event: ModelLoadFailed) -> None:
        if self.session is not None and self._main_key is None:
            if self.pool.holds(self.session.engine):  # the chat keeps its model: pin it again
                self._main_key = self.pool.add_engine(self.session.engine, self.entry.id, pin=True)
            else:  # it was unloaded to make room for the one that failed
                self.session, self.entry, self.info = None, None, {}
                self.chat_screen.model_changed()
        self.chat_screen.model_loading("", "", error=event.error)
        self.notify(event.error, title="The model did not load", severity="error", timeout=10)

    def use_engine(self, engine: Any, entry: ModelEntry | None = None, key: str | None = None) -> None:
        """Make `engine` the model the chats talk to; the app reaches it only through the session. `key`: its
        pool key when the pool loaded it (pinned already), else the pool takes it in. The chat's previous
        engine stays in the pool (switching back is instant) until its room is needed: then it is closed."""
        if key is None:
            key = self.pool.add_engine(engine, (entry or engine.entry).id, pin=True)
        if self._main_key is not None and self._main_key != key:
            self.pool.release(self._main_key)
        elif self._main_key == key:
            self.pool.release(key)  # pinned once per holder: the chat holds it once
        self._main_key = key
        self.entry = entry or engine.entry
        self.session = Session(engine, entry=self.entry, store=self.store)
        self.session.inspect = replace(INSPECT_DETAIL, final=recorded_final(self.store))  # the inspector's setting
        # The entry names the model; the engine knows how it runs (device, dtype, depth, width).
        entry = self.entry
        self.info = {"params": entry.params, **self.session.info(), "name": entry.name,
                     "architecture": entry.architecture, "demo": entry.demo}
        self.chat_screen.model_changed()

    def on_unmount(self) -> None:
        self.pool.close()  # engines in child processes end with the app

    # Actions and commands.
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_models(self) -> None:
        if not isinstance(self.screen, ModelsScreen):
            self.push_screen(ModelsScreen(select=self.suggested_model()))

    def action_compare(self) -> None:
        """The chat's last question answered twice, side by side (screens/compare.py)."""
        chat = self.chat_screen
        if isinstance(self.screen, CompareScreen):
            return
        if self.screen is not chat or chat.conv is None:
            self.notify("Compare works from a chat: open one first.", severity="warning")
            return
        if chat.live.busy:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return
        models = list(dict.fromkeys([*([self.entry_id] if self.entry_id else []), *(
            k for k, e in sorted(self.catalog.items()) if e.demo or self.downloader.is_downloaded(e))]))
        words = default_words(self.session.controls if self.session is not None else ())
        try:
            screen = CompareScreen(chat.conv, models, self.entry_id, words)
        except ValueError as e:
            self.notify(str(e), severity="warning")
            return
        self.push_screen(screen, self._compared)

    def _compared(self, kept: list[str] | None) -> None:
        if kept:
            self.call_later(self.chat_screen.actions.show, kept[-1])

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every action of the screen in front, with its keys, plus Textual's own commands."""
        yield from super().get_system_commands(screen)
        targets: dict[str, Any] = {"app": self}
        if isinstance(screen, ChatScreen):
            targets.update(chat=screen, composer=screen.composer, messages=screen.view,
                           chats=screen.query_one("#chat-options"))
            if screen.inspector.current is not None:
                targets["inspector"] = screen.inspector.current
        elif isinstance(screen, ModelsScreen):
            targets["models"] = screen
        elif isinstance(screen, CompareScreen):
            targets["compare"] = screen
        # Textual lists its own palette, quit and theme commands; one entry per description besides
        # (the chat list's Delete and the screen's F8 both delete a chat).
        seen = {"command_palette", "quit", "change_theme"}
        for k in KEYS:
            if k.scope in targets and k.action not in seen and k.description not in seen:
                seen.update((k.action, k.description))
                yield SystemCommand(f"{k.description}", f"{keys_for(k.id, self.keymap)} · {k.id}",
                                    lambda k=k, node=targets[k.scope]: self.run_action(k.action, node))


def make_app(engine: Any = None, catalog: dict[str, ModelEntry] | None = None, store: Store | None = None,
             downloader: Any = None, model_id: str | None = None, system_prompt: str | None = None, *,
             loader: Loader | None = None, entry: ModelEntry | None = None, keymap: dict[str, str] | None = None,
             clock: Callable[[], float] = time.time, load_options: LoadOptions = LoadOptions(),
             memory_budget: int | None = None) -> SmollChat:
    """Build the app. Everything left None comes from the user's environment:
    the catalog from models/*.toml, the store from the data dir, downloads from `hub`,
    the keymap from keys.toml, themes from themes/ and the config dir; models load as `load_options` say,
    within the model pool's memory budget (None: from the memory available, chat.pool.default_budget).
    A `loader` given (tests) comes with the catalog-only estimate of a model's bytes; the real loader
    with the engine's own."""
    notices: list[str] = []
    if catalog is None:
        try:
            catalog = load_catalog()
        except CatalogError as e:
            notices.append(f"The model catalog could not be read: {e}")
            catalog = {}
    if store is None:
        try:
            store = Store(locations.database_path())
        except StoreError as e:
            # The store copied the file aside and left it untouched; keep working in a second database
            # (the same one on every start until the first is dealt with, so new chats stay together).
            spare = locations.data_dir() / "chats-while-damaged.sqlite3"
            try:
                store = Store(spare)
                notices.append(f"{e} Until then, chats are kept in {spare}.")
            except StoreError as again:
                # Neither file can be opened (a read-only or full disk): the app still works, in memory.
                notices.append(f"{e} {again} Chats of this session are kept in memory only: export what you "
                               "want to keep.")
                store = Store(":memory:")
    if keymap is None:
        try:
            keymap = load_keymap(locations.keys_path())
        except KeymapError as e:
            notices.append(f"{e}; using the default keys")
            keymap = {}
    themes = [d for d in (shipped_theme_dir(), locations.user_themes_dir()) if d is not None]
    return SmollChat(catalog=catalog, store=store, downloader=downloader or default_downloader(),
                     loader=loader or load_options.loader(), engine=engine, entry=entry, model_id=model_id,
                     system_prompt=system_prompt, keymap=keymap, theme_dirs=themes, clock=clock, notices=notices,
                     load_options=load_options, memory_budget=memory_budget,
                     estimate=rough_footprint if loader is not None else None)
