"""Finds a checkpoint (local folder or Hub id), builds its model on the target device
and fills the weights: from safetensors (single or sharded), or random (`dummy`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lanner.model.config import ModelConfig, parse_dtype
from lanner.model.layers.linear import PackedLinear
from lanner.model.registry import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")
INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint needs besides its weights: config, tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Checkpoint tensors that carry nothing lanner needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    path: Path
    dtype: torch.dtype
    device: torch.device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: cuda when available, else cpu); ValueError naming the
    option when it is not a device this machine has."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r} is not a device name ({err}); use 'cuda' or 'cpu'"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA"
            if not torch.backends.cuda.is_built()
            else "no CUDA device is visible"
        )
        raise ValueError(
            f"device={str(device)!r}, but {why} (torch {torch.__version__}); use device='cpu' "
            f"or leave device unset"
        )
    if (
        chosen.type == "cuda"
        and chosen.index is not None
        and chosen.index >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"device={str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    if chosen.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cuda' or 'cpu'")
    return chosen


def resolve_model_path(model: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub id, fetched into (or found in) the HF cache."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    name = str(model)
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"model path {local.resolve()} is not a folder holding a checkpoint"
        )
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
            )
        )
    except Exception:  # not cached: try the network unless offline
        if constants.HF_HUB_OFFLINE:
            # Not HF's own message: it suggests local_files_only, which is no lanner option.
            raise FileNotFoundError(
                f"model {name!r}: no local folder {local.resolve()} and no copy in the Hugging "
                f"Face cache {constants.HF_HUB_CACHE}; HF_HUB_OFFLINE is set, so nothing was "
                f"downloaded. Unset HF_HUB_OFFLINE to download it, fetch it first (`hf "
                f"download {name}`), or pass the path of a local checkpoint folder"
            ) from None
        try:
            return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS))
        except Exception as download_error:
            raise FileNotFoundError(
                f"model {name!r}: no local folder {local.resolve()}, no copy in the Hugging Face "
                f"cache {constants.HF_HUB_CACHE}, and downloading it failed: {download_error}"
            ) from None


def checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a checkpoint, and (for a sharded one) which file holds which tensor.
    Fails naming the file when the index points at a shard that is missing."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index_path} is not a valid safetensors index: {err}") from err
        files = []
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                held = sorted(k for k, v in weight_map.items() if v == shard)
                raise FileNotFoundError(
                    f"{index_path} lists shard {shard}, holding {len(held)} tensors "
                    f"(e.g. {held[0]}), but {path} does not exist; the checkpoint is incomplete"
                )
            files.append(path)
        return files, weight_map
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir} (expected model.safetensors or "
            f"{INDEX_FILE} with its shards); lanner loads safetensors checkpoints only"
        )
    return files, {}


def iterate_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, tensor name, tensor on CPU) for every tensor in the files."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:
            raise ValueError(
                f"cannot read {path} as safetensors (corrupt or truncated?): {err}"
            ) from err
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                yield path, name, f.get_tensor(name)


def _expected_weights(model: nn.Module) -> dict[tuple[str, str | None], str]:
    """(parameter name, shard id) -> checkpoint tensor name, for every tensor a full
    checkpoint must provide."""
    inverse = {dst + "/" + shard: src for src, (dst, shard) in _packed_mapping(model).items()}
    expected: dict[tuple[str, str | None], str] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, PackedLinear):
                parent, _, leaf = module_name.rpartition(".")
                for shard in module.shard_offsets:
                    src = leaf if shard is None else inverse[f"{leaf}/{shard}"]
                    expected[(full, shard)] = f"{parent}.{src}.{param_name}"
            else:
                expected[(full, None)] = full
    return expected


def _packed_mapping(model: nn.Module) -> dict[str, tuple[str, str]]:
    return getattr(model, "packed_modules_mapping", {})


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy a checkpoint's tensors into the model, packing q/k/v and gate/up.

    Every parameter must be filled exactly by a tensor of the right shape; a wrong
    shape, a missing tensor or a missing shard fails with the file named."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    files, weight_map = checkpoint_files(model_dir)
    modules = dict(model.named_modules())
    expected = _expected_weights(model)
    packed = _packed_mapping(model)
    loaded: set[tuple[str, str | None]] = set()
    unexpected: list[str] = []
    for path, name, tensor in iterate_checkpoint(files):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: the embedding matrix serves as the head
        module_name, _, param_name = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        shard: str | None = None
        if leaf in packed:
            target, shard = packed[leaf]
            module_name = f"{parent}.{target}" if parent else target
        module = modules.get(module_name)
        param = getattr(module, param_name, None) if module is not None else None
        if not isinstance(param, nn.Parameter):
            unexpected.append(name)
            continue
        key = (f"{module_name}.{param_name}", shard)
        try:
            if isinstance(module, PackedLinear):
                module.load_shard(param, tensor, shard)
            elif tensor.shape != param.shape:
                raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            else:
                param.data.copy_(tensor)
        except ValueError as err:
            raise ValueError(
                f"{path}: tensor {name} does not fit this config.json "
                f"(hidden_size={config.hidden_size}, heads={config.num_attention_heads}, "
                f"kv_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}): "
                f"{err}"
            ) from None
        loaded.add(key)
    if unexpected:
        # A tensor with no home means the config and the weights disagree (or lanner
        # lacks a feature the checkpoint uses): running anyway would give wrong outputs.
        raise ValueError(
            f"checkpoint in {model_dir} has {len(unexpected)} tensors that this config.json's "
            f"{config.architecture} has no place for, e.g. {unexpected[:3]}"
        )
    missing = [src for key, src in expected.items() if key not in loaded]
    if missing:
        where = ", ".join(
            f"{n} (index: {weight_map.get(n, 'not listed')})" if weight_map else n
            for n in missing[:5]
        )
        raise ValueError(
            f"checkpoint in {model_dir} is incomplete: {len(missing)} tensors the config "
            f"requires were not found in {[p.name for p in files]}, e.g. {where}"
        )


@torch.no_grad()
def dummy_init(model: nn.Module, seed: int = 0) -> None:
    """Fill weights with random values on their own device (no host copy).

    Projections get uniform values scaled by 1/sqrt(fan_in) so activations keep unit
    scale through the network; norm weights are one; biases are small."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.uniform_(-0.02, 0.02, generator=generator)
        else:
            bound = 1.0 if "embed_tokens" in name else (3.0 / param.shape[1]) ** 0.5
            param.uniform_(-bound, bound, generator=generator)


def resolve_dtype(
    dtype: str | torch.dtype, config: ModelConfig, device: torch.device
) -> torch.dtype:
    """'auto' takes the checkpoint's dtype; a float32 checkpoint runs in bfloat16 on
    CUDA (as vLLM does). On the CPU, float16 runs in float32 (no fast fp16 there), and
    so does bfloat16 unless the CPU multiplies bf16 natively (AVX512-BF16 or AMX): where
    bf16 is emulated it is the slower one (13.6 vs 7.5 ms TPOT for the demo model on an
    Ice Lake Xeon, issue 22; benchmarks/cpu_vs_hf.py records its linear_dtype_probe)."""
    if dtype != "auto":
        return parse_dtype(dtype)
    chosen = config.checkpoint_dtype or torch.float32
    if device.type == "cuda" and chosen == torch.float32:
        return torch.bfloat16
    if device.type == "cpu" and chosen == torch.float16:
        return torch.float32
    if device.type == "cpu" and chosen == torch.bfloat16 and not cpu_has_native_bf16():
        return torch.float32
    return chosen


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86: AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_format: str = "auto",
    revision: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build the model for a checkpoint on ``device`` and fill its weights."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is unknown; use one of {LOAD_FORMATS}")
    device = resolve_device(device)
    model_dir = resolve_model_path(model, revision)
    config = ModelConfig.from_pretrained(model_dir)
    model_class = get_model_class(config)
    torch_dtype = resolve_dtype(dtype, config, device)
    if load_format != "dummy":
        checkpoint_files(model_dir)  # fail on a missing shard before allocating anything
    with _default_dtype(torch_dtype), device:
        network = model_class(config)
    network.eval()
    if load_format == "dummy":
        dummy_init(network, seed)
    else:
        load_weights(network, model_dir)
    return LoadedModel(network, config, model_dir, torch_dtype, device)
