"""Finds a checkpoint (local folder or Hub id), builds its model on the target device
and fills the weights: from safetensors (single or sharded), or random (`dummy`). Under
tensor parallelism each rank builds its slice of the model and reads only that slice of
every checkpoint tensor."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lanner.distributed import TensorParallelGroup, TensorParallelShard
from lanner.kernels import parallel_compile
from lanner.model.config import ModelConfig, parse_dtype
from lanner.model.layers.linear import (
    PackedLinear,
    deferred_linear_weights,
    materialize,
    part_tensor,
)
from lanner.model.quant import resolve_quant_config
from lanner.model.quant.base import LinearMethod, QuantConfig, UnquantizedLinearMethod
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
    quant_config: QuantConfig | None = None
    # The tensor-parallel slice this process holds (the whole model by default), and the
    # process group its collectives run over.
    shard: TensorParallelShard = TensorParallelShard()
    group: TensorParallelGroup | None = None

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank's attention holds (and its KV cache stores)."""
        return self.shard.kv_heads_per_rank(self.config.num_key_value_heads)

    @property
    def matmul_weight_bytes(self) -> int:
        """Bytes a decode step reads of weights: every linear layer's parameters as stored
        (quantized codes, scales, zero points, biases) and the LM head (the embedding
        table when tied; otherwise the embedding is a row lookup and not counted)."""
        total = sum(
            param.numel() * param.element_size()
            for module in self.model.modules()
            if isinstance(module, PackedLinear)
            for param in module.parameters(recurse=False)
        )
        if self.config.tie_word_embeddings:
            embedding = self.model.get_submodule("model.embed_tokens").weight
            total += embedding.numel() * embedding.element_size()
        return total


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


def resolve_model_path(
    model: str | os.PathLike[str],
    revision: str | None = None,
    extra_patterns: tuple[str, ...] = (),
) -> Path:
    """A local folder as is; otherwise a Hub id, fetched into (or found in) the HF cache
    (its config, tokenizer and safetensors, plus files matching ``extra_patterns``)."""
    patterns = _HUB_PATTERNS + list(extra_patterns)
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
                name, revision=revision, allow_patterns=patterns, local_files_only=True
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
            return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
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


class CheckpointTensor:
    """A tensor of an open safetensors file, read when asked: whole (``read``), or one
    slice of one dimension (``narrow``, which reads only that slice), so a
    tensor-parallel rank reads its share alone."""

    def __init__(self, handle: Any, name: str) -> None:
        self._handle = handle
        self._name = name
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self._name)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


def iterate_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, CheckpointTensor]]:
    """Yield (file, tensor name, the tensor unread) for every tensor in the files."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:
            raise ValueError(
                f"cannot read {path} as safetensors (corrupt or truncated?): {err}"
            ) from err
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                yield path, name, CheckpointTensor(f, name)


def _expected_weights(model: nn.Module) -> dict[tuple[str, str | None], str]:
    """(parameter name, shard id) -> checkpoint tensor name, for every tensor a full
    checkpoint must provide."""
    expected: dict[tuple[str, str | None], str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            for shard, source in packed_part_names(model, module_name, module).items():
                for param_name in module.checkpoint_tensors():
                    expected[(f"{module_name}.{param_name}", shard)] = f"{source}.{param_name}"
            continue
        if _inside_packed_linear(module_name, model):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            expected[(full, None)] = full
    return expected


def _inside_packed_linear(module_name: str, model: nn.Module) -> bool:
    parent = module_name.rpartition(".")[0]
    return bool(module_name) and isinstance(model.get_submodule(parent), PackedLinear)


def _packed_mapping(model: nn.Module) -> dict[str, tuple[str, str]]:
    return getattr(model, "packed_modules_mapping", {})


def packed_part_names(
    model: nn.Module, module_name: str, module: PackedLinear
) -> dict[str | None, str]:
    """shard id -> the checkpoint module it loads from, for one PackedLinear (e.g. "q" ->
    model.layers.0.self_attn.q_proj for model.layers.0.self_attn.qkv_proj)."""
    inverse = {dst + "/" + shard: src for src, (dst, shard) in _packed_mapping(model).items()}
    parent, _, leaf = module_name.rpartition(".")
    names = {}
    for shard in module.shard_offsets:
        source = leaf if shard is None else inverse[f"{leaf}/{shard}"]
        names[shard] = f"{parent}.{source}" if parent else source
    return names


def assign_linear_methods(
    model: nn.Module, quant_config: QuantConfig | None, dtype: torch.dtype
) -> None:
    """Give every PackedLinear its method: unquantized, or what ``quant_config`` says for
    the checkpoint modules it packs."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and module.method is None:
            if quant_config is None:
                method: LinearMethod = UnquantizedLinearMethod()
            else:
                method = quant_config.linear_method(
                    name, list(packed_part_names(model, name, module).values())
                )
            module.set_method(method, dtype)


def process_weights_after_loading(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.process_weights_after_loading()


def load_weights(
    model: nn.Module, model_dir: Path, quant_config: QuantConfig | None = None
) -> None:
    """Copy a checkpoint's tensors into the model, packing q/k/v and gate/up (each split
    layer takes, and reads, only its rank's slice).

    Every parameter must be filled exactly by a tensor of the right shape; a wrong
    shape, a missing tensor or a missing shard fails with the file named."""
    files, weight_map = checkpoint_files(model_dir)
    fill_weights(
        model,
        iterate_checkpoint(files),
        model_dir,
        quant_config,
        weight_map,
        [p.name for p in files],
    )


def fill_weights(
    model: nn.Module,
    tensors: Iterable[tuple[Path, str, torch.Tensor | CheckpointTensor]],
    model_dir: Path,
    quant_config: QuantConfig | None = None,
    weight_map: dict[str, str] | None = None,
    file_names: list[str] | None = None,
) -> None:
    """``load_weights`` for tensors from any source ((file, name, tensor) triples under
    the model's own names; a tensor may be a lazy checkpoint one), with the same checks."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    weight_map = weight_map or {}
    modules = dict(model.named_modules())
    expected = _expected_weights(model)
    packed = _packed_mapping(model)
    loaded: set[tuple[str, str | None]] = set()
    unexpected: list[str] = []
    quant_note = f", quantization={quant_config.describe()}" if quant_config else ""
    for path, name, stored in tensors:
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
        if module is None:
            unexpected.append(name)
            continue
        param = getattr(module, param_name, None)
        key = (f"{module_name}.{param_name}", shard)
        try:
            if isinstance(module, PackedLinear):
                tensor = module.rank_slice(param_name, stored, shard)
                filled = module.load_shard(param_name, tensor, shard)
                if filled is None:
                    unexpected.append(name)
                    continue
                key = (f"{module_name}.{filled}", shard)
            elif not isinstance(param, nn.Parameter):
                unexpected.append(name)
                continue
            else:
                tensor = (
                    module.rank_slice(param_name, stored)
                    if hasattr(module, "rank_slice")  # split by rows (the embedding)
                    else materialize(stored)
                )
                if tensor.shape != param.shape:
                    raise ValueError(
                        f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                    )
                param.data.copy_(tensor)
        except ValueError as err:
            raise ValueError(
                f"{path}: tensor {name} does not fit this config.json "
                f"(hidden_size={config.hidden_size}, heads={config.num_attention_heads}, "
                f"kv_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}"
                f"{quant_note}): {err}"
            ) from None
        loaded.add(key)
    if unexpected:
        # A tensor with no home means the config and the weights disagree (or lanner
        # lacks a feature the checkpoint uses): running anyway would give wrong outputs.
        hint = _unexpected_hint(unexpected, quant_config)
        raise ValueError(
            f"checkpoint in {model_dir} has {len(unexpected)} tensors that this config.json's "
            f"{config.architecture}{quant_note.replace(', ', ' with ')} has no place for, "
            f"e.g. {unexpected[:3]}{hint}"
        )
    missing = [src for key, src in expected.items() if key not in loaded]
    if missing:
        where = ", ".join(
            f"{n} (index: {weight_map.get(n, 'not listed')})" if weight_map else n
            for n in missing[:5]
        )
        raise ValueError(
            f"checkpoint in {model_dir} is incomplete: {len(missing)} tensors the config "
            f"requires were not found in {file_names or 'its weights'}, e.g. {where}"
        )


def _unexpected_hint(unexpected: list[str], quant_config: QuantConfig | None) -> str:
    """Why tensors may have no home: a quantized checkpoint read without its method, or a
    quantized embedding (lanner keeps embeddings in the model dtype)."""
    quantized_suffixes = ("qweight", "qzeros", "scales", "weight_packed", "weight_scale")
    if quant_config is None and any(n.endswith(quantized_suffixes) for n in unexpected):
        return (
            "; these look like quantized weights, but config.json has no quantization_config "
            "(pass quantization= naming the checkpoint's method)"
        )
    if any("embed_tokens" in n for n in unexpected):
        return "; lanner keeps embeddings in the model dtype and cannot load quantized ones"
    return ""


@torch.no_grad()
def dummy_init(model: nn.Module, seed: int = 0, dtype: torch.dtype | None = None) -> None:
    """Fill weights with random values on their own device (no host copy).

    Projections get uniform values scaled by 1/sqrt(fan_in) so activations keep unit
    scale through the network (quantized layers: their method's equivalent); norm weights
    are one; biases are small. A tensor-parallel rank draws every split tensor whole, in
    the unsplit model's order, and keeps its slice: each tensor_parallel_size runs the
    same random model. ``dtype``: the model's (default: its first parameter's)."""
    first = next(model.parameters())
    device, dtype = first.device, dtype or first.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            assert module.method is not None
            if module.parallel is not None:
                with _default_dtype(dtype), device:
                    _dummy_fill_split(module, generator)
                continue
            module.method.dummy_fill(module, generator)
            if module.bias is not None:
                module.bias.uniform_(-0.02, 0.02, generator=generator)
            continue
        if _inside_packed_linear(module_name, model):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if hasattr(module, "rank_slice"):  # split by rows: drawn whole, then cut
                whole = torch.empty(module.checkpoint_shape, dtype=param.dtype, device=device)
                _dummy_fill(name, whole, generator)
                param.copy_(module.rank_slice(param_name, whole))
            else:
                _dummy_fill(name, param, generator)


def _dummy_fill_split(layer: PackedLinear, generator: torch.Generator) -> None:
    """Random weights for one rank's slice of a split layer: the whole layer's, drawn as
    the unsplit model draws them, cut part by part as a checkpoint would be."""
    whole = layer.checkpoint_twin()
    whole.method.dummy_fill(whole, generator)  # type: ignore[union-attr]
    if whole.bias is not None:
        whole.bias.uniform_(-0.02, 0.02, generator=generator)
    for name, param in whole.named_parameters(recurse=False):
        for shard_id, part in whole.part_index.items():
            piece = layer.rank_slice(name, part_tensor(whole, param, part), shard_id)
            layer.load_shard(name, piece, shard_id)


def _dummy_fill(name: str, param: torch.Tensor, generator: torch.Generator) -> None:
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
    quantization: str | None = None,
    shard: TensorParallelShard | None = None,
    group: TensorParallelGroup | None = None,
) -> LoadedModel:
    """Build the model for a checkpoint on ``device`` and fill its weights; ``quantization``
    names a method for an unquantized checkpoint (or must match the checkpoint's).
    ``shard``: the tensor-parallel slice to build and load (default: the whole model);
    ``group``: the process group its collectives run over."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is unknown; use one of {LOAD_FORMATS}")
    device = resolve_device(device)
    if device.type == "cuda":
        # Triton's hash of itself, needed by the first kernel compile or load: read back
        # from Triton's cache folder, or computed on a thread while the model builds
        # (~0.45 s on a 2-core Xeon, I/O and hashing, off the GIL).
        parallel_compile.warm_triton_key()
    model_dir = resolve_model_path(model, revision)
    config = ModelConfig.from_pretrained(model_dir)
    model_class = get_model_class(config)
    torch_dtype = resolve_dtype(dtype, config, device)
    quant_config = resolve_quant_config(config.raw, quantization, load_format == "dummy")
    if load_format != "dummy":
        checkpoint_files(model_dir)  # fail on a missing shard before allocating anything
    with _default_dtype(torch_dtype), device:
        with deferred_linear_weights():
            network = model_class(config, shard, group)
        assign_linear_methods(network, quant_config, torch_dtype)
    network.eval()
    if load_format == "dummy":
        dummy_init(network, seed, torch_dtype)
    else:
        load_weights(network, model_dir, quant_config)
    with torch.no_grad():
        process_weights_after_loading(network)
    return LoadedModel(
        network,
        config,
        model_dir,
        torch_dtype,
        device,
        quant_config,
        shard or TensorParallelShard(),
        group,
    )
