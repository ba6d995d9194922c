"""What every architecture file shares: config parsing, the control record, the model base class."""
from __future__ import annotations

import dataclasses
import importlib
import math
import threading
import types
import typing
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ...contract import ControlSpec
from ..state import StateList

__all__ = ["ArchArgs", "ControlSpec", "ArchModel", "Forward", "Interrupted", "check_cancel", "arch_module",
           "ARCHITECTURES", "UnknownArchitecture"]

# model_type -> module under engine/arch. Aliases map other spellings seen in configs.
ARCHITECTURES = {
    "axiom": "axiom",
    "odinnext": "odinnext",
    "genesis": "genesis",
    "huginn_raven": "huginn_raven",
    "spike_whale": "spike_whale",
}
ALIASES = {"raven": "huginn_raven", "spikewhale": "spike_whale"}


class UnknownArchitecture(ValueError):
    """The model_type names no architecture this engine implements (exit code 2 in the CLI)."""


def arch_module(model_type: str):
    """Import engine/arch/<model_type>.py; raise UnknownArchitecture if it does not exist."""
    name = ALIASES.get(model_type, model_type)
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"unknown model_type {model_type!r}; smollchat implements: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return importlib.import_module(f"{__package__}.{ARCHITECTURES[name]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"arch.{ARCHITECTURES[name]}"):
            raise UnknownArchitecture(
                f"architecture {name!r} is not implemented in this version of smollchat yet") from None
        raise


# A ceiling on layer counts: far above any real model, and it refuses a config of a million layers at
# once instead of after minutes spent building its modules on the meta device.
MAX_LAYERS = 1024


@dataclasses.dataclass
class ArchArgs:
    """Base for each architecture's ModelArgs: the dataclass fields are the config keys it reads.

    Every value read is checked against its field's type, and numbers against a range: ints >= 1,
    floats finite and > 0 (>= 0 where the field's default is 0: zero means "off" there), unless
    `CONFIG_RANGES` (field -> (low, high), inclusive, None = open) says otherwise. A value that fails
    is a ValueError naming the config key.
    """

    CONFIG_RANGES = {}  # not a field (no annotation): per-architecture exceptions to the default ranges

    @classmethod
    def from_config(cls, config: dict[str, Any], **options: Any):
        """Build from a config dict. Keys that are not fields are ignored (configs carry training
        settings); `options` (the catalog's reading options) override config values."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        merged = {k: v for k, v in config.items() if k in names}
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"{cls.__module__.rsplit('.', 1)[-1]}: unknown option(s) {', '.join(sorted(unknown))}")
        merged.update(options)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in merged
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"config.json lacks required key(s): {', '.join(missing)}")
        return cls(**cls.checked_values(merged))

    @classmethod
    def checked_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """`values` with each one checked against its field's type and range (ints given as 2.0 become 2)."""
        hints = typing.get_type_hints(cls)
        zero_ok = {f.name for f in dataclasses.fields(cls) if f.default == 0 and f.default is not False}
        ranges = {**{k: (0, None) for k in zero_ok}, **cls.CONFIG_RANGES}
        return {k: _checked_value(k, v, hints.get(k), ranges.get(k)) for k, v in values.items()}


def _checked_value(key: str, value: Any, hint: Any, bounds: tuple[float | None, float | None] | None) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if hint not in (int, float):
        return value  # a structured field: its architecture checks it
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not number or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be a whole number, got {value!r}")
    else:
        if not number or not math.isfinite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        value = float(value)
    if bounds is None:
        if value <= 0 or (hint is int and value < 1):
            raise ValueError(f"config key {key!r} must be {'>= 1' if hint is int else '> 0'}, got {value!r}")
        return value
    low, high = bounds
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"config key {key!r} must be {span}, got {value!r}")
    return value


class Interrupted(Exception):
    """A model call stopped between two of its internal steps because the caller asked it to."""


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise Interrupted when the call's cancel flag is set. Poll it only where the state can be rolled
    back to its length before this forward (see StateList.trim); the decode loop does that roll-back."""
    if cancel is not None and cancel.is_set():
        raise Interrupted


@dataclasses.dataclass(frozen=True)
class Forward:
    """What one model call did: its logits and, for a recurrent-depth model, the steps it ran."""

    logits: torch.Tensor
    steps: int | None = None


class ArchModel(nn.Module):
    """Base of every architecture's Model.

    Subclasses define `forward(ids [B, T], state: StateList | None) -> logits [B, T, V]`,
    `make_state`, `sanitize` and, where they have them, `CONTROLS` and `OPTIONS`. A model keeps nothing
    of a call: controls and the cancel flag arrive with each `infer`, which returns what it did.
    """

    #: Compute controls the UI renders (Huginn's recurrence); empty for most models.
    CONTROLS: tuple[ControlSpec, ...] = ()
    #: Named reading options for uncertain architecture facts (OdinNext): name -> choices.
    OPTIONS: dict[str, tuple[Any, ...]] = {}

    def control_specs(self) -> tuple[ControlSpec, ...]:
        """The controls with this checkpoint's defaults (the architecture layer of the merge)."""
        return self.CONTROLS

    def repeated_modules(self, controls: Mapping[str, Any]) -> list[tuple[nn.Module, int]]:
        """Modules one token runs more than once under `controls`, with how many times (at most): what a
        decode step reads beyond each weight once (the bench's bytes per token and roofline). None here."""
        return []

    def infer(self, ids: torch.Tensor, state: StateList | None, controls: Mapping[str, Any] | None = None,
              cancel: threading.Event | None = None, last_only: bool = False) -> Forward:
        """One forward under one call's controls; a model without controls or inner steps just runs."""
        return Forward(self(ids, state, last_only=last_only))

    def dense_layout(self):
        """What the fused CPU decode step needs (dense_step.DenseLayout), for a pre-norm GQA transformer with
        interleaved RoPE and a SwiGLU FFN; None (the default) where the architecture is another."""
        return None

    def speculator(self, controls: Mapping[str, Any], cancel: threading.Event | None = None):
        """A per-call self-speculative decoder (`step(state, token_id)`), where the architecture has one."""
        return None

    def make_state(self, max_len: int, device, dtype) -> StateList:
        raise NotImplementedError

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names and layouts -> this model's parameter paths (renames, fusions, dropped buffers).
        Changes only the dict, idempotently; module changes go to fit_checkpoint (before the weights are
        assigned) or post_load (after)."""
        return weights

    def fit_checkpoint(self, weights: dict[str, torch.Tensor]) -> None:
        """Module changes the sanitized checkpoint's shapes call for, made before its tensors are assigned (on
        the meta device during a load): here an untied head where sanitize kept a `lm_head.weight` the model
        has no module for; architectures add theirs (a vocabulary or FFN width the config does not state)."""
        head = weights.get("lm_head.weight")
        if head is not None and self.lm_head is None:
            device = next(self.parameters()).device
            self.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device=device, dtype=head.dtype)

    def post_load(self, device: torch.device) -> None:
        """The one hook for module surgery after the weights are assigned (derived copies), called by
        loader.prepare_for_inference before the kernel choice (kernels.py) re-stores the matrices."""

    def head_matrix(self) -> torch.Tensor | None:
        """The weight the output head multiplies by: an untied lm_head's, or the tied embedding's."""
        from ..quant import head_weight

        found = head_weight(self)
        return found[1] if found is not None else None

    def matrices(self) -> list[torch.Tensor]:
        """The weights whose layout and product the kernel choice (kernels.py) sets: every nn.Linear's and
        the head's."""
        mats = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        head = self.head_matrix()
        if head is not None and all(head is not w for w in mats):
            mats.append(head)
        return mats

    @property
    def max_context(self) -> int:
        """The most tokens the model was trained to see."""
        raise NotImplementedError

    def _arg(self, *names: str) -> int:
        for n in names:
            if hasattr(self.args, n):
                return int(getattr(self.args, n))
        raise AttributeError(f"{type(self).__module__}: ModelArgs has none of {names}")

    @property
    def n_layers(self) -> int:
        """Layer count (for the UI's same-size-transformer KV comparison)."""
        return self._arg("n_layers", "num_hidden_layers", "n_layer")

    @property
    def hidden_size(self) -> int:
        return self._arg("dim", "hidden_size", "n_embd")

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (may exceed the tokenizer's vocabulary when padded)."""
        return self._arg("padded_vocab_size", "vocab_size")

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @staticmethod
    def keep_one_head(weights: dict[str, torch.Tensor], embed_key: str) -> None:
        """sanitize: checkpoints often store a tied head twice (`lm_head.weight` beside the embedding): keep
        one copy, unless the two really differ; then warn and keep both (fit_checkpoint unties the head)."""
        head = weights.pop("lm_head.weight", None)
        if head is None:
            return
        embed = weights.get(embed_key)
        if embed is None:
            weights[embed_key] = head
        elif not same_tensor(head, embed):
            warnings.warn(f"lm_head.weight differs from {embed_key}; using it as an untied head")
            weights["lm_head.weight"] = head


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape and values (shape alone on the meta device, where there are no values)."""
    if a.shape != b.shape:
        return False
    return a.is_meta or b.is_meta or torch.equal(a, b.to(a.dtype))


def check_options(arch: str, table: Mapping[str, tuple[Any, ...]], values: Mapping[str, Any]) -> None:
    """Reading options (OdinNext, Byrne): raise ValueError unless every name in `values` is one the
    architecture's `table` declares, set to one of its choices."""
    for name, value in values.items():
        if name not in table:
            raise ValueError(f"unknown {arch} reading option {name!r}; options: {', '.join(table)}")
        if value not in table[name]:
            raise ValueError(f"{arch} option {name} must be one of {table[name]}; got {value!r}")
