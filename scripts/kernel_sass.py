"""Compile a kernel wrapper's launches for the H100/H200 (sm_90) on a machine without a GPU
and report what ptxas made of each: registers, spills, shared memory, and the SASS
instruction mix (global/shared load widths, tensor-core ops, conversions, integer and
float ALU ops), with the instructions of the main loop counted apart.

The wrapper runs with CPU tensors standing in for device tensors, its launches recorded
(tests/kernels/test_compile_for_hopper.py's CompileRecorder) and each variant compiled
through ptxas; cuobjdump (shipped with Triton) disassembles the cubin. Example, from the
repository root with TRITON_INTERPRET unset:

    .venv/bin/python scripts/kernel_sass.py skinny:1x28672x4096 fp8_w8a8:1x28672x4096 \
        int4:8x6144x4096 [--dump DIR]

Each argument is CASE:MxNxK with CASE one of the wrapper calls in ``CASES``; ``--dump``
writes each variant's PTX and SASS there.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cases():
    import torch

    from lanner.kernels import skinny_matmul as skinny
    from lanner.kernels import w4a16_matmul, w8a8_matmul

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn

    def dense(m, n, k, **options):
        x, weight = torch.empty(m, k, dtype=bf16), torch.empty(n, k, dtype=bf16)
        return skinny.skinny_matmul(x, weight, **options)

    def w8(dtype, x_qmax=None):
        def call(m, n, k, **options):
            x, weight = torch.empty(m, k, dtype=bf16), torch.empty(n, k, dtype=dtype)
            return skinny.skinny_matmul_w8(x, weight, torch.empty(n), None, x_qmax, **options)

        return call

    def int4_operands(n, k):
        packed = torch.empty(n, -(-k // 512) * 64, dtype=torch.int32)
        return packed, torch.empty(-(-k // 128), n, dtype=bf16)

    def int4(m, n, k, **options):
        packed, scales = int4_operands(n, k)
        x = torch.empty(m, k, dtype=bf16)
        return skinny.skinny_matmul_w4(x, packed, scales, None, 128, **options)

    def int4_tiled(m, n, k, **options):
        packed, scales = int4_operands(n, k)
        x = torch.empty(m, k, dtype=bf16)
        return w4a16_matmul.w4a16_matmul(x, packed, scales, None, 128, **options)

    def dequant(m, n, k, **options):
        packed, scales = int4_operands(n, k)
        return w4a16_matmul.dequantize_int4(packed, scales, None, 128, k, bf16, **options)

    def w8a8_tiled(m, n, k, **options):
        x, weight = torch.empty(m, k, dtype=fp8), torch.empty(n, k, dtype=fp8)
        scales = torch.empty(m), torch.empty(n)
        return w8a8_matmul.w8a8_matmul(x, scales[0], weight, scales[1], None, bf16, **options)

    def decode(m, n, k, **options):
        """m sequences of n tokens decoding (llama3-8b heads: 32 / 8 of 128), a cache of k
        bits (16: bf16, 8: fp8 e4m3), bf16 queries."""
        from lanner.kernels.attention_metadata import AttentionMetadata
        from lanner.kernels.paged_attention import decode_attention

        block_size, per_seq = 16, -(-n // 16)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(m)]
        metadata = AttentionMetadata.build([1] * m, [n] * m, tables, block_size, "cpu")
        cache_dtype = bf16 if k == 16 else torch.float8_e4m3fn
        kv_cache = torch.empty(2, m * per_seq, block_size, 8, 128, dtype=cache_dtype)
        query = torch.empty(m, 32, 128, dtype=bf16)
        out = torch.empty_like(query)
        return decode_attention(query, kv_cache, metadata, 0.1, None, out, **options)

    return {
        "decode": decode,
        "skinny": dense,
        "fp8": w8(fp8),
        "fp8_w8a8": w8(fp8, 448.0),
        "int8": w8(torch.int8),
        "int4": int4,
        "int4_tiled": int4_tiled,
        "dequant": dequant,
        "w8a8_tiled": w8a8_tiled,
    }


# SASS opcode (first dotted part) -> the class it is counted in.
CLASSES = {
    "LDG": "global load",
    "LDGSTS": "cp.async global->shared",
    "LDGDEPBAR": "cp.async bookkeeping",
    "DEPBAR": "cp.async bookkeeping",
    "LDS": "shared load",
    "LDSM": "ldmatrix",
    "STS": "shared store",
    "STG": "global store",
    "HMMA": "tensor core",
    "IMMA": "tensor core",
    "QMMA": "tensor core",
    "HGMMA": "tensor core",
    "F2F": "conversion",
    "F2FP": "conversion",
    "I2F": "conversion",
    "F2I": "conversion",
    "I2FP": "conversion",
    "F2IP": "conversion",
    "FFMA": "fp32 fma/mul/add",
    "FMUL": "fp32 fma/mul/add",
    "FADD": "fp32 fma/mul/add",
    "HFMA2": "fp16x2/bf16x2 arithmetic",
    "HMUL2": "fp16x2/bf16x2 arithmetic",
    "HADD2": "fp16x2/bf16x2 arithmetic",
    "PRMT": "byte permute",
    "LOP3": "integer logic/shift",
    "SHF": "integer logic/shift",
    "IMAD": "integer add/mad",
    "IADD3": "integer add/mad",
    "LEA": "integer add/mad",
    "SHFL": "warp shuffle",
    "BAR": "barrier",
    "BRA": "branch",
    "ISETP": "compare/select",
    "FSETP": "compare/select",
    "SEL": "compare/select",
    "FSEL": "compare/select",
    "MOV": "move",
}


def sass_lines(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction of the cubin."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401 (tools present)

    tool = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(tool), "-sass", handle.name], capture_output=True, text=True, check=True
        ).stdout
    lines = []
    for line in text.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if match:
            lines.append((int(match.group(1), 16), match.group(2).strip()))
    return lines


def opcode(instruction: str) -> str:
    body = re.sub(r"^@!?U?P\w+\s+", "", instruction)
    return body.split()[0] if body else ""


def loop_ranges(lines: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """[start, end] addresses of the backward branches' bodies (the loops)."""
    loops = []
    for address, instruction in lines:
        if opcode(instruction).startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", instruction.split("BRA", 1)[1])
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    return loops


def mix(lines: list[tuple[int, str]]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for _, instruction in lines:
        op = opcode(instruction)
        base = op.split(".")[0]
        name = CLASSES.get(base, "other")
        if base in ("LDG", "LDS", "STS", "STG", "LDGSTS"):
            width = re.search(r"\.(128|64|U8|S8|U16|S16|32)\b", op)
            name += f" .{width.group(1) if width else '32'}"
        counts[name] += 1
    return counts


def report(name: str, source, options: dict, target, dump: Path | None) -> None:
    import triton

    compiled = triton.compile(source, target=target, options=options)
    asm = compiled.asm
    ptx_path = Path(tempfile.mkdtemp()) / "kernel.ptx"
    ptx_path.write_text(asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    verbose = subprocess.run(
        [str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx_path), "-o", os.devnull],
        capture_output=True,
        text=True,
    ).stderr
    used = re.search(r"Used (\d+) registers", verbose)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    lines = sass_lines(asm["cubin"])
    loops = loop_ranges(lines)
    print(f"\n== {name}")
    print(
        f"   registers {used.group(1) if used else '?'}, spill stores/loads "
        f"{spills.group(1) if spills else '?'}/{spills.group(2) if spills else '?'} bytes, "
        f"shared {compiled.metadata.shared} bytes, {len(lines)} SASS instructions"
    )
    for start, end in loops:
        body = [(a, i) for a, i in lines if start <= a <= end]
        counts = mix(body)
        print(f"   loop {start:#06x}-{end:#06x}: {len(body)} instructions")
        for key, value in counts.most_common():
            print(f"      {value:5d}  {key}")
    if not loops:
        for key, value in mix(lines).most_common():
            print(f"      {value:5d}  {key}")
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.-]+", "_", name)[:120]
        (dump / f"{safe}.ptx").write_text(asm["ptx"])
        (dump / f"{safe}.ttgir").write_text(asm["ttgir"])
        (dump / f"{safe}.sass").write_text("\n".join(f"{a:#06x} {i}" for a, i in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="CASE:MxNxK[:key=value,...]")
    parser.add_argument("--dump", type=Path, default=None)
    args = parser.parse_args()
    import triton

    if triton.knobs.runtime.interpret:
        sys.exit("unset TRITON_INTERPRET")
    from tests.kernels.test_compile_for_hopper import CompileRecorder, force_programmatic_launch

    force_programmatic_launch()
    cases = _cases()
    recorder = CompileRecorder()
    run = triton.runtime.JITFunction.run
    triton.runtime.JITFunction.run = lambda kernel, *a, **kw: recorder.run(kernel, *a, **kw)
    try:
        for spec in args.cases:
            case, shape, *rest = spec.split(":")
            m, n, k = (int(v) for v in shape.split("x"))
            options = {}
            for item in rest[0].split(",") if rest else []:
                key, value = item.split("=")
                options[key] = int(value) if value.lstrip("-").isdigit() else value == "True"
            with recorder.scenario_named(spec):
                cases[case](m, n, k, **options)
    finally:
        triton.runtime.JITFunction.run = run
    for error in recorder.scenario_errors:
        print(error["error"])
    for variant, (source, options) in zip(
        recorder.variants.values(), recorder.sources, strict=True
    ):
        name = f"{variant['kernel']} [{'; '.join(variant['scenarios'])}]"
        report(name, source, options, recorder.target, args.dump)


if __name__ == "__main__":
    main()
