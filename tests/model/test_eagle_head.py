"""EAGLE heads: the published layouts load (EAGLE-1 as safetensors and as EAGLE's
pytorch_model.bin, EAGLE-3 with its draft vocabulary), lanner's head computes what the
training script's plain-torch head computes (the catch-up forward and every chain step,
which is what the training-time test trains), EAGLE-3's features are the target's
residual stream entering its feature layers, and bad checkpoints fail naming the fix."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.reference import rms_norm
from lanner.model.loader import load_model
from lanner.model.models.eagle import default_aux_layers, enable_aux_hidden_states, load_eagle_head
from lanner.spec.eagle_runner import CatchUp, EagleHeadRunner
from tests.spec.eagle_heads import write_eagle3_head, write_eagle_head

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4


def training_script():
    spec = importlib.util.spec_from_file_location(
        "train_eagle_head", ROOT / "scripts/train_eagle_head.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def target_features(target_dir: Path, tokens: list[int]) -> tuple[torch.Tensor, tuple]:
    """HF's final (normed) hidden states [T, H] and every layer's input, for the tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return out.hidden_states[-1][0], tuple(h[0] for h in out.hidden_states)


def catch_up_all(runner: EagleHeadRunner, tokens: list[int], features: torch.Tensor, table):
    """The head over positions 0 .. T-2 (t_{p+1} known), in one catch-up, their
    ``features`` (rows by position) put in the feature cache as the target would."""
    batch = CatchUp()
    last = batch.add_run(tokens[1:], 0, table, BLOCK)
    runner.feature_cache[batch.slots] = features[: len(batch.slots)]
    return runner.catch_up(batch), last


@pytest.fixture(scope="module")
def llama_target(tiny_model_dirs: dict[str, Path]):
    return load_model(tiny_model_dirs["llama"], "float32", "cpu")


@pytest.mark.parametrize(("fmt", "fc_bias"), [("bin", True), ("safetensors", False)])
def test_eagle1_head_matches_the_training_head(
    tiny_model_dirs: dict[str, Path], llama_target, tmp_path: Path, fmt: str, fc_bias: bool
) -> None:
    """A head written in EAGLE's layout (with the target's embedding inside, as EAGLE
    saves it: shared, not copied) computes, in its paged cache, the training head's
    outputs: at every verified position, and along a 3-draft chain (the training head's
    unrolled steps fed the drafts as the following tokens)."""
    target_dir = tiny_model_dirs["llama"]
    embedding = llama_target.model.model.embed_tokens.weight
    head_dir = write_eagle_head(tmp_path / "head", target_dir, 1, fc_bias, fmt, embedding)
    head = load_eagle_head(
        head_dir, "eagle", llama_target.model, torch.float32, torch.device("cpu"), 64
    )
    assert head.embed_tokens is None and head.lm_head is None  # the target's, shared
    assert (head.fc.bias is not None) == fc_bias
    runner = EagleHeadRunner(head, BLOCK, torch.float32, torch.device("cpu"), True, 3)
    runner.initialize_cache(num_blocks=16, max_num_seqs=2, max_model_len=64)

    tokens = [5, 17, 33, 5, 17, 90, 12, 5, 17]
    features, _ = target_features(target_dir, tokens)
    table = [3, 7, 1, 9, 4, 11]
    outputs, last = catch_up_all(runner, tokens, features, table)
    # The last token (at c = len - 1) is the one the target feeds next: the chain's root
    # is position c - 1, its drafts go to positions c + 1, c + 2, c + 3.
    c = len(tokens) - 1
    drafts = runner.draft(outputs, [last], [c], [c + 3 - 2], [table], 3)[0].tolist()

    script = training_script()
    reference = script.TrainingHead(head.config, fc_bias)
    state = {k: v.float() for k, v in head_tensors(head_dir).items()}
    load_training_head(reference, state)
    sequence = tokens + drafts  # drafts fed as the tokens after the chain's root
    feats = torch.zeros(len(sequence), features.shape[1])
    feats[: len(tokens)] = features
    embeds = llama_target.model.model.embed_tokens(torch.tensor(sequence[1:] + [0]))[None]
    with torch.no_grad():
        steps = reference.unroll(embeds, feats[None], 3)
    torch.testing.assert_close(outputs, steps[0][0, :c], atol=2e-4, rtol=2e-4)
    lm_head = llama_target.model.lm_head_weight
    expected = [int((steps[s][0, c - 1 + s] @ lm_head.t()).argmax()) for s in range(3)]
    assert drafts == expected


def head_tensors(head_dir: Path) -> dict[str, torch.Tensor]:
    if (head_dir / "pytorch_model.bin").is_file():
        return torch.load(head_dir / "pytorch_model.bin", weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(head_dir / "model.safetensors"))


def load_training_head(reference, state: dict[str, torch.Tensor]) -> None:
    names = {
        "fc": reference.fc,
        "layers.0.self_attn.q_proj": reference.q_proj,
        "layers.0.self_attn.k_proj": reference.k_proj,
        "layers.0.self_attn.v_proj": reference.v_proj,
        "layers.0.self_attn.o_proj": reference.o_proj,
        "layers.0.mlp.gate_proj": reference.gate_proj,
        "layers.0.mlp.up_proj": reference.up_proj,
        "layers.0.mlp.down_proj": reference.down_proj,
    }
    with torch.no_grad():
        for prefix, module in names.items():
            module.weight.copy_(state[f"{prefix}.weight"])
            if module.bias is not None:
                module.bias.copy_(state[f"{prefix}.bias"])
        reference.post_attention_layernorm.copy_(state["layers.0.post_attention_layernorm.weight"])


def eagle3_reference(
    state: dict[str, torch.Tensor],
    config,
    embed: torch.nn.Embedding,
    tokens: torch.Tensor,
    features: torch.Tensor,
) -> torch.Tensor:
    """EAGLE-3's mid-layer in plain torch (causal over all positions): its output [T, H]."""
    from lanner.kernels.reference import apply_rotary
    from lanner.model.layers.rotary import RotaryEmbedding

    eps = config.rms_norm_eps
    g = features @ state["fc.weight"].t()
    x = torch.cat(
        [
            rms_norm(embed(tokens), state["midlayer.input_layernorm.weight"], eps),
            rms_norm(g, state["midlayer.hidden_norm.weight"], eps),
        ],
        dim=-1,
    )
    length, heads, kv, dim = (
        x.shape[0],
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    q = (x @ state["midlayer.self_attn.q_proj.weight"].t()).view(length, heads, dim)
    k = (x @ state["midlayer.self_attn.k_proj.weight"].t()).view(length, kv, dim)
    v = (x @ state["midlayer.self_attn.v_proj.weight"].t()).view(length, kv, dim)
    table = RotaryEmbedding(dim, config.rope, 64).cos_sin_cache
    positions = torch.arange(length)
    q, k = apply_rotary(q, positions, table), apply_rotary(k, positions, table)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * dim**-0.5
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, -1)
    y = g + attn @ state["midlayer.self_attn.o_proj.weight"].t()
    h = rms_norm(y, state["midlayer.post_attention_layernorm.weight"], eps)
    gate = h @ state["midlayer.mlp.gate_proj.weight"].t()
    up = h @ state["midlayer.mlp.up_proj.weight"].t()
    return y + (torch.nn.functional.silu(gate) * up) @ state["midlayer.mlp.down_proj.weight"].t()


def test_eagle3_layout_features_and_draft_vocabulary(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """EAGLE-3 as published (pytorch_model.bin, midlayer, d2t): the target keeps the
    residual stream entering the feature layers (named in the head's config as layer
    outputs), the head computes the mid-layer over them, and its draft ids map to target
    tokens through d2t."""
    target_dir = tiny_model_dirs["llama"]  # two layers: features after layers 0, 0 and 1
    target = load_model(target_dir, "float32", "cpu")
    head_dir = write_eagle3_head(
        tmp_path / "head3", target_dir, 100, seed=2, aux_layer_ids=[-1, 0, 1]
    )
    head = load_eagle_head(head_dir, "eagle3", target.model, torch.float32, torch.device("cpu"), 64)
    assert enable_aux_hidden_states(target.model, head.config) == (0, 1, 2)
    tokens = [5, 17, 33, 5, 17, 90, 12, 5]
    metadata = AttentionMetadata.build([len(tokens)], [len(tokens)], [[0, 1]], BLOCK, "cpu")
    caches = [torch.zeros(2, 2, BLOCK, 1, 24) for _ in range(2)]
    # The features land by KV slot: blocks 0 and 1 hold positions 0 .. 2 * BLOCK - 1.
    feature_cache = torch.zeros(2 * BLOCK + 1, head.feature_width)
    target.model.model.feature_cache = feature_cache
    target.model(torch.tensor(tokens), torch.arange(len(tokens)), metadata, caches)
    aux = feature_cache[: len(tokens)]
    _, layer_inputs = target_features(target_dir, tokens)
    hidden = head.hidden_size
    torch.testing.assert_close(aux[:, :hidden], layer_inputs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aux[:, hidden : 2 * hidden], layer_inputs[1], atol=1e-4, rtol=1e-4)
    # Index L: the last layer's output before the final norm (HF gives it normed).
    normed = rms_norm(
        aux[:, 2 * hidden :], target.model.model.norm.weight, head.config.rms_norm_eps
    )
    torch.testing.assert_close(normed, layer_inputs[2], atol=1e-4, rtol=1e-4)

    runner = EagleHeadRunner(head, BLOCK, torch.float32, torch.device("cpu"), True, 2)
    runner.initialize_cache(num_blocks=8, max_num_seqs=1, max_model_len=64)
    outputs, last = catch_up_all(runner, tokens, aux.clone(), [2, 5, 7])
    state = {k: v.float() for k, v in head_tensors(head_dir).items() if v.is_floating_point()}
    reference = eagle3_reference(
        state, head.config, target.model.model.embed_tokens, torch.tensor(tokens[1:]), aux[:-1]
    )
    torch.testing.assert_close(outputs, reference, atol=2e-4, rtol=2e-4)
    c = len(tokens) - 1
    draft = runner.draft(outputs, [last], [c], [c - 1], [[2, 5, 7]], 1)
    logits = (
        rms_norm(reference[-1], state["norm.weight"], head.config.rms_norm_eps)
        @ state["lm_head.weight"].t()
    )
    assert int(draft[0, 0]) == 2 * int(logits.argmax())  # d2t: draft id i is token 2i


def test_default_feature_layers() -> None:
    assert default_aux_layers(32) == (2, 16, 29)


def test_bad_heads_fail_naming_the_fix(
    tiny_model_dirs: dict[str, Path], llama_target, tmp_path: Path
) -> None:
    cpu = torch.device("cpu")
    target_dir = tiny_model_dirs["llama"]
    eagle3 = write_eagle3_head(tmp_path / "e3", target_dir, 100)
    with pytest.raises(ValueError, match="set method to 'eagle3'"):
        load_eagle_head(eagle3, "eagle", llama_target.model, torch.float32, cpu, 64)
    eagle1 = write_eagle_head(tmp_path / "e1", target_dir)
    with pytest.raises(ValueError, match="set method to 'eagle'"):
        load_eagle_head(eagle1, "eagle3", llama_target.model, torch.float32, cpu, 64)
    narrow = write_eagle_head(tmp_path / "narrow", target_dir)
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="hidden_size 32.*reads the target's hidden states"):
        load_eagle_head(narrow, "eagle", llama_target.model, torch.float32, cpu, 64)
    broken = write_eagle_head(tmp_path / "broken", target_dir)
    tensors = head_tensors(broken)
    del tensors["layers.0.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="incomplete.*up_proj"):
        load_eagle_head(broken, "eagle", llama_target.model, torch.float32, cpu, 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((eagle1 / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no EAGLE head weights"):
        load_eagle_head(empty, "eagle", llama_target.model, torch.float32, cpu, 64)
