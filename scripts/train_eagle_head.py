"""Train an EAGLE draft head for a Hugging Face checkpoint and measure its acceptance.

The head (EAGLE-1/2 layout, loadable by lanner as ``speculative_config={"method": "eagle",
"model": OUT_DIR, ...}``) is one decoder layer of the target's family fed
fc([embedding of token t_{p+1}; the target's final hidden state f_p]); from it the
target's own LM head predicts t_{p+2}. What the script does, inside one wall-clock
budget (``--time-budget-s``):

1. Corpus: by default the demo model's own (scripts/train_demo_model.py: the Python
   standard library and site-packages of this interpreter, its seeded held-out split
   for evaluation only; files just past the split's edge are kept out of training too,
   so a machine whose file set shifts the edge leaks no held-out file); or any text
   files (``--corpus-files``), 5 % of them held out by a seeded hash.
2. Features: the target, frozen, runs once over seeded windows of the training text;
   its final hidden state at every position and its greedy next token are kept (fp16
   in memory, or ``--feature-cache`` on disk), until the feature share of the budget
   or ``--max-train-tokens`` is reached.
3. Training (AdamW, warmup then cosine on elapsed time): at every position the head's
   output is regressed onto the target's next hidden state (smooth L1, weight 1) and
   its LM-head logits are scored by cross-entropy against the target's next token
   (weight 0.1; ``--labels soft``: against the target's whole distribution), as EAGLE
   trains. Training-time test (EAGLE-3): ``--ttt-steps`` unrolled steps feed the head
   its own previous output as the feature, attending to the true-feature keys before
   the chain and to the chain's own keys, exactly as drafting does; step s weighs 0.8^s.
4. Evaluation: on held-out windows, the share of positions where the head's greedy
   token equals the target's at each chain position (teacher-forced) and the mean
   accepted length that implies; then lanner's speculative engine, with the saved head,
   greedy on held-out prompts: its measured mean accepted length per k.
5. Saves config.json, model.safetensors (bf16; the EAGLE tensor names) and
   training_report.json into ``--out-dir`` (and the report into $OUT when set).

Seeded (windows, split, initial weights, batch order); the number of steps depends on
the machine's speed, as training stops on time. CPU (the shipped demo head)::

    nice -n 10 .venv/bin/python scripts/train_eagle_head.py --device cpu --time-budget-s 2100

GPU (one H200, about 4 minutes in all; the shipped lanner/assets/demo-eagle), from the
repository root, with the interpreter that trained the demo model (its site-packages are
the corpus)::

    PYTHONPATH=. python3 scripts/train_eagle_head.py --device cuda --time-budget 190 \
        --max-train-tokens 33554432 --reserve-s 15 --eval-ks 2,4 --out-dir $OUT/demo-eagle

``--max-steps`` stops training after that many steps (the schedule then follows them).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "lanner/assets/demo-model"
DEMO_HEAD = REPO_ROOT / "lanner/assets/demo-eagle"
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def load_demo_trainer():
    """scripts/train_demo_model.py as a module (its corpus and held-out split)."""
    spec = importlib.util.spec_from_file_location(
        "train_demo_model", REPO_ROOT / "scripts/train_demo_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(DEMO_MODEL), help="HF checkpoint folder or Hub id")
    p.add_argument("--out-dir", type=Path, default=DEMO_HEAD)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", "--time-budget", type=float, default=2100.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after these")
    p.add_argument("--corpus-files", nargs="*", default=None, help="text files or folders")
    p.add_argument("--heldout-frac", type=float, default=0.05)
    p.add_argument("--heldout-margin", type=float, default=0.25, help="of the split's edge")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-train-tokens", type=int, default=None)
    p.add_argument("--feature-frac", type=float, default=0.3, help="budget share for features")
    p.add_argument("--feature-cache", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="windows; default 4 cpu, 32 gpu")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--ttt-steps", type=int, default=None, help="default 2 cpu, 3 gpu")
    p.add_argument("--labels", choices=("argmax", "soft"), default=None)
    p.add_argument("--feature-noise", type=float, default=0.1)
    p.add_argument("--fc-bias", action="store_true")
    p.add_argument("--reserve-s", type=float, default=None, help="kept for eval and saving")
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--eval-prompts", type=int, default=None, help="default 16 cpu, 64 gpu")
    p.add_argument("--eval-prompt-tokens", type=int, default=256)
    p.add_argument("--eval-output-tokens", type=int, default=None, help="default 64 cpu")
    p.add_argument("--eval-ks", default="1,2,3,4,5,6")
    p.add_argument("--eval-only", action="store_true", help="engine eval of --out-dir")
    p.add_argument("--skip-engine-eval", action="store_true")
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = {
        "batch_size": 32 if gpu else 4,
        "ttt_steps": 3 if gpu else 2,
        "labels": "soft" if gpu else "argmax",
        "eval_prompts": 64 if gpu else 16,
        "eval_output_tokens": 256 if gpu else 64,
        "reserve_s": max(60.0, 0.12 * args.time_budget_s),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_ks = [int(k) for k in args.eval_ks.split(",") if k]
    return args


# --------------------------------------------------------------------------- corpus


@dataclass
class TextSplit:
    train: list[str]
    heldout: list[str]
    description: dict = field(default_factory=dict)


def corpus_split(args: argparse.Namespace) -> TextSplit:
    trainer = load_demo_trainer()
    if args.corpus_files:
        # Each file keyed by its path below its argument's parent folder, so that the
        # split is the same wherever the files sit (an absolute path held out an empty
        # __init__.py in one clone and a 13 kB file in another).
        named: list[tuple[str, Path]] = []
        for name in args.corpus_files:
            path = Path(name).resolve()
            files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
            named += [(str(q.relative_to(path.parent)), q) for q in files]
        keyed = sorted(
            ((trainer.seeded_fraction(args.seed, "heldout", key), q) for key, q in named),
            key=lambda item: item[0],
        )
        cut = max(1, round(args.heldout_frac * len(keyed)))
        edge = keyed[cut - 1][0] * (1 + args.heldout_margin)
        read = [(f, q.read_text(errors="replace")) for f, q in keyed]
        return TextSplit(
            train=[text for f, text in read[cut:] if f > edge],
            heldout=[text for _, text in read[:cut]],
            description={"kind": "files", "files": len(named), "heldout_files": cut},
        )
    demo_args = trainer.parse_args(["--device", "cpu"])
    corpus = trainer.collect_corpus(demo_args)
    ranks = {
        f.key: trainer.seeded_fraction(demo_args.seed, "heldout", f.key) for f in corpus.heldout
    }
    edge = max(ranks.values()) * (1 + args.heldout_margin)
    train = [
        f.text
        for f in corpus.train
        if trainer.seeded_fraction(demo_args.seed, "heldout", f.key) > edge
    ]
    return TextSplit(
        train=train,
        heldout=[f.text for f in corpus.heldout],
        description={
            "kind": "train_demo_model corpus (this interpreter's stdlib and site-packages)",
            "train_files": len(train),
            "train_files_near_the_split_left_out": len(corpus.train) - len(train),
            "heldout_files": len(corpus.heldout),
            # Equal when this machine's files are the demo model's training machine's.
            "heldout_files_in_demo_model_report": demo_report_heldout_files(),
        },
    )


def demo_report_heldout_files() -> int | None:
    report = DEMO_MODEL / "training_report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get("corpus", {}).get("heldout_files")


def iter_windows(texts: list[str], tokenizer, seq_len: int, seed: int) -> Iterator[list[int]]:
    """Windows of seq_len tokens of the texts (end-of-text between files), cut back to
    back from the files in a seeded order; files are tokenized as windows are drawn."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for index in order:
        stream += tokenizer.encode(texts[index], add_special_tokens=False) + [eos]
        while len(stream) >= seq_len:
            yield stream[:seq_len]
            stream = stream[seq_len:]


# --------------------------------------------------------------------------- features


@dataclass
class Features:
    tokens: torch.Tensor  # [N, T] int64
    hidden: torch.Tensor  # [N, T, H] fp16: the target's final hidden states
    greedy: torch.Tensor  # [N, T] int64: the target's argmax next token at each position


@torch.inference_mode()
def extract_features(
    target,
    windows: Iterator[list[int]],
    max_windows: int,
    batch_size: int,
    device: torch.device,
    deadline: float,
) -> Features:
    """The target's final hidden states and greedy tokens for up to ``max_windows``
    windows, until the deadline (at least one batch)."""
    tokens, hidden, greedy = [], [], []
    done = 0
    while done < max_windows and (not hidden or time.perf_counter() < deadline):
        rows = list(itertools.islice(windows, min(batch_size, max_windows - done)))
        if not rows:
            break
        batch = torch.tensor(rows, dtype=torch.long)
        with autocast(device):
            out = target(input_ids=batch.to(device), output_hidden_states=True, use_cache=False)
        tokens.append(batch)
        hidden.append(out.hidden_states[-1].to(torch.float16).cpu())
        greedy.append(out.logits.argmax(dim=-1).cpu())
        done += len(rows)
    if not tokens:
        raise ValueError(
            "no window of --seq-len tokens in these texts (the held-out files, for the "
            "evaluation): give more or longer --corpus-files, a larger --heldout-frac, "
            "or a shorter --seq-len"
        )
    return Features(torch.cat(tokens), torch.cat(hidden), torch.cat(greedy))


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------- the head


class TrainingHead(nn.Module):
    """The EAGLE-1 head in plain torch (lanner's EagleHead computes the same, paged):
    x = fc([embed(t_{p+1}); f_p]); y = x + attn(x); out = y + mlp(rmsnorm(y)). Layer 0
    has no input norm (the fc output is attended directly), and the output feeds the
    target's LM head without a final norm, as the published EAGLE heads do."""

    def __init__(self, config, fc_bias: bool) -> None:
        super().__init__()
        from lanner.model.layers.rotary import RotaryEmbedding

        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, None
        kv_heads = config.num_key_value_heads
        head_dim = config.head_dim
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        bias = config.attention_bias
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(
            heads * head_dim, hidden, bias=bias and config.model_type != "qwen2"
        )
        self.q_norm = nn.Parameter(torch.ones(head_dim)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(head_dim)) if config.qk_norm else None
        self.post_attention_layernorm = nn.Parameter(torch.ones(hidden))
        size = config.intermediate_size
        self.gate_proj = nn.Linear(hidden, size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, hidden, bias=config.mlp_bias)
        rotary = RotaryEmbedding(head_dim, config.rope, config.max_position_embeddings)
        self.register_buffer("cos_sin", rotary.cos_sin_cache, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """Small random projections; fc starts as the identity on the feature half, so
        the untrained head predicts f_{p+1} = f_p plus its layer's (small) output."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, 0.02, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
            hidden = self.config.hidden_size
            self.fc.weight[:, hidden:] += torch.eye(hidden)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from lanner.kernels.reference import apply_rotary

        batch, length = x.shape[:2]
        flat = apply_rotary(x.flatten(0, 1), positions.repeat(batch), self.cos_sin)
        return flat.view(batch, length, *x.shape[2:])

    def step(
        self,
        x: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """One pass of the layer over x [B, T, H] (the fc output), as chain step s =
        len(keys): position p attends to step 0's keys at positions <= p - s and to
        step i's key at p - s + i (i = 1..s: the chain's own entries, its own last).
        Appends this step's keys and values."""
        from lanner.kernels.reference import rms_norm

        cfg = self.config
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = (
                rms_norm(q, self.q_norm, cfg.rms_norm_eps),
                rms_norm(k, self.k_norm, cfg.rms_norm_eps),
            )
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        group = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2)  # [B, heads, T, d]
        k = k.repeat_interleave(group, dim=2).transpose(1, 2)
        v = v.repeat_interleave(group, dim=2).transpose(1, 2)
        keys.append(k)
        values.append(v)
        s = len(keys) - 1
        if s == 0:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scale = self.head_dim**-0.5
            scores = (q @ keys[0].transpose(-1, -2)) * scale
            index = torch.arange(length, device=x.device)
            scores = scores.masked_fill(index[None, :] > index[:, None] - s, float("-inf"))
            own = [
                (q * _shift(keys[i], s - i)).sum(-1, keepdim=True) * scale for i in range(1, s + 1)
            ]
            invalid = torch.stack([index < s - i for i in range(1, s + 1)], dim=-1)
            own_scores = torch.cat(own, dim=-1).masked_fill(invalid, float("-inf"))
            probs = torch.cat([scores, own_scores], dim=-1).float().softmax(-1).to(q.dtype)
            attn = probs[..., :length] @ values[0]
            for i in range(1, s + 1):
                attn = attn + probs[..., length + i - 1 : length + i] * _shift(values[i], s - i)
        attn = attn.transpose(1, 2).reshape(batch, length, -1)
        residual = x + self.o_proj(attn)
        h = rms_norm(residual, self.post_attention_layernorm, cfg.rms_norm_eps)
        return residual + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def unroll(
        self, embeds: torch.Tensor, features: torch.Tensor, steps: int
    ) -> list[torch.Tensor]:
        """Outputs [B, T, H] of chain steps 0..steps-1: step 0 reads the target's
        features f_p; step s the head's own step s - 1 output at p - 1. ``embeds`` are
        the embeddings of t_{p+1}."""
        positions = torch.arange(embeds.shape[1], device=embeds.device)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        feature = features
        for s in range(steps):
            if s:
                feature = _shift(outputs[-1], 1, dim=1)
            x = self.fc(torch.cat([embeds, feature], dim=-1))
            outputs.append(self.step(x, keys, values, positions))
        return outputs

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under the EAGLE-1 checkpoint names lanner (and EAGLE) load."""
        names = {
            "fc.weight": self.fc.weight,
            "layers.0.self_attn.q_proj.weight": self.q_proj.weight,
            "layers.0.self_attn.k_proj.weight": self.k_proj.weight,
            "layers.0.self_attn.v_proj.weight": self.v_proj.weight,
            "layers.0.self_attn.o_proj.weight": self.o_proj.weight,
            "layers.0.post_attention_layernorm.weight": self.post_attention_layernorm,
            "layers.0.mlp.gate_proj.weight": self.gate_proj.weight,
            "layers.0.mlp.up_proj.weight": self.up_proj.weight,
            "layers.0.mlp.down_proj.weight": self.down_proj.weight,
        }
        for prefix, module in (
            ("fc", self.fc),
            ("layers.0.self_attn.q_proj", self.q_proj),
            ("layers.0.self_attn.k_proj", self.k_proj),
            ("layers.0.self_attn.v_proj", self.v_proj),
            ("layers.0.self_attn.o_proj", self.o_proj),
            ("layers.0.mlp.gate_proj", self.gate_proj),
            ("layers.0.mlp.up_proj", self.up_proj),
            ("layers.0.mlp.down_proj", self.down_proj),
        ):
            if module.bias is not None:
                names[f"{prefix}.bias"] = module.bias
        if self.q_norm is not None:
            names["layers.0.self_attn.q_norm.weight"] = self.q_norm
            names["layers.0.self_attn.k_norm.weight"] = self.k_norm
        return {n: t.detach().to(torch.bfloat16).contiguous().cpu() for n, t in names.items()}


def _shift(x: torch.Tensor, by: int, dim: int = 2) -> torch.Tensor:
    """x moved ``by`` places later along ``dim`` (zeros in front): out[p] = x[p - by]."""
    if by == 0:
        return x
    pad = torch.zeros_like(x.narrow(dim, 0, by))
    return torch.cat([pad, x.narrow(dim, 0, x.shape[dim] - by)], dim=dim)


# --------------------------------------------------------------------------- training


@dataclass
class LossParts:
    total: torch.Tensor
    regression: list[float]
    classification: list[float]
    accuracy: list[float]


def head_losses(
    head: TrainingHead,
    embed: nn.Embedding,
    lm_head: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    greedy: torch.Tensor,
    steps: int,
    labels: str,
    noise: float,
    generator: torch.Generator | None,
) -> LossParts:
    """Losses of one batch of windows over chain steps 0..steps-1: step s at position p
    (p >= s) predicts the target's feature f_{p+1} and its greedy token at p + 1."""
    length = tokens.shape[1]
    features = hidden.float()
    if noise and generator is not None:
        uniform = torch.rand(features.shape, generator=generator, device=features.device)
        features = features + (uniform * 2 - 1) * noise
    embeds = embed(torch.roll(tokens, -1, dims=1)).float()  # t_{p+1}; the last is unused
    outputs = head.unroll(embeds, features, steps)
    total = features.new_zeros(())
    regression, classification, accuracy = [], [], []
    for s, out in enumerate(outputs):
        rows = slice(s, length - 1)
        predicted = out[:, rows]
        wanted = hidden[:, s + 1 : length].float()
        reg = F.smooth_l1_loss(predicted, wanted)
        logits = predicted.flatten(0, 1) @ lm_head.t()
        target_tokens = greedy[:, s + 1 : length].flatten()
        if labels == "soft":
            with torch.no_grad():
                soft = (wanted.flatten(0, 1) @ lm_head.t()).float().softmax(-1)
            ce = -(soft * logits.float().log_softmax(-1)).sum(-1).mean()
        else:
            ce = F.cross_entropy(logits.float(), target_tokens)
        total = total + 0.8**s * (reg + 0.1 * ce)
        regression.append(reg.item())
        classification.append(ce.item())
        accuracy.append((logits.argmax(-1) == target_tokens).float().mean().item())
    return LossParts(total, regression, classification, accuracy)


def lr_at(progress: float, args: argparse.Namespace) -> float:
    if progress < args.warmup_frac:
        return args.lr * progress / args.warmup_frac
    done = (progress - args.warmup_frac) / max(1e-9, 1 - args.warmup_frac)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def train(
    head: TrainingHead,
    embed: nn.Embedding,
    lm_head: torch.Tensor,
    data: Features,
    seconds: float,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    order_rng = random.Random(args.seed + 1)
    noise_rng = torch.Generator(device=device).manual_seed(args.seed + 2)
    order: list[int] = []
    started = time.perf_counter()
    steps, windows_seen, history = 0, 0, []
    head.train()
    while True:
        elapsed = time.perf_counter() - started
        if (elapsed >= seconds and steps) or steps == args.max_steps:
            break
        if len(order) < args.batch_size:
            epoch = list(range(len(data.tokens)))
            order_rng.shuffle(epoch)
            order += epoch
        batch, order = order[: args.batch_size], order[args.batch_size :]
        # The schedule follows whichever ends training first: the clock or --max-steps.
        progress = elapsed / seconds
        if args.max_steps:
            progress = max(progress, steps / args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, args)
        with autocast(device):
            parts = head_losses(
                head,
                embed,
                lm_head,
                data.tokens[batch].to(device),
                data.hidden[batch].to(device),
                data.greedy[batch].to(device),
                args.ttt_steps,
                args.labels,
                args.feature_noise,
                noise_rng,
            )
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        steps += 1
        windows_seen += len(batch)
        if steps % args.log_every == 0 or steps == 1:
            entry = {
                "step": steps,
                "seconds": round(time.perf_counter() - started, 1),
                "loss": round(parts.total.item(), 4),
                "regression": [round(v, 4) for v in parts.regression],
                "cross_entropy": [round(v, 4) for v in parts.classification],
                "accuracy": [round(v, 4) for v in parts.accuracy],
            }
            history.append(entry)
            log(f"step {steps}: {entry}")
    head.eval()
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "windows_seen": windows_seen,
        "tokens_seen": windows_seen * data.tokens.shape[1],
        "epochs": round(windows_seen / len(data.tokens), 3),
        "log": history,
    }


@torch.no_grad()
def heldout_accuracy(
    head: TrainingHead,
    embed: nn.Embedding,
    lm_head: torch.Tensor,
    data: Features,
    steps: int,
    device: torch.device,
) -> dict:
    """Per chain position, the share of held-out positions where the head's greedy token
    is the target's (teacher-forced: earlier drafts taken as right), and the mean
    accepted length E(k) = 1 + a_1 + a_1 a_2 + ... that these rates imply."""
    sums = [0.0] * steps
    count = 0
    for start in range(0, len(data.tokens), 8):
        rows = slice(start, start + 8)
        with autocast(device):
            parts = head_losses(
                head,
                embed,
                lm_head,
                data.tokens[rows].to(device),
                data.hidden[rows].to(device),
                data.greedy[rows].to(device),
                steps,
                "argmax",
                0.0,
                None,
            )
        windows = len(data.tokens[rows])
        sums = [a + b * windows for a, b in zip(sums, parts.accuracy, strict=True)]
        count += windows
    rates = [s / count for s in sums]
    implied, product = {}, 1.0
    length = 1.0
    for k, rate in enumerate(rates, start=1):
        product *= rate
        length += product
        implied[k] = round(length, 4)
    return {
        "windows": count,
        "tokens": count * data.tokens.shape[1],
        "greedy_match_per_position": [round(r, 4) for r in rates],
        "implied_mean_accepted_length": implied,
    }


# --------------------------------------------------------------------------- engine eval


def heldout_prompts(texts: list[str], tokenizer, count: int, length: int, seed: int) -> list:
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    prompts = []
    for index in order:
        ids = tokenizer.encode(texts[index], add_special_tokens=False)
        if len(ids) < 2 * length:
            continue
        start = rng.randrange(0, len(ids) - 2 * length + 1)
        prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    return prompts


def engine_acceptance(
    target: str, head_dir: Path, prompts: list[list[int]], args: argparse.Namespace
) -> dict:
    """lanner's speculative engine with the saved head, greedy on held-out prompts: the
    measured mean accepted length (accepted drafts + 1 per verify step) per k, and whether
    the tokens are the plain run's."""
    from lanner import LLM, SamplingParams

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    params = SamplingParams(
        temperature=0.0, max_tokens=args.eval_output_tokens, ignore_eos=True, detokenize=False
    )
    requests = [{"prompt_token_ids": p} for p in prompts]
    options = dict(
        dtype="bfloat16" if device == "cuda" else "float32",
        device=device,
        max_model_len=args.eval_prompt_tokens + args.eval_output_tokens + 16,
        max_num_seqs=len(prompts),
        enforce_eager=True,  # acceptance does not depend on graphs; capturing costs time
        # Sized in bytes: the engines run one after another beside the training state.
        kv_cache_memory_bytes=(2 << 30) if device == "cuda" else 64 << 20,
    )

    def run(speculative_config: dict | None) -> tuple[list[list[int]], float, LLM]:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        llm = LLM(target, speculative_config=speculative_config, **options)
        started = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], time.perf_counter() - started, llm

    reference, _, plain = run(None)
    del plain
    results = {}
    for k in args.eval_ks:
        config = {
            "method": "eagle",
            "model": str(head_dir),
            "num_speculative_tokens": k,
            "adaptive_draft_length": False,
        }
        tokens, seconds, llm = run(config)
        stats = llm.engine.core.spec.policy.stats
        per_position = stats.num_accepted_tokens_per_pos
        results[k] = {
            "mean_accepted_length": round(stats.mean_acceptance_length, 4),
            "num_drafts": stats.num_drafts,
            "num_draft_tokens": stats.num_draft_tokens,
            "num_accepted_tokens": stats.num_accepted_tokens,
            "accepted_per_position": [round(n / max(1, stats.num_drafts), 4) for n in per_position],
            "same_tokens_as_without_speculation": tokens == reference,
            "seconds": round(seconds, 2),
        }
        log(f"engine eval k={k}: {results[k]}")
        del llm
        gc.collect()
    return results


# --------------------------------------------------------------------------- main


def head_config(target_config: dict, fc_bias: bool) -> dict:
    """The target's config.json with one layer: the EAGLE-1 head's config ("bias" is
    fc's bias, as EAGLE reads it)."""
    config = {k: v for k, v in target_config.items() if not k.startswith("_")}
    config.update(num_hidden_layers=1, bias=fc_bias, dtype="bfloat16")
    config.pop("torch_dtype", None)
    config.pop("layer_types", None)
    return config


def save_head(head: TrainingHead, config: dict, out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(head.checkpoint_tensors(), str(out_dir / "model.safetensors"))
    for path in out_dir.iterdir():
        path.chmod(0o644)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}


def write_report(report: dict, out_dir: Path) -> None:
    text = json.dumps(report, indent=2) + "\n"
    (out_dir / "training_report.json").write_text(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "eagle_training_report.json").write_text(text)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lanner.model.config import ModelConfig
    from lanner.model.loader import resolve_model_path

    args = parse_args(argv)
    deadline = _T0 + args.time_budget_s
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    target_dir = resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    split = corpus_split(args)
    log(f"corpus: {split.description}")
    if args.eval_only:
        report = json.loads((args.out_dir / "training_report.json").read_text())
        prompts = heldout_prompts(
            split.heldout, tokenizer, args.eval_prompts, args.eval_prompt_tokens, args.seed
        )
        report["engine_eval"] = engine_eval_section(str(target_dir), prompts, args)
        write_report(report, args.out_dir)
        return report

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
    target.requires_grad_(False)
    raw_config = json.loads((target_dir / "config.json").read_text())
    config = ModelConfig.from_dict(raw_config)
    phases = {"setup": round(time.perf_counter() - _T0, 1)}

    # Features: the training windows on time (or from the cache), then held-out ones.
    feature_deadline = time.perf_counter() + args.feature_frac * (deadline - time.perf_counter())
    max_windows = (args.max_train_tokens or 10**12) // args.seq_len
    cache = args.feature_cache
    if cache is not None and cache.is_file():
        data = Features(**torch.load(cache))
        log(f"features: {tuple(data.hidden.shape)} from {cache}")
    else:
        windows = iter_windows(split.train, tokenizer, args.seq_len, args.seed)
        data = extract_features(
            target, windows, max_windows, args.batch_size, device, feature_deadline
        )
        if cache is not None:
            torch.save(vars(data), cache)
    heldout_windows = iter_windows(split.heldout, tokenizer, args.seq_len, args.seed)
    eval_data = extract_features(
        target, heldout_windows, args.eval_windows, args.batch_size, device, math.inf
    )
    phases["features"] = round(time.perf_counter() - _T0 - phases["setup"], 1)
    log(
        f"features: {len(data.tokens)} training windows ({data.tokens.numel():,} tokens), "
        f"{len(eval_data.tokens)} held-out windows"
    )

    embed = target.get_input_embeddings()
    lm_head = target.get_output_embeddings().weight.detach()
    # Initialized on the CPU (its seeded generator is a CPU one), then moved.
    head = TrainingHead(config, args.fc_bias)
    head.init_weights(torch.Generator().manual_seed(args.seed))
    head.to(device)
    train_seconds = deadline - time.perf_counter() - args.reserve_s
    stats = train(head, embed, lm_head, data, max(1.0, train_seconds), args, device)
    phases["train"] = stats["seconds"]
    eval_started = time.perf_counter()
    accuracy = heldout_accuracy(head, embed, lm_head, eval_data, max(6, args.ttt_steps), device)
    log(f"held-out: {accuracy}")
    files = save_head(head, head_config(raw_config, args.fc_bias), args.out_dir)
    phases["eval_and_save"] = round(time.perf_counter() - eval_started, 1)
    report = {
        "target": str(args.target),
        "card": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "device": str(device),
        "seed": args.seed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": split.description,
        "features": {
            "train_windows": len(data.tokens),
            "train_tokens": data.tokens.numel(),
            "heldout_windows": len(eval_data.tokens),
            "seq_len": args.seq_len,
        },
        "head": {
            "layout": "eagle (EAGLE-1/2: fc, one decoder layer; the target's embedding, LM head)",
            "parameters": sum(p.numel() for p in head.parameters()),
            "files": files,
        },
        "training": stats,
        "heldout_teacher_forced": accuracy,
        "phase_seconds": phases,
    }
    write_report(report, args.out_dir)
    if not args.skip_engine_eval:
        prompts = heldout_prompts(
            split.heldout, tokenizer, args.eval_prompts, args.eval_prompt_tokens, args.seed
        )
        report["engine_eval"] = engine_eval_section(str(target_dir), prompts, args)
    report["phase_seconds"]["total"] = round(time.perf_counter() - _T0, 1)
    write_report(report, args.out_dir)
    log(f"done in {time.perf_counter() - _T0:.0f}s; saved {args.out_dir}")
    return report


def engine_eval_section(target: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    results = engine_acceptance(target, args.out_dir, prompts, args)
    return {
        "prompts": len(prompts),
        "prompt_tokens": args.eval_prompt_tokens,
        "output_tokens": args.eval_output_tokens,
        "greedy": True,
        "device": args.device,
        "per_k": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
