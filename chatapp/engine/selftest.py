"""`smollchat selftest MODEL`: does this checkpoint, read the way the catalog says, look like a trained model?

It scores the negative log-likelihood per token of a short built-in English paragraph and of a ChatML
exchange (rendered with the model's own chat format). A trained small model scores about 2-4 nats/token on
English with a 32k vocabulary; a misread checkpoint (wrong norm convention, FFN form, RoPE layout...) scores
near the uniform ln(V). For an architecture with named reading options (`Model.OPTIONS`, e.g. OdinNext), it
also scores every alternative reading, one switch at a time from the catalog's, and says which one the
weights support. Without a tokenizer (a fixture directory) it scores token ids sampled from the model
itself, which checks the machinery: the model's own reading must then come out best.

Only our engine's code runs: weights load from safetensors, nothing from the download is executed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ENGLISH = (
    "The old lighthouse stood at the edge of the harbour for more than a hundred years. Every evening the "
    "keeper climbed the narrow stairs, cleaned the glass and lit the lamp, so that fishing boats could find "
    "their way home through the fog. When the town installed an automatic light, the keeper moved into a "
    "small house near the market, but he still walked to the pier each night to watch the beam sweep across "
    "the water."
)
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris. It is also the largest city in the country."},
    {"role": "user", "content": "Give me one tip for learning a new language."},
    {"role": "assistant", "content": "Practice a little every day, for example by reading short articles or "
                                     "speaking with a friend."},
]
#: Fraction of the uniform NLL ln(V) above which a model cannot be a trained one reading English.
IMPLAUSIBLE = 0.6
#: Options whose logits differ from the current reading by at most this much cannot be told apart.
SAME_LOGITS = 1e-3
#: Nats/token by which an alternative must beat the current reading to count as clearly better.
MARGIN = 0.02


@dataclass
class TextScore:
    name: str
    tokens: int  # predicted tokens (all but the first)
    nll: float  # mean nats/token

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))


@dataclass
class OptionScore:
    option: str
    value: Any
    nll: float  # mean nats/token over every scored sequence
    logit_diff: float  # max |logits - logits of the current reading|
    current: bool = False
    error: str = ""  # why this value could not be scored on this checkpoint


@dataclass
class SelftestReport:
    model: str
    architecture: str
    directory: str
    device: str
    dtype: str
    vocab_size: int
    mode: str  # "text" (tokenizer present), "given ids" or "sampled ids" (no tokenizer)
    texts: list[TextScore] = field(default_factory=list)
    options: dict[str, list[OptionScore]] = field(default_factory=dict)
    reading: dict[str, Any] = field(default_factory=dict)
    #: The reading the weights support best (greedy search from `reading`); equal to it when all is well.
    suggested: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def nll(self) -> float:
        n = sum(t.tokens for t in self.texts)
        return sum(t.nll * t.tokens for t in self.texts) / n if n else float("nan")

    def supported(self, option: str) -> Any:
        """The value of an option the weights support (the current one unless another is clearly better)."""
        return self.suggested.get(option, self.reading.get(option))

    @property
    def better_reading(self) -> dict[str, Any]:
        """Options the weights clearly want changed from the current reading (after the greedy search)."""
        return {k: v for k, v in self.suggested.items() if self.reading.get(k) != v}

    @property
    def ok(self) -> bool:
        return not self.warnings and not self.better_reading


def current_reading(model) -> dict[str, Any]:
    """The model's reading-option values (its `options()`, else the ModelArgs fields of those names)."""
    if hasattr(model, "options"):
        return dict(model.options())
    return {k: getattr(model.args, k) for k in type(model).OPTIONS}


def logits_of(model, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Full causal forward (no state) of each [T] sequence -> [T, V] logits (one batch if lengths agree)."""
    with torch.inference_mode():
        if len({ids.numel() for ids in sequences}) == 1:
            return list(model(torch.stack(list(sequences))).float().unbind(0))
        return [model(ids[None])[0].float() for ids in sequences]


def nll_of(logits: Sequence[torch.Tensor], sequences: Sequence[torch.Tensor],
           targets: Sequence[torch.Tensor] | None = None) -> tuple[float, int]:
    """Summed NLL (nats) of each next id, and the count of predicted ids.

    With `targets` (a [T-1, V] distribution per sequence) the NLL is the exact expectation over the next id
    under that distribution (a cross-entropy) instead of the NLL of the id that was drawn.
    """
    total, count = 0.0, 0
    for i, (lg, ids) in enumerate(zip(logits, sequences)):
        logp = torch.log_softmax(lg[:-1].double(), dim=-1)  # fp64: option scores may differ by 1e-6
        if targets is None:
            total -= logp.gather(-1, ids[1:, None]).sum().item()
        else:
            total -= (targets[i] * logp).sum().item()
        count += ids.numel() - 1
    return total, count


def sample_ids(model, n_seq: int = 4, length: int = 48, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    """Sequences drawn from the model itself at temperature 1 (cached decode), each from a random first id."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for _ in range(n_seq):
            ids = [int(torch.randint(0, model.vocab_size, (1,), generator=gen))]
            state = model.make_state(length, device, torch.float32)
            logits = model(torch.tensor([ids], device=device), state, last_only=True)[0, -1]
            for _ in range(length - 1):
                probs = torch.softmax(logits.float().cpu(), dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=gen)))
                logits = model(torch.tensor([[ids[-1]]], device=device), state, last_only=True)[0, -1]
            out.append(torch.tensor(ids, device=device))
    return out


def rank_options(with_reading: Callable[[dict[str, Any]], Any], reading: dict[str, Any],
                 choices: dict[str, tuple[Any, ...]], sequences: Sequence[torch.Tensor],
                 expected: bool = False) -> dict[str, list[OptionScore]]:
    """Score every value of every reading option, one switch at a time from `reading`.

    `with_reading(r)` returns the model under the complete reading `r` (switched in place, or reloaded); a
    value it cannot apply (ValueError, LoadError) is listed with the reason. `expected=True` (for ids
    sampled from this model) scores each position by its expected NLL under the base reading's next-id
    distribution: the base then scores its entropy and any other reading that plus a KL divergence, with
    no dependence on which ids happened to be drawn.
    """
    base = logits_of(with_reading(reading), sequences)
    targets = [torch.softmax(lg[:-1].double(), dim=-1) for lg in base] if expected else None
    base_total, n = nll_of(base, sequences, targets)
    out: dict[str, list[OptionScore]] = {}
    for name, values in choices.items():
        rows = []
        for value in values:
            if value == reading[name]:
                rows.append(OptionScore(name, value, base_total / n, 0.0, current=True))
                continue
            try:
                logits = logits_of(with_reading({**reading, name: value}), sequences)
                total, _ = nll_of(logits, sequences, targets)
                diff = max((a - b).abs().max().item() for a, b in zip(logits, base))
                rows.append(OptionScore(name, value, total / n, diff))
            except (ValueError, RuntimeError) as e:
                rows.append(OptionScore(name, value, float("nan"), float("nan"), error=str(e)))
        out[name] = rows
    return out


def clearly_better(rows: list[OptionScore]) -> OptionScore | None:
    """The best value if it beats the current one by more than MARGIN with logits that really differ."""
    cur = next(r for r in rows if r.current)
    scored = [r for r in rows if not r.error and not r.current and r.logit_diff > SAME_LOGITS]
    best = min(scored, key=lambda r: r.nll, default=None)
    return best if best is not None and best.nll < cur.nll - MARGIN else None


def suggest_reading(with_reading, reading: dict[str, Any], choices: dict[str, tuple[Any, ...]],
                    sequences: Sequence[torch.Tensor], tables: dict[str, list[OptionScore]]) -> dict[str, Any]:
    """Greedy coordinate search from `reading`: adopt the single most helpful switch, re-rank, repeat.

    One-switch scores around a misread base are noisy (with a wrong FFN form almost any change can help a
    little); taking the largest gain first and re-ranking lets the unrelated options settle back.
    """
    reading = dict(reading)
    for _ in range(len(choices)):
        gains = {k: (next(r for r in rows if r.current).nll - b.nll, b.value)
                 for k, rows in tables.items() if (b := clearly_better(rows)) is not None}
        if not gains:
            break
        name = max(gains, key=lambda k: gains[k][0])
        reading[name] = gains[name][1]
        tables = rank_options(with_reading, reading, choices, sequences)
    return reading


def _encode_texts(tokenizer) -> list[tuple[str, list[int]]]:
    texts = [("english paragraph", tokenizer.encode(ENGLISH, allow_special=False))]
    if tokenizer.chat is not None:
        texts.append(("chatml exchange", tokenizer.render(CHAT, add_generation_prompt=False, system="")))
    return texts


def selftest_model(model, tokenizer=None, name: str = "model", directory: str = "", device="cpu",
                   switch: Callable[[dict[str, Any]], Any] | None = None, seed: int = 0,
                   sequences: Sequence[torch.Tensor] | None = None) -> SelftestReport:
    """Score a loaded model on the built-in texts (with a tokenizer), on given id `sequences`, or else on
    ids sampled from itself."""
    dev = torch.device(device)
    dtype = next(model.parameters()).dtype
    report = SelftestReport(name, type(model).__module__.rsplit(".", 1)[-1], directory, str(dev),
                            str(dtype).removeprefix("torch."), model.vocab_size,
                            "text" if tokenizer is not None else "given ids" if sequences else "sampled ids")
    named: list[tuple[str, torch.Tensor]] = []
    if tokenizer is not None:
        named = [(label, torch.tensor(ids, device=dev)) for label, ids in _encode_texts(tokenizer)]
        if max(int(ids.max()) for _, ids in named) >= model.vocab_size:
            # A fixture directory borrows the catalog entry's tokenizer, which may not fit its tiny vocabulary.
            report.notes.append(f"the tokenizer's ids go past this model's {model.vocab_size}-id vocabulary; "
                                "it does not belong to these weights")
            named, report.mode = [], "sampled ids"
    if not named and sequences:
        named = [(f"given ids {i + 1}", ids.to(dev)) for i, ids in enumerate(sequences)]
    elif not named:
        named = [(f"own sample {i + 1}", ids) for i, ids in enumerate(sample_ids(model, seed=seed, device=dev))]
    for label, ids in named:
        total, count = nll_of(logits_of(model, [ids]), [ids])
        report.texts.append(TextScore(label, count, total / count))
    seqs = [ids for _, ids in named]
    if type(model).OPTIONS:
        report.reading = current_reading(model)
        if switch is None:
            def switch(reading):
                model.set_options(**reading)
                return model
        try:
            expected = report.mode == "sampled ids"
            report.options = rank_options(switch, report.reading, type(model).OPTIONS, seqs, expected)
            report.suggested = suggest_reading(switch, report.reading, type(model).OPTIONS, seqs, report.options)
        finally:
            if hasattr(model, "set_options"):
                model.set_options(**report.reading)
    uniform = math.log(model.vocab_size)
    if tokenizer is not None and report.nll > IMPLAUSIBLE * uniform:
        report.warnings.append(
            f"NLL {report.nll:.2f} nats/token is implausibly high for a trained model (uniform over {model.vocab_size} "
            f"ids is {uniform:.2f}): the checkpoint is probably misread (architecture reading, norms, tokenizer ids) "
            "or its weights are random")
    if report.better_reading:
        change = ", ".join(f"{k} = {v!r}" for k, v in report.better_reading.items())
        report.warnings.append(f"the weights prefer another reading: {change}; set it under [options] in the "
                               "catalog entry")
    return report


def run_selftest(model_id_or_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0) -> SelftestReport:
    """Load a catalog model (downloaded, or a demo) or a local model directory and score it."""
    from ..catalog import CatalogError, get_entry, load_catalog
    from .loader import load_model, resolve_device
    from .runtime import entry_for_directory, model_files
    from .tokenizer import TokenizerError, load_tokenizer

    catalog = load_catalog()
    path = Path(model_id_or_dir)
    entry = None
    if path.is_dir():
        try:
            entry = entry_for_directory(path, catalog)
        except CatalogError:
            entry = None
        directory = path
    else:
        entry = get_entry(str(model_id_or_dir), catalog)
        directory = model_files(entry)
    dev = resolve_device(device)
    options = dict(entry.options) if entry else {}
    model = load_model(directory, dev, dtype, options=options)
    tokenizer = None
    if entry is not None:
        try:
            tokenizer = load_tokenizer(entry, directory, _tokenizer_file(entry, directory))
        except TokenizerError:
            tokenizer = None
    switch = None
    if type(model).OPTIONS and not hasattr(model, "set_options"):
        # Architectures without run-time switches are reloaded once per alternative.
        switch = lambda reading: load_model(directory, dev, dtype, options={**options, **reading})  # noqa: E731
    name = entry.id if entry is not None and not path.is_dir() else str(path)
    return selftest_model(model, tokenizer, name, str(directory), dev, switch, seed)


def _tokenizer_file(entry, directory: Path) -> Path | None:
    if entry.tokenizer.kind != "hf-json" or (directory / entry.tokenizer.file).exists() or entry.demo or entry.source is None:
        return None
    from .. import hub

    try:
        return hub.file_path(entry, entry.tokenizer.file)
    except Exception:  # not downloaded: the selftest falls back to sampled ids
        return None


def format_report(r: SelftestReport) -> str:
    lines = [f"selftest {r.model} ({r.architecture}) on {r.device}, {r.dtype}", f"  files: {r.directory}"]
    for note in r.notes:
        lines.append(f"  note: {note}")
    if r.mode == "sampled ids":
        lines.append("  no tokenizer here: scoring ids sampled from the model itself (checks the machinery, not the "
                     "checkpoint); options by expected NLL under its own next-id distribution")
    for t in r.texts:
        lines.append(f"  {t.name:<20} {t.tokens:>4} tokens  NLL {t.nll:6.3f} nats/token  (ppl {t.ppl:,.1f})")
    lines.append(f"  {'overall':<20} {sum(t.tokens for t in r.texts):>4} tokens  NLL {r.nll:6.3f} nats/token  "
                 f"(uniform: {math.log(r.vocab_size):.2f})")
    if r.options:
        lines.append("reading options (NLL nats/token, one switch at a time; * = the catalog's reading):")
        for opt, rows in r.options.items():
            cells = []
            for row in rows:
                mark = "*" if row.current else " "
                if row.error:
                    cells.append(f"{mark}{row.value}: n/a")
                elif not row.current and row.logit_diff <= SAME_LOGITS:
                    cells.append(f"{mark}{row.value} {row.nll:.4f} (same logits)")
                else:
                    cells.append(f"{mark}{row.value} {row.nll:.4f}")
            lines.append(f"  {opt:<14} " + " | ".join(cells) + f"  -> weights support {r.supported(opt)!r}")
        for opt, rows in r.options.items():
            for row in rows:
                if row.error:
                    lines.append(f"  note: {opt} = {row.value!r} not scored: {row.error}")
        if r.better_reading:
            lines.append("suggested reading (greedy search): "
                         + ", ".join(f"{k} = {v!r}" for k, v in r.better_reading.items()))
    for w in r.warnings:
        lines.append(f"WARNING: {w}")
    lines.append("OK" if r.ok else "CHECK FAILED")
    return "\n".join(lines)
