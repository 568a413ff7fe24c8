"""Train lanner's small demo models on Python source code and save them in Hugging Face format.

What it does, in one process and inside one wall-clock budget (``--time-budget-s``):

1. Collects the ``.py`` files of this interpreter's standard library and site-packages,
   drops duplicates, oversized and non-UTF-8 files, caps the total size and holds out
   5 % of the files (chosen by a seeded hash) for evaluation only.
2. Trains a byte-level BPE tokenizer (``tokenizers``) on training files only, adds the
   chat special tokens and a chat template, and wraps it as a ``PreTrainedTokenizerFast``.
3. Tokenizes the corpus with all cores into one packed stream, ``<|endoftext|>`` between files.
4. Trains a Llama-architecture main model (~16 M parameters, about 31 MB in bf16) and a
   2-layer draft model for speculative decoding. The learning-rate schedule (warmup, then
   cosine) runs on elapsed time, so it ends exactly when each model's time slice ends.
5. Reports held-out perplexity and greedy completions of both models, then saves each as
   bf16 safetensors shards under 16 MB with their own tokenizer copy and writes
   ``training_report.json`` (also into ``$OUT/`` when ``OUT`` is set).

Run on the GPU machine (one H100; no network needed), from the repository root::

    python3 scripts/train_demo_model.py

which writes ``lanner/assets/demo-model/`` and ``lanner/assets/demo-draft/`` in about
8 minutes. CPU smoke test (a couple of minutes)::

    python3 scripts/train_demo_model.py --device cpu --tiny --time-budget-s 60 \\
        --max-corpus-mb 2 --vocab-size 1024 --out-dir /tmp/demo --draft-out-dir /tmp/demo-draft

Everything that can be is seeded (file order, held-out split, tokenizer, initial weights,
batch order). The number of optimizer steps depends on how fast the machine is, because
training stops on time, so two runs match exactly only on the same hardware and load.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import site
import sysconfig
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Ids 0..5 in this order: EOT doubles as bos/eos (it separates files in training).
SPECIAL_TOKENS = [EOT, PAD, *CHAT_TOKENS]
# Each message is "<|role|>\n{content}<|end|>\n"; the prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef list_files(path):",
    "class Stack:",
    "def is_prime(n):",
]
MB = 1_000_000  # sizes are decimal megabytes, the stricter reading of "40 MB" / "16 MB"
# Shards are filled with tensor bytes up to this share of the cap: the rest is headroom for
# the safetensors JSON header, which the shard size limit of save_pretrained does not count.
SHARD_FILL = 0.95


def process_age_s() -> float:
    """Seconds since this process started, from Linux /proc (0 elsewhere), so that the time
    budget also covers interpreter start-up and the torch/transformers imports."""
    try:
        # Field 22 of /proc/self/stat is the start time in clock ticks after boot; the fields
        # after the ")" that closes the command name start at field 3.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return 0.0


# The budget clock: perf_counter value at process start.
_PROCESS_T0 = time.perf_counter() - process_age_s()


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=480.0,
        help="wall-clock budget for the whole run, imports to report",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "lanner/assets/demo-model")
    p.add_argument("--draft-out-dir", type=Path, default=REPO_ROOT / "lanner/assets/demo-draft")
    # corpus and tokenizer
    p.add_argument("--max-corpus-mb", type=float, default=300.0)
    p.add_argument("--max-file-mb", type=float, default=1.0)
    p.add_argument("--heldout-frac", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=48.0,
        help="training text fed to the BPE trainer (its merge phase is serial)",
    )
    # model
    p.add_argument("--tiny", action="store_true", help="tiny dims for a CPU smoke test")
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--max-model-mb", type=float, default=40.0, help="cap on bf16 weight bytes")
    p.add_argument("--max-shard-mb", type=float, default=16.0, help="cap on each safetensors file")
    p.add_argument(
        "--min-shards",
        type=int,
        default=2,
        help="split even small models, so each folder has model.safetensors.index.json",
    )
    # training
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on cuda, 8 on cpu")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="of each model's time slice")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--draft-frac", type=float, default=0.2, help="share of training time")
    p.add_argument(
        "--reserve-s",
        type=float,
        default=None,
        help="time kept back for eval + saving; default max(10, 8%% of budget)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward (compile time eats the budget)",
    )
    p.add_argument("--log-every", type=int, default=50)
    # evaluation
    p.add_argument("--eval-tokens", type=int, default=2_000_000)
    p.add_argument("--sample-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 176
        args.num_heads, args.num_kv_heads, args.draft_layers = 2, 1, 1
    if args.batch_size is None:
        args.batch_size = 64 if args.device.startswith("cuda") else 8
    if args.reserve_s is None:
        args.reserve_s = max(10.0, 0.08 * args.time_budget_s)
    return args


# --------------------------------------------------------------------------- bookkeeping


class Clock:
    """Wall-clock phases of the run, measured against one deadline."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = _PROCESS_T0 + budget_s
        self.phases: dict[str, float] = {"imports": round(time.perf_counter() - _PROCESS_T0, 2)}
        self._mark = time.perf_counter()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - _PROCESS_T0

    def lap(self, phase: str) -> float:
        """Close the current phase under ``phase`` and return its duration."""
        now = time.perf_counter()
        self.phases[phase] = round(now - self._mark, 2)
        self._mark = now
        return self.phases[phase]


def log(msg: str) -> None:
    # flush so a log cut off by the outer time limit still shows how far the run got
    print(f"[{time.perf_counter() - _PROCESS_T0:7.1f}s] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seeded_fraction(seed: int, salt: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------- corpus


@dataclass
class SourceFile:
    key: str  # "<root label>/<path relative to that root>", stable across machines
    text: str


@dataclass
class Corpus:
    train: list[SourceFile]
    heldout: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def nbytes(files: list[SourceFile]) -> int:
        return sum(len(f.text.encode()) for f in files)


def source_roots() -> list[tuple[str, Path]]:
    """Standard library, purelib and site-packages folders, each real path once."""
    paths = sysconfig.get_paths()
    candidates = [("stdlib", paths["stdlib"]), ("purelib", paths["purelib"])]
    candidates += [(f"site{i}", p) for i, p in enumerate(site.getsitepackages())]
    roots: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for label, raw in candidates:
        real = Path(raw).resolve()
        if real.is_dir() and real not in seen:
            seen.add(real)
            roots.append((label, real))
    return roots


def list_python_files(roots: list[tuple[str, Path]]) -> list[tuple[str, Path, int]]:
    """(key, path, size) of every .py file under the roots, in sorted order, each file once:
    roots can nest (the stdlib folder may hold the base interpreter's site-packages) and
    symlinks can alias, so files are told apart by device and inode."""
    found: list[tuple[str, Path, int]] = []
    seen: set[tuple[int, int]] = set()
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()  # os.walk order depends on the filesystem; sorting fixes it
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()  # one syscall; follows symlinks
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                found.append((f"{label}/{path.relative_to(root).as_posix()}", path, st.st_size))
    return found


def collect_corpus(args: argparse.Namespace) -> Corpus:
    """Read the capped, deduplicated corpus and split off the held-out files."""
    files = list_python_files(source_roots())
    # A seeded shuffle before the size cap, so a capped corpus still spans every package
    # instead of the alphabetically first ones.
    files.sort(key=lambda f: seeded_fraction(args.seed, "corpus", f[0]))
    cap, max_file = int(args.max_corpus_mb * MB), int(args.max_file_mb * MB)
    skipped = {"too_large": 0, "not_utf8": 0, "empty": 0, "duplicate": 0, "over_cap": 0}
    kept: list[SourceFile] = []
    digests: set[bytes] = set()
    total = 0
    for key, path, size in files:
        if size > max_file:
            skipped["too_large"] += 1
            continue
        if size == 0:
            skipped["empty"] += 1
            continue
        if total + size > cap:
            skipped["over_cap"] += 1
            continue
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped["not_utf8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        # Vendored copies of one file would leak held-out text into training.
        digest = hashlib.sha1(data).digest()
        if digest in digests:
            skipped["duplicate"] += 1
            continue
        digests.add(digest)
        kept.append(SourceFile(key, text))
        total += len(data)
    # Exactly heldout_frac of the files, ranked by a second seeded hash of their key.
    kept.sort(key=lambda f: seeded_fraction(args.seed, "heldout", f.key))
    n_heldout = max(1, round(args.heldout_frac * len(kept)))
    heldout, train = kept[:n_heldout], kept[n_heldout:]
    train.sort(key=lambda f: f.key)  # training order is reshuffled per epoch anyway
    heldout.sort(key=lambda f: f.key)
    return Corpus(train=train, heldout=heldout, skipped=skipped)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes and decodes
    back exactly; special tokens take ids 0..5."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def sample() -> Iterator[str]:
        used = 0
        for text in texts:  # texts arrive in a seeded order, so a prefix is a fair sample
            if used >= sample_bytes:
                return
            used += len(text)
            yield text

    tok.train_from_iterator(sample(), trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=PAD,  # separate from eos so padding masks never hide a real end of text
        additional_special_tokens=CHAT_TOKENS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # would break the exact byte round trip
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def tokenize_stream(tok: Tokenizer, files: list[SourceFile], batch_files: int = 512) -> array:
    """Token ids of all files packed as <eot> file <eot> file ..., uint16 when they fit."""
    typecode = "H" if tok.get_vocab_size() <= 2**16 else "I"
    stream = array(typecode)
    eot_id = tok.token_to_id(EOT)
    # Source files can quote "<|endoftext|>" literally; encode such text as plain bytes so
    # special ids only appear where this script puts them.
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: skips offsets
    try:
        for start in range(0, len(files), batch_files):
            batch = [f.text for f in files[start : start + batch_files]]
            for enc in encode(batch, add_special_tokens=False):  # parallel across files
                stream.append(eot_id)
                stream.extend(enc.ids)
    finally:
        tok.encode_special_tokens = False
    return stream


def check_round_trip(tok: PreTrainedTokenizerFast, files: list[SourceFile], n: int = 20) -> bool:
    for f in files[:n]:
        ids = tok(f.text, add_special_tokens=False, verbose=False)["input_ids"]
        if tok.decode(ids) != f.text:
            return False
    return True


def to_tensor(stream: array, vocab_size: int, device: torch.device) -> torch.Tensor:
    # int16 quarters device memory against int64; ids below 2**15 keep their value in int16.
    if stream.typecode == "H" and vocab_size <= 2**15:
        t = torch.frombuffer(stream, dtype=torch.int16)
    else:
        t = torch.tensor(stream, dtype=torch.int32)
    return t.clone().to(device)


# --------------------------------------------------------------------------- models


def llama_config(
    args: argparse.Namespace, vocab_size: int, num_layers: int, special_ids: dict[str, int]
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,  # the 8k x d embedding is a big share of a small model
        bos_token_id=special_ids[EOT],
        eos_token_id=special_ids[EOT],
        pad_token_id=special_ids[PAD],
        attn_implementation="sdpa",
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


def build_model(
    config: LlamaConfig, seed: int, name: str, max_bytes: int, max_shard_bytes: int
) -> LlamaForCausalLM:
    """A freshly initialised model, checked against the size caps before any training."""
    torch.manual_seed(seed)  # init independent of how much randomness earlier phases used
    model = LlamaForCausalLM(config)
    n = count_params(model)
    bf16_bytes = 2 * n
    log(
        f"{name}: {n:,} parameters, {bf16_bytes / MB:.1f} MB in bf16 "
        f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} q/kv heads of "
        f"{config.head_dim}, ffn {config.intermediate_size}, vocab {config.vocab_size})"
    )
    assert bf16_bytes <= max_bytes, f"{name} is {bf16_bytes / MB:.2f} MB > cap {max_bytes / MB}"
    # A shard holds whole tensors, so the largest one must fit under the shard cap.
    largest = max(2 * p.numel() for p in model.parameters())
    assert largest < SHARD_FILL * max_shard_bytes, (
        f"{name}: a {largest / MB:.2f} MB tensor cannot fit a {max_shard_bytes / MB} MB shard"
    )
    return model


# --------------------------------------------------------------------------- training


class BatchSampler:
    """Random non-overlapping windows of the packed stream, each window once per epoch."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        n_windows = (len(stream) - 1) // seq_len
        assert n_windows >= 1, "corpus too small for one training window"
        self.stream = stream
        self.batch_size = min(batch_size, n_windows)
        self.offsets = torch.arange(seq_len + 1, device=stream.device)  # +1 for the targets
        self.starts = torch.arange(n_windows, device=stream.device) * seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, n_windows  # forces a shuffle on first use
        self.order = self.starts

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.starts):
            perm = torch.randperm(len(self.starts), generator=self.generator)
            self.order = self.starts[perm.to(self.starts.device)]
            self.pos = 0
            self.epoch += 1
        starts = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        window = self.stream[starts[:, None] + self.offsets].long()
        return window[:, :-1], window[:, 1:]


def lr_at(progress: float, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr; progress is elapsed/budget."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < args.warmup_frac:
        return args.lr * max(progress / args.warmup_frac, 0.01)
    decay = (progress - args.warmup_frac) / (1.0 - args.warmup_frac)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * decay))


def make_optimizer(
    model: torch.nn.Module, args: argparse.Namespace, device: torch.device
) -> torch.optim.AdamW:
    # Decay matrices only; norm gains stay free.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda"
    )


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    final_train_loss: float = float("nan")  # mean over the last logging interval
    log: list[dict] = field(default_factory=list)


def train(
    model: LlamaForCausalLM,
    sampler: BatchSampler,
    budget_s: float,
    args: argparse.Namespace,
    device: torch.device,
    name: str,
) -> TrainStats:
    """AdamW on fp32 master weights with bf16 autocast on CUDA, until budget_s runs out."""
    budget_s = max(budget_s, 1e-3)  # an overrun upstream still gets one step, not a crash
    model.to(device).train()
    optimizer = make_optimizer(model, args, device)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stats = TrainStats()
    loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
    interval_steps, interval_t0, t0 = 0, time.perf_counter(), time.perf_counter()
    log(f"{name}: training for {budget_s:.0f}s, batch {sampler.batch_size}x{args.seq_len}")
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s and stats.steps > 0:
            break
        lr = lr_at(elapsed / budget_s, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sampler.next()
        with autocast:
            logits = forward(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        stats.steps += 1
        stats.tokens += inputs.numel()
        interval_steps += 1
        if stats.steps % args.log_every == 0 or stats.steps == 1:
            now = time.perf_counter()
            mean_loss = loss_sum.item() / interval_steps  # the one sync per interval
            tok_s = interval_steps * inputs.numel() / (now - interval_t0)
            stats.final_train_loss = mean_loss
            stats.log.append(
                {
                    "step": stats.steps,
                    "t": round(now - t0, 1),
                    "loss": round(mean_loss, 4),
                    "lr": lr,
                    "tok_s": round(tok_s),
                }
            )
            log(
                f"{name} step {stats.steps:5d}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                f"{tok_s / 1e3:7.1f}k tok/s  epoch {sampler.epoch}  t {now - t0:5.0f}s"
            )
            loss_sum.zero_()
            interval_steps, interval_t0 = 0, now
    if interval_steps:
        stats.final_train_loss = loss_sum.item() / interval_steps
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = round(time.perf_counter() - t0, 2)
    stats.tokens_per_s = round(stats.tokens / stats.seconds)
    stats.epochs = round(stats.steps * sampler.batch_size / len(sampler.starts), 3)
    log(
        f"{name}: {stats.steps} steps, {stats.tokens:,} tokens ({stats.epochs} epochs) in "
        f"{stats.seconds:.0f}s, final train loss {stats.final_train_loss:.4f}"
    )
    del optimizer  # its states are never saved
    return stats


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_perplexity(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    deadline: float,
) -> tuple[float, int]:
    """Token-level perplexity over the first max_tokens held-out tokens, in windows of seq_len.
    Stops early (and says how many tokens it scored) if the deadline comes first."""
    model.eval()
    device = next(model.parameters()).device
    n_tokens = min(len(stream) - 1, max_tokens)
    win = min(seq_len, n_tokens)
    n_windows = n_tokens // win
    offsets = torch.arange(win + 1, device=stream.device)
    starts = torch.arange(n_windows, device=stream.device) * win
    nll, scored = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for i in range(0, n_windows, batch_size):
        if time.perf_counter() > deadline:
            break
        window = stream[starts[i : i + batch_size, None] + offsets].long().to(device)
        with autocast:
            logits = model(input_ids=window[:, :-1], use_cache=False).logits
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum"
        ).item()
        scored += window[:, 1:].numel()
    return (math.exp(nll / scored) if scored else float("nan")), scored


@torch.no_grad()
def greedy_samples(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, max_new_tokens: int
) -> list[dict[str, str]]:
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
        completion = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion})
    return samples


# --------------------------------------------------------------------------- saving


# Files this script writes; only these are cleared from an existing output folder.
_OWNED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training_report.json",
)


def clear_outputs(out_dir: Path) -> None:
    """Remove a previous run's files so stale shards cannot mix with new ones."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        if path.name in _OWNED_FILES or path.suffix == ".safetensors":
            path.unlink()


def shard_size(model: torch.nn.Module, max_shard_bytes: int, min_shards: int) -> int:
    """Tensor bytes per shard: under the cap, and small enough to give at least min_shards
    files, so every output folder has the same sharded layout with an index file."""
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    even_split = math.ceil(1.05 * sum(sizes) / min_shards)  # slack: no tiny tail shard
    return min(int(SHARD_FILL * max_shard_bytes), max(even_split, max(sizes)))


def save_model(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    out_dir: Path,
    max_shard_bytes: int,
    min_shards: int,
) -> dict[str, int]:
    """Save bf16 weights in shards under max_shard_bytes plus the tokenizer; return file sizes."""
    clear_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir, max_shard_size=shard_size(model, max_shard_bytes, min_shards))
    tok.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors shards are written 0600; assets must be world-readable
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    shards = {n: s for n, s in sizes.items() if n.endswith(".safetensors")}
    assert shards, f"no safetensors written to {out_dir}"
    assert all(s < max_shard_bytes for s in shards.values()), f"shard over the cap: {shards}"
    if len(shards) > 1:
        index = json.loads((out_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards), "index and shards disagree"
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    return sizes


def write_report(report: dict, out_dir: Path) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "training_report.json").write_text(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_report.json").write_text(text)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    # Tokenizer training and encode_batch spread over all cores; tokenizers can switch its
    # thread pool off on its own (e.g. after a fork), so ask for it explicitly.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    device = torch.device(args.device)
    seed_everything(args.seed)
    transformers.utils.logging.disable_progress_bar()  # no shard-writing bars in the log
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers; matmuls run in bf16
        torch.backends.cudnn.allow_tf32 = True
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, device {device}, budget {args.time_budget_s:.0f}s"
    )

    corpus = collect_corpus(args)
    train_bytes, heldout_bytes = Corpus.nbytes(corpus.train), Corpus.nbytes(corpus.heldout)
    log(
        f"corpus: {len(corpus.train)} train files ({train_bytes / MB:.1f} MB), "
        f"{len(corpus.heldout)} held-out files ({heldout_bytes / MB:.1f} MB); "
        f"skipped {corpus.skipped} ({clock.lap('corpus')}s)"
    )

    # Tokenizer sample in the seeded corpus order, not the sorted one, so it spans packages.
    sample_texts = [
        f.text
        for f in sorted(corpus.train, key=lambda f: seeded_fraction(args.seed, "corpus", f.key))
    ]
    raw_tok = train_tokenizer(sample_texts, args.vocab_size, int(args.tokenizer_sample_mb * MB))
    del sample_texts
    tok = wrap_tokenizer(raw_tok, args.max_position_embeddings)
    special_ids = {t: raw_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = raw_tok.get_vocab_size()
    round_trip = check_round_trip(tok, corpus.heldout)
    assert round_trip, "tokenizer does not round-trip held-out text"
    log(
        f"tokenizer: vocab {vocab_size}, specials {special_ids}, "
        f"round trip ok ({clock.lap('tokenizer_train')}s)"
    )

    train_ids = tokenize_stream(raw_tok, corpus.train)
    heldout_ids = tokenize_stream(raw_tok, corpus.heldout)
    log(
        f"tokens: {len(train_ids):,} train ({train_bytes / len(train_ids):.2f} bytes/token), "
        f"{len(heldout_ids):,} held-out ({clock.lap('tokenize')}s)"
    )
    n_train_tokens, n_heldout_tokens = len(train_ids), len(heldout_ids)
    train_stream = to_tensor(train_ids, vocab_size, device)
    heldout_stream = to_tensor(heldout_ids, vocab_size, device)
    del train_ids, heldout_ids

    caps = {
        "max_bytes": int(args.max_model_mb * MB),
        "max_shard_bytes": int(args.max_shard_mb * MB),
    }
    main_model = build_model(
        llama_config(args, vocab_size, args.num_layers, special_ids), args.seed, "main", **caps
    )
    draft_model = build_model(
        llama_config(args, vocab_size, args.draft_layers, special_ids),
        args.seed + 1,
        "draft",
        **caps,
    )
    for model in (main_model, draft_model):
        model.generation_config = GenerationConfig(
            bos_token_id=special_ids[EOT],
            pad_token_id=special_ids[PAD],
            eos_token_id=[special_ids[EOT], special_ids["<|end|>"]],
        )  # <|end|> closes chat turns
    clock.lap("build_models")

    train_time = clock.left() - args.reserve_s
    if train_time < 10:
        log(f"warning: only {train_time:.0f}s left for training; each model gets >= 1 step")
    main_stats = train(
        main_model,
        BatchSampler(train_stream, args.seq_len, args.batch_size, args.seed),
        (1 - args.draft_frac) * train_time,
        args,
        device,
        "main",
    )
    main_model.to(torch.bfloat16)  # the weights as shipped; also frees the fp32 copy
    clock.lap("train_main")
    # The draft takes whatever is left before the reserve, absorbing any overrun of the main.
    draft_stats = train(
        draft_model,
        BatchSampler(train_stream, args.seq_len, args.batch_size, args.seed + 1),
        clock.left() - args.reserve_s,
        args,
        device,
        "draft",
    )
    draft_model.to(torch.bfloat16)
    clock.lap("train_draft")
    del train_stream
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Evaluate the bf16 weights exactly as saved; leave ~5 s of the budget for saving.
    eval_deadline = clock.deadline - 5.0
    results: dict[str, dict] = {}
    for name, model in (("main", main_model), ("draft", draft_model)):
        ppl, scored = heldout_perplexity(
            model, heldout_stream, args.seq_len, args.batch_size, args.eval_tokens, eval_deadline
        )
        samples = greedy_samples(model, tok, args.sample_tokens)
        results[name] = {
            "heldout_perplexity": round(ppl, 4),
            "heldout_tokens_scored": scored,
            "samples": samples,
        }
        log(f"{name}: held-out perplexity {ppl:.3f} over {scored:,} tokens")
        for s in samples:  # shortened here; the report keeps them whole
            log(f"{name} sample {s['prompt']!r} -> {s['completion'][:160]!r}")
        clock.lap(f"eval_{name}")

    main_files = save_model(main_model, tok, args.out_dir, caps["max_shard_bytes"], args.min_shards)
    draft_files = save_model(
        draft_model, tok, args.draft_out_dir, caps["max_shard_bytes"], args.min_shards
    )
    clock.lap("save")

    report = {
        "seed": args.seed,
        "device": str(device),
        "card": (
            torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {
            "train_files": len(corpus.train),
            "train_bytes": train_bytes,
            "train_tokens": n_train_tokens,
            "heldout_files": len(corpus.heldout),
            "heldout_bytes": heldout_bytes,
            "heldout_tokens": n_heldout_tokens,
            "skipped": corpus.skipped,
        },
        "tokenizer": {
            "vocab_size": vocab_size,
            "special_token_ids": special_ids,
            "round_trip_ok": round_trip,
        },
        "models": {},
        "phase_seconds": clock.phases,
    }
    for name, model, stats, out_dir, files in (
        ("main", main_model, main_stats, args.out_dir, main_files),
        ("draft", draft_model, draft_stats, args.draft_out_dir, draft_files),
    ):
        cfg = model.config
        n_params = count_params(model)
        report["models"][name] = {
            "out_dir": str(out_dir),
            "dims": {
                "hidden_size": cfg.hidden_size,
                "num_layers": cfg.num_hidden_layers,
                "num_heads": cfg.num_attention_heads,
                "num_kv_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim,
                "intermediate_size": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size,
            },
            "parameters": n_params,
            "bf16_bytes": 2 * n_params,
            "files": files,
            **{k: v for k, v in asdict(stats).items() if k != "log"},
            **results[name],
            "train_log": stats.log,
        }
    report["phase_seconds"]["total"] = round(clock.elapsed(), 2)
    write_report(report, args.out_dir)
    log(f"done in {clock.elapsed():.0f}s of {args.time_budget_s:.0f}s; phases {clock.phases}")
    log(f"saved {args.out_dir} and {args.draft_out_dir}")
    return report


if __name__ == "__main__":
    main()
