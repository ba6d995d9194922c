"""The model catalog: models/*.toml -> frozen ModelEntry records, strictly validated.

One TOML file per model. A demo entry (`demo = true`) names a real entry with `extends` and inherits
every table it does not override (tokenizer, chat format, defaults), then adds a `[demo]` table with
the tiny config and seed its random weights are made from. No torch here: the TUI lists the catalog
before any model is loaded.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .contract import SamplingSettings


class CatalogError(ValueError):
    """A catalog file that does not follow the schema, or an unknown model id."""


@dataclass(frozen=True)
class Source:
    """Where a model's files come from on the Hugging Face Hub."""

    repo: str
    #: Branch, tag or commit; pinned where the card allows.
    revision: str = "main"
    #: Glob patterns of the files to fetch (never code or pickles).
    allow: tuple[str, ...] = ("*.safetensors", "*.json")
    #: Approximate total download size, shown before downloading.
    size_bytes: int = 0


@dataclass(frozen=True)
class TokenizerSpec:
    """How to build the model's tokenizer."""

    #: "tiktoken" | "hf-json" | "spike" | "bytes".
    kind: str
    #: tiktoken encoding name (kind tiktoken).
    encoding: str = ""
    #: File name inside the model's (or the tokenizer source's) snapshot.
    file: str = "tokenizer.json"
    #: Special token strings -> ids, as the model was trained (for "bytes", added after the 256 bytes).
    specials: dict[str, int] = field(default_factory=dict)
    #: Read special ids from these downloaded files when present (never trust a guess over them).
    specials_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatFormat:
    """Chat rendering as data: per-role templates with a {content} slot."""

    templates: dict[str, str]
    generation_prompt: str
    #: Prepended once at the very start (a BOS string), "" for none.
    bos: str = ""
    #: "role": a system turn; "prefix_user": prepended to the first user message; "drop".
    system_mode: str = "role"
    #: Joins system text and the first user message in "prefix_user" mode.
    system_separator: str = "\n\n"
    #: Used when a chat sets no system prompt ("" = none).
    default_system: str = ""
    #: Strings whose token ids stop generation (special tokens).
    stop: tuple[str, ...] = ()
    #: Strip surrounding whitespace from message content (Huginn's template does).
    trim_content: bool = False


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model."""

    id: str
    name: str
    architecture: str
    summary: str
    params: int
    context: int
    license: str
    tokenizer: TokenizerSpec
    chat: ChatFormat
    source: Source | None = None
    extra_sources: tuple[Source, ...] = ()
    #: CPU dtype for "auto" (CUDA always uses bf16).
    cpu_dtype: str = "float32"
    generation: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)
    #: Reading options for uncertain architecture facts, passed to ModelArgs.
    options: dict[str, Any] = field(default_factory=dict)
    demo: bool = False
    demo_config: dict[str, Any] = field(default_factory=dict)
    demo_seed: int = 0
    path: Path | None = None
    #: CPU weight-only quantization when nothing else asks ("none" | "int8" | "int4"; engine/quant.py).
    quantize: str = "none"
    #: The real-size config `smollchat bench` builds random weights from (demo entries bench their demo_config).
    bench_config: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> SamplingSettings:
        """The card's generation defaults as SamplingSettings (stop ids are added by the tokenizer)."""
        return SamplingSettings().with_overrides(**self.generation)


_TOP = {"id", "name", "architecture", "summary", "params", "context", "license", "cpu_dtype", "demo", "extends",
        "source", "extra_sources", "tokenizer", "chat", "generation", "controls", "options", "demo_config", "demo_seed",
        "quantize", "bench_config"}
_REQUIRED = ("id", "name", "architecture", "summary", "params", "context", "license", "tokenizer", "chat")
_TOKENIZER_KINDS = ("tiktoken", "hf-json", "spike", "bytes")
_SYSTEM_MODES = ("role", "prefix_user", "drop")
#: Weight-only quantizations the engine offers (torch-free here; engine/quant.py implements them).
QUANTIZE = ("none", "int8", "int4")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _source(d: dict, where: str) -> Source:
    bad = set(d) - {"repo", "revision", "allow", "size_bytes"}
    if bad or "repo" not in d:
        raise CatalogError(f"{where}: a source needs `repo` and may have revision/allow/size_bytes; got {sorted(d)}")
    allow = tuple(d.get("allow", Source.allow))
    forbidden = [p for p in allow if p.endswith((".py", ".bin", ".pt", ".pth", ".pkl", ".ckpt", "*"))]
    if forbidden:
        raise CatalogError(f"{where}: allow patterns may not fetch code or pickles: {forbidden}")
    return Source(d["repo"], str(d.get("revision", "main")), allow, int(d.get("size_bytes", 0)))


def _entry(raw: dict, path: Path) -> ModelEntry:
    where = path.name
    unknown = set(raw) - _TOP
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CatalogError(f"{where}: missing key(s) {', '.join(missing)}")
    if raw["id"] != path.stem:
        raise CatalogError(f"{where}: id {raw['id']!r} must equal the file name")
    tok = dict(raw["tokenizer"])
    if tok.get("kind") not in _TOKENIZER_KINDS:
        raise CatalogError(f"{where}: tokenizer.kind must be one of {_TOKENIZER_KINDS}")
    try:
        tokenizer = TokenizerSpec(**{**tok, "specials": dict(tok.get("specials", {})),
                                     "specials_from": tuple(tok.get("specials_from", ()))})
        chat_raw = dict(raw["chat"])
        chat = ChatFormat(**{**chat_raw, "templates": dict(chat_raw["templates"]), "stop": tuple(chat_raw.get("stop", ()))})
    except (TypeError, KeyError) as e:
        raise CatalogError(f"{where}: bad tokenizer/chat table: {e}") from None
    for role in ("user", "assistant"):
        if "{content}" not in chat.templates.get(role, ""):
            raise CatalogError(f"{where}: chat.templates.{role} must contain {{content}}")
    if chat.system_mode not in _SYSTEM_MODES:
        raise CatalogError(f"{where}: chat.system_mode must be one of {_SYSTEM_MODES}")
    if chat.system_mode == "role" and "{content}" not in chat.templates.get("system", ""):
        raise CatalogError(f"{where}: system_mode 'role' needs chat.templates.system with {{content}}")
    demo = bool(raw.get("demo", False))
    source = None if demo else _source(raw.get("source", {}), where)
    if demo and not raw.get("demo_config"):
        raise CatalogError(f"{where}: a demo entry needs a [demo_config] table (the tiny model config)")
    if raw.get("quantize", "none") not in QUANTIZE:
        raise CatalogError(f"{where}: quantize must be one of {', '.join(QUANTIZE)}; got {raw.get('quantize')!r}")
    bench = raw.get("bench_config", {})
    if not isinstance(bench, dict) or (bench and not isinstance(bench.get("model_type"), str)):
        raise CatalogError(f"{where}: [bench_config] must be a table with the real config, model_type included")
    entry = ModelEntry(
        id=raw["id"], name=raw["name"], architecture=raw["architecture"], summary=raw["summary"].strip(),
        params=int(raw["params"]), context=int(raw["context"]), license=raw["license"],
        tokenizer=tokenizer, chat=chat, source=source,
        extra_sources=() if demo else tuple(_source(s, where) for s in raw.get("extra_sources", [])),
        cpu_dtype=raw.get("cpu_dtype", "float32"), generation=dict(raw.get("generation", {})),
        controls=dict(raw.get("controls", {})), options=dict(raw.get("options", {})), demo=demo,
        demo_config=dict(raw.get("demo_config", {})), demo_seed=int(raw.get("demo_seed", 0)), path=path,
        quantize=raw.get("quantize", "none"), bench_config=dict(bench))
    try:
        entry.sampling().validate()
    except (TypeError, ValueError) as e:
        raise CatalogError(f"{where}: [generation] {e}") from None
    return entry


def catalog_dirs() -> list[Path]:
    """Where catalog files live: the packaged copy, or the repo's models/ in a source checkout."""
    pkg = Path(__file__).parent
    return [d for d in (pkg / "catalog_data", pkg.parent / "models") if d.is_dir()][:1]


def load_catalog(dirs: list[Path] | None = None) -> dict[str, ModelEntry]:
    """Read and validate every models/*.toml; demo entries inherit from the entry they extend."""
    raws: dict[str, tuple[dict, Path]] = {}
    for d in dirs or catalog_dirs():
        for path in sorted(Path(d).glob("*.toml")):
            try:
                raws[path.stem] = (tomllib.loads(path.read_text(encoding="utf-8")), path)
            except tomllib.TOMLDecodeError as e:
                raise CatalogError(f"{path}: {e}") from None
    entries: dict[str, ModelEntry] = {}
    for stem, (raw, path) in raws.items():
        base_id = raw.get("extends")
        if base_id:
            if base_id not in raws:
                raise CatalogError(f"{path.name}: extends unknown entry {base_id!r}")
            base = {k: v for k, v in raws[base_id][0].items() if k not in ("id", "source", "extra_sources")}
            raw = _merge(base, {k: v for k, v in raw.items() if k != "extends"})
        entries[stem] = _entry(raw, path)
    return entries


def get_entry(model_id: str, catalog: dict[str, ModelEntry] | None = None) -> ModelEntry:
    catalog = catalog if catalog is not None else load_catalog()
    if model_id not in catalog:
        raise CatalogError(f"unknown model {model_id!r}; known: {', '.join(sorted(catalog))} "
                           "(or pass a local model directory)")
    return catalog[model_id]
