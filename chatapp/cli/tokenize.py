"""`smollchat tokenize --model ID [--chat] [--json] TEXT`: how a model's tokenizer sees text (no torch)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import EXIT_OK, CliError, is_utf8, read_text, resolve_entry

ORDER = 30


def register(sub) -> None:
    t = sub.add_parser("tokenize", help="show how a model's tokenizer sees text")
    t.add_argument("--model", required=True, dest="tok_model")
    t.add_argument("--chat", action="store_true", help="render TEXT as a one-turn chat prompt")
    t.add_argument("--system", dest="tok_system", help="with --chat: system prompt")
    t.add_argument("--json", action="store_true")
    t.add_argument("text", help="the text ('-' reads stdin)")
    t.set_defaults(func=run)


def run(args) -> int:
    from ..engine.tokenizer import TokenizerError, load_tokenizer

    entry = resolve_entry(args.tok_model)
    text = read_text(args.text)
    try:
        tok = load_tokenizer(entry, *_tokenizer_location(entry))
        if args.chat:
            messages = [{"role": "user", "content": text}]
            ids = tok.render(messages, add_generation_prompt=True, system=args.tok_system)
            rendered = tok.render_text(messages, add_generation_prompt=True, system=args.tok_system)
        else:
            ids, rendered = tok.encode(text, allow_special=True), text
    except TokenizerError as e:
        raise CliError(str(e)) from None
    pieces = [tok.piece(i) for i in ids]
    if args.json:
        print(json.dumps({"model": entry.id, "ids": ids, "pieces": pieces, "count": len(ids), "text": rendered},
                         ensure_ascii=not is_utf8(sys.stdout)))
        return EXIT_OK
    if args.chat:
        print(rendered)
        print("-" * 40)
    for i, piece in zip(ids, pieces):
        print(f"{i:>7}  {piece!r}")
    print(f"{len(ids)} tokens")
    return EXIT_OK


def _tokenizer_location(entry) -> tuple[Path | None, Path | None]:
    """(model_dir, tokenizer_file) for load_tokenizer, without loading weights."""
    if entry.tokenizer.kind in ("tiktoken", "bytes"):
        return None, None
    if entry.path and entry.path.is_dir():
        return entry.path, None
    from .. import hub

    return hub.local_dir(entry), hub.file_path(entry, entry.tokenizer.file)
