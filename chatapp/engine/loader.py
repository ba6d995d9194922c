"""config + safetensors -> Model, strictly.

Weights load from `*.safetensors` only (never pickle), tensor by tensor, cast to the target dtype as
they are read, so a large F32 checkpoint never sits in memory twice. After the architecture's
`sanitize`, every expected tensor must be present with its shape and a floating dtype, and no other
tensor may remain; anything else is a `LoadError` that names the tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from ..units import human_bytes
from .arch.base import ArchModel, UnknownArchitecture, arch_module
from .kernels import apply as apply_kernels, choose as choose_kernels

GENESIS_META_KEY = "genesis_config_json"
#: A tensor only Genesis checkpoints have (its zero-centred final norm).
GENESIS_MARKER_TENSOR = "ln_f.omega"
INDEX_NAME = "model.safetensors.index.json"

__all__ = ["LoadError", "UnknownArchitecture", "read_config", "safetensors_files", "build_model",
           "load_model", "read_tensors", "check_inventory", "check_fits", "available_memory", "resolve_dtype", "resolve_device"]


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError("--device cuda was asked for, but this torch build sees no CUDA device; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                  cpu_default: str = "float32") -> torch.dtype:
    """bf16 on CUDA; on CPU the catalog's choice (fp32 unless it says otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else cpu_default
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise LoadError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    return names[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shard files: from the index when there is one, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is not a valid safetensors index ({e}); re-download the model") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{model_dir} lacks shard(s) {', '.join(missing)} named by {INDEX_NAME}; "
                            "re-run `smollchat download` to fetch them")
        return files
    # golden.safetensors sits beside the weights in fixture directories; it is never a weight file.
    files = [p for p in sorted(model_dir.glob("*.safetensors")) if p.name != "golden.safetensors"]
    if not files:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(bins)}: pickled weights are never loaded)" if bins else ""
        raise LoadError(f"no *.safetensors file in {model_dir}{hint}")
    return files


def _header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path} is empty or truncated ({size} bytes); delete it and download again")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 100_000_000:
            raise LoadError(f"{path} is not a safetensors file or is truncated; delete it and download again")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # not JSON, or not the layout
            raise LoadError(f"{path} has a corrupt safetensors header; delete it and download again") from None
    if 8 + n + end > size:
        raise LoadError(f"{path} is truncated: {size} bytes on disk, {8 + n + end} expected; "
                        "delete it and download again (downloads resume)")
    return header


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json, or the Genesis config stored in the safetensors metadata."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    config: dict[str, Any] | None = None
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))  # whatever the locale
        except ValueError as e:
            raise LoadError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise LoadError(f"{cfg_path} must hold a JSON object of config keys, not {type(config).__name__}")
    shards = safetensors_files(model_dir) if any(model_dir.glob("*.safetensors")) else []
    meta = (_header(shards[0]).get("__metadata__") or {}) if shards else {}
    if GENESIS_META_KEY in meta:
        # Genesis carries its config in the weights file; the loader names the architecture.
        try:
            config = {**json.loads(meta[GENESIS_META_KEY]), **(config or {})}
        except (ValueError, TypeError):
            raise LoadError(f"{shards[0]}: metadata {GENESIS_META_KEY} is not a JSON object") from None
        config["model_type"] = "genesis"
    elif config is None and shards and GENESIS_MARKER_TENSOR in _header(shards[0]):
        # A Genesis file without the metadata key: the reference falls back to its genesis_147m preset,
        # which genesis.ModelArgs applies to a config that names no Genesis key (spec §1).
        config = {"model_type": "genesis"}
    if config is None:
        raise LoadError(f"{model_dir} has no config.json (and no config in the safetensors metadata)")
    if config.get("model_type") is None and "n_embd" in config and "gla_expand_k" in config:
        config["model_type"] = "genesis"
    if not config.get("model_type"):
        raise LoadError(f"{cfg_path} has no model_type; pass the architecture with the catalog entry")
    if not isinstance(config["model_type"], str):
        raise LoadError(f"{cfg_path}: model_type must be a string, got {config['model_type']!r}")
    return config


def build_model(config: dict[str, Any], options: dict[str, Any] | None = None,
                arch: str | None = None, device: torch.device | str = "meta") -> ArchModel:
    """Instantiate the architecture's Model for a config, with parameters on `device`."""
    mod = arch_module(arch or config["model_type"])
    try:
        args = mod.ModelArgs.from_config(config, **(options or {}))
        # Values pass one by one yet may not fit together (heads that do not divide the width).
        with torch.device(device):
            return mod.Model(args)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise LoadError(f"config does not fit architecture {mod.__name__.rsplit('.', 1)[-1]}: {e}") from None


def check_inventory(model: ArchModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sanitize, fit the modules to the checkpoint's shapes, then check names, shapes and dtypes against the
    model. Returns the sanitized dict."""
    try:
        weights = model.sanitize(dict(weights))
        model.fit_checkpoint(weights)
    except KeyError as e:
        raise LoadError(f"checkpoint lacks tensor {e.args[0]}") from None
    except (RuntimeError, ValueError, IndexError) as e:
        # Reference-layout tensors (separate q/k/v, gate/up) whose shapes do not fuse.
        raise LoadError(f"checkpoint tensors do not fit together as this architecture expects ({e}); "
                        "is this the right model or config?") from None
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise LoadError(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''}; is this the right model or a partial download?")
    if extra:
        raise LoadError(f"checkpoint has {len(extra)} unexpected tensor(s): {', '.join(extra[:6])}"
                        f"{' ...' if len(extra) > 6 else ''}; it does not match this architecture/config")
    for k, ref in expected.items():
        got = weights[k]
        if tuple(got.shape) != tuple(ref.shape):
            raise LoadError(f"tensor {k} has shape {list(got.shape)}, expected {list(ref.shape)} from the config")
        if ref.is_floating_point() != got.is_floating_point():
            raise LoadError(f"tensor {k} has dtype {got.dtype}, expected a {'floating' if ref.is_floating_point() else 'integer'} tensor")
    return weights


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as stored, on the CPU (golden files): a truncated or corrupt
    file is a LoadError, as for weights."""
    return _read_tensors([Path(path)], torch.device("cpu"), None, set())


def _read_tensors(files: list[Path], device: torch.device, dtype: torch.dtype | None,
                  keep_fp32: set[str]) -> dict[str, torch.Tensor]:
    """Weights cast to `dtype` (fp32 for `keep_fp32`) and checked finite; with dtype None, tensors as stored."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        _header(f)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    raw = sf.get_tensor(name)
                    if dtype is None or not raw.is_floating_point():
                        out[name] = raw.to(device)
                        continue
                    # Cast before moving, one tensor at a time: no second full copy of the model.
                    out[name] = t = raw.to(torch.float32 if name in keep_fp32 else dtype).to(device)
                    _check_finite(f, name, raw, t)
        except LoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise LoadError(f"cannot read {f}: {e}; delete it and download again") from None
    return out


def _check_finite(path: Path, name: str, raw: torch.Tensor, t: torch.Tensor) -> None:
    """Refuse NaN/Inf weights, which would otherwise stream garbage. One sum per tensor (NaN and Inf
    propagate through it) costs about a read of the weights; isfinite() runs only when the sum is not
    finite, since a sum of large finite values can overflow too."""
    if bool(torch.isfinite(t.sum())):
        return
    bad = int((~torch.isfinite(t)).sum())
    if not bad:
        return
    if bool(torch.isfinite(raw).all()):
        raise LoadError(f"tensor {name} in {path} overflows {str(t.dtype).removeprefix('torch.')} ({bad} values "
                        "become Inf); load it in float32 or bfloat16 (--dtype)")
    raise LoadError(f"tensor {name} in {path} holds {bad} NaN/Inf value(s): the checkpoint is damaged; "
                    "delete it and download again")


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device` now: MemAvailable on CPU (free plus reclaimable cache),
    the driver's free figure on CUDA; None where unknown (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def meta_bytes(model: ArchModel, dtype: torch.dtype, keep_fp32: set[str], state_tokens: int) -> tuple[int, int]:
    """(weight bytes in `dtype`, state bytes for `state_tokens` tokens) of a model still on the meta device."""
    weights = sum(t.numel() * (t.element_size() if not t.is_floating_point()
                               else 4 if name in keep_fp32 else dtype.itemsize)
                  for name, t in [*model.named_parameters(), *model.named_buffers()])
    tokens = min(state_tokens, model.max_context) if state_tokens > 0 else 0
    state = sum(model.make_state(tokens, torch.device("meta"), dtype).bytes().allocated.values()) if tokens else 0
    return weights, state


def check_fits(model: ArchModel, device: torch.device, dtype: torch.dtype, keep_fp32: set[str],
               state_tokens: int) -> None:
    """Refuse, before anything is allocated, a model whose weights (in `dtype`) plus a state for
    `state_tokens` tokens exceed the memory free on `device`. `model` is still on the meta device."""
    avail = available_memory(device)
    if avail is None:
        return
    weights, state = meta_bytes(model, dtype, keep_fp32, state_tokens)
    tokens = min(state_tokens, model.max_context) if state_tokens > 0 else 0
    if weights + state > avail:
        where = "MemAvailable" if device.type == "cpu" else f"free on {device}"
        raise LoadError(f"the model needs {human_bytes(weights + state)} ({human_bytes(weights)} of weights in "
                        f"{str(dtype).removeprefix('torch.')} + {human_bytes(state)} of state for {tokens} tokens) but "
                        f"only {human_bytes(avail)} is free ({where}); close other programs"
                        f"{', use --dtype bfloat16' if dtype == torch.float32 else ''} or choose a smaller model")


def load_model(model_dir: Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               options: dict[str, Any] | None = None, arch: str | None = None,
               config: dict[str, Any] | None = None, state_tokens: int = 0, quantize: str | None = None,
               kernels: Any = "auto") -> ArchModel:
    """Load a model directory strictly. Parameters end up on `device` in `dtype`. It is refused before
    anything is allocated when its weights plus a state for `state_tokens` tokens do not fit (check_fits).
    `kernels`: the weight layout and matmul path (kernels.choose: "auto", "reference", or a recorded choice)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"model directory {model_dir} does not exist")
    config = config or read_config(model_dir)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    model = build_model(config, options, arch)
    keep = set(getattr(model, "FP32_TENSORS", ()))
    check_fits(model, device, dtype, keep, state_tokens)
    files = safetensors_files(model_dir)
    weights = check_inventory(model, _read_tensors(files, device, dtype, keep))
    model.load_state_dict(weights, strict=True, assign=True)
    return prepare_for_inference(model, device, dtype, quantize, files, kernels)


def prepare_for_inference(model: ArchModel, device: torch.device, dtype: torch.dtype, quantize: str | None = None,
                          files: list[Path] | None = None, kernels: Any = "auto") -> ArchModel:
    """What every loaded model gets (benchmarks that build weights in memory call it too): the architecture's
    post_load (its one hook for module surgery), the kernel choice for this machine (kernels.py: weight
    layouts, bf16 products; measured once per machine), no grad, eval mode."""
    model.post_load(device)
    try:
        choice = choose_kernels(model, dtype, device, kernels, quantize)
    except ValueError as e:
        raise LoadError(str(e)) from None
    if quantize:
        # Weight-only int8/int4 from the loaded weights (engine/quant.py), cached by checkpoint when `files` name it;
        # the choice names the int4 layout and the quantized layers' one-row product.
        from .kernels import apply_quantized
        from .quant import quantize_model
        quantize_model(model, quantize, files, choice=choice)
        apply_quantized(model, choice)
    else:
        apply_kernels(model, choice)
    model.requires_grad_(False)
    return model.eval()
