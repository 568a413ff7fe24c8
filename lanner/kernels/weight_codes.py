"""Exact widening of quantized weight codes in registers, for the kernels that stream 8-bit
and 4-bit weights: fp8 e4m3 and int8 bytes, and the 4-bit codes of lanner's int4 plane
layout (kernels/quant_reference.py), to the activation dtype; and the rounding of scaled
activations to the fp8 / int8 grid (round_to_8bit) that per-token quantization shares.

Why not ``codes.to(tl.bfloat16)``: on sm_90 Triton turns e4m3 -> bf16 into a conversion to
fp16 (two codes an instruction) and one F2F per code to bf16, a quarter-rate instruction
whose 16 results a clock per SM are exactly what an fp8 GEMV must widen at copy
bandwidth; int8 -> float takes I2F, the same rate. Here each 32-bit register of codes
becomes its 16-bit floats through inline PTX, all exact, every instruction full rate:

- e4m3 -> bf16, per pair of codes: the hardware's e4m3x2 -> f16x2 (exact), then the f16
  bits moved into bf16's fields by two integer ops (every e4m3 value is a normal f16, so
  the moved bits are a normal bf16 equal to the value times 2^-112) and one bf16x2
  multiply by 2^112 (exact: a power of two, no subnormals anywhere); 2.5 instructions a
  code. To fp16 the hardware conversion alone (Triton's own cast).
- int8 -> bf16, per pair: one byte permute puts the two bytes in the low halves of the
  lanes; ``0x4300 | (b & 0x7F)`` is the bf16 128 + (b & 127) and ``0x4300 | (b & 0x80)``
  is 128 or 256, and their difference is the signed byte (two LOP3 and a bf16x2
  subtract). To fp16: ``0x6400 | (b ^ 0x80)`` is 1024 + b + 128, minus 1152.
- int4 plane s of int16 words, per pair of words: ``(w >> 4 s) & 0xF | 0x4300`` is the
  bf16 128 + q (fp16: 0x6400, 1024 + q), one shift and one LOP3 for both codes of the pair,
  then a bf16x2 subtract of the zero point's (128 + zero) gives q - zero exactly (and the
  scaled variant multiplies by the group scale, rounding once, as dequantizing in the
  model dtype does).

fp32 targets (tests, references) and Triton's CPU interpreter, which runs no PTX, take
plain conversions of the same values: e4m3 by Triton's cast, int8 by the float bit pattern
0x4B000000 | (b ^ 0x80) (2^23 + b + 128, no I2F), int4 by shift and mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lanner.kernels.rms_norm import cast_rounded

_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + it - it rounds half to even

# Two e4m3 codes -> bf16x2 per 16-bit half of $2 (four codes), into $0 (codes 0, 1) and $1.
_E4M3_TO_BF16 = tl.constexpr(
    "{\n"
    ".reg .b16 lo, hi;\n"
    ".reg .b32 h0, h1, m0, m1, c, z;\n"
    "mov.b32 {lo, hi}, $2;\n"
    "cvt.rn.f16x2.e4m3x2 h0, lo;\n"
    "cvt.rn.f16x2.e4m3x2 h1, hi;\n"
    "and.b32 m0, h0, 0x7fff7fff;\n"
    "and.b32 m1, h1, 0x7fff7fff;\n"
    "shr.b32 m0, m0, 3;\n"
    "shr.b32 m1, m1, 3;\n"
    # magnitude | (f16 & sign): a | (b & c)
    "lop3.b32 m0, m0, h0, 0x80008000, 0xf8;\n"
    "lop3.b32 m1, m1, h1, 0x80008000, 0xf8;\n"
    # times 2^112 (bf16 0x7780), plus -0: bf16x2 multiplies are fma on sm_80
    "mov.b32 c, 0x77807780;\n"
    "mov.b32 z, 0x80008000;\n"
    "fma.rn.bf16x2 $0, m0, c, z;\n"
    "fma.rn.bf16x2 $1, m1, c, z;\n"
    "}"
)
# Four int8 codes in $2 -> bf16x2 into $0 (codes 0, 1) and $1 (codes 2, 3).
_INT8_TO_BF16 = tl.constexpr(
    "{\n"
    ".reg .b32 z, t0, t1, a0, a1, b0, b1, m;\n"
    "mov.b32 z, 0;\n"
    "prmt.b32 t0, $2, z, 0x4140;\n"  # bytes 0, 1 into the low halves of the two lanes
    "prmt.b32 t1, $2, z, 0x4342;\n"
    # (t & mask) | 0x4300 per lane: (a & b) | c
    "lop3.b32 a0, t0, 0x007f007f, 0x43004300, 0xea;\n"
    "lop3.b32 a1, t1, 0x007f007f, 0x43004300, 0xea;\n"
    "lop3.b32 b0, t0, 0x00800080, 0x43004300, 0xea;\n"
    "lop3.b32 b1, t1, 0x00800080, 0x43004300, 0xea;\n"
    # a - b as fma(b, -1, a)
    "mov.b32 m, 0xbf80bf80;\n"
    "fma.rn.bf16x2 $0, b0, m, a0;\n"
    "fma.rn.bf16x2 $1, b1, m, a1;\n"
    "}"
)
# The same to fp16: (t ^ 0x0080) | 0x6400 = 1024 + (b ^ 0x80) per lane, minus 1152.
_INT8_TO_FP16 = tl.constexpr(
    "{\n"
    ".reg .b32 z, t0, t1, c;\n"
    "mov.b32 z, 0;\n"
    "prmt.b32 t0, $2, z, 0x4140;\n"
    "prmt.b32 t1, $2, z, 0x4342;\n"
    # (a ^ b) | c
    "lop3.b32 t0, t0, 0x00800080, 0x64006400, 0xbe;\n"
    "lop3.b32 t1, t1, 0x00800080, 0x64006400, 0xbe;\n"
    "mov.b32 c, 0x64806480;\n"  # fp16 1152, twice
    "sub.rn.f16x2 $0, t0, c;\n"
    "sub.rn.f16x2 $1, t1, c;\n"
    "}"
)


@triton.jit
def widen_8bit(w, IS_FP8: tl.constexpr, dtype: tl.constexpr):
    """8-bit weight codes ``w`` (their bytes, a uint8 tile; fp8 e4m3 if IS_FP8, else int8)
    as the values they encode in ``dtype`` (bf16, fp16 or fp32), exactly. The PTX paths take
    four consecutive codes a thread along the last dimension, as the tensor-core operand
    layouts give them. (Bytes rather than fp8 tiles: the interpreter cannot make the fp8
    zero that a masked load fills in.)"""
    if _INTERPRETED or dtype == tl.float32:
        if IS_FP8:
            values = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            # 2^23 + (b ^ 0x80) is 2^23 + 128 + b exactly, with no int-to-float convert.
            bits = (w.to(tl.int32) ^ 0x80) | 0x4B000000
            values = bits.to(tl.float32, bitcast=True) - 8388736.0
        widened = values.to(dtype)
    elif IS_FP8 and dtype == tl.float16:
        widened = w.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif IS_FP8:
        widened = tl.inline_asm_elementwise(
            _E4M3_TO_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4
        )
    elif dtype == tl.bfloat16:
        widened = tl.inline_asm_elementwise(
            _INT8_TO_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4
        )
    else:
        widened = tl.inline_asm_elementwise(
            _INT8_TO_FP16, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4
        )
    return widened


# int4 plane S of two int16 words in $1 -> (offset + q) - $2 per lane (bf16: offset 128,
# fp16: 1024; $2 holds offset + zero twice), then for the scaled variants times the scales
# in $3. Indexed by S: the shift that brings the plane to bits 0..3 of each lane.
def _plane_asm(offset_bits: str, kind: str, scaled: bool) -> tuple[str, ...]:
    variants = []
    for shift in (0, 4, 8, 12):
        lines = [".reg .b32 t, m, z;", f"shr.b32 t, $1, {shift};" if shift else "mov.b32 t, $1;"]
        lines.append(f"lop3.b32 t, t, 0x000f000f, {offset_bits}, 0xea;")  # (a & b) | c
        # t - $2 as fma($2, -1, t), then (scaled) t * $3 as fma(t, $3, -0): bf16x2
        # subtract and multiply are fma on sm_80.
        minus_one = "0xbf80bf80" if kind == "bf16x2" else "0xbc00bc00"
        lines += [f"mov.b32 m, {minus_one};", "mov.b32 z, 0x80008000;"]
        if scaled:
            lines += [f"fma.rn.{kind} t, $2, m, t;", f"fma.rn.{kind} $0, t, $3, z;"]
        else:
            lines.append(f"fma.rn.{kind} $0, $2, m, t;")
        variants.append("{\n" + "\n".join(lines) + "\n}")
    return tuple(variants)


_PLANE_BF16 = tl.constexpr(_plane_asm("0x43004300", "bf16x2", scaled=False))
_PLANE_FP16 = tl.constexpr(_plane_asm("0x64006400", "f16x2", scaled=False))
_PLANE_SCALED_BF16 = tl.constexpr(_plane_asm("0x43004300", "bf16x2", scaled=True))
_PLANE_SCALED_FP16 = tl.constexpr(_plane_asm("0x64006400", "f16x2", scaled=True))


@triton.jit
def int4_zero_offset(zero, dtype: tl.constexpr):
    """The operand int4_plane subtracts for a zero point ``zero`` (codes, any numeric
    dtype): offset + zero in ``dtype`` (bf16 128, fp16 1024; fp32 the zero itself)."""
    if _INTERPRETED or dtype == tl.float32:
        offset = zero.to(tl.float32)
    elif dtype == tl.bfloat16:
        offset = zero.to(tl.float32) + 128.0
    else:
        offset = zero.to(tl.float32) + 1024.0
    return offset.to(dtype)


@triton.jit
def int4_plane(words, zero_offset, S: tl.constexpr, dtype: tl.constexpr):
    """Codes q of nibble plane S (bits 4 S .. 4 S + 3) of int16 ``words`` minus their zero
    points, q - zero, exactly in ``dtype``; ``zero_offset`` (broadcast to words' shape)
    comes from int4_zero_offset. Two consecutive words a thread along the last dimension
    for the PTX paths."""
    if _INTERPRETED or dtype == tl.float32:
        codes = (words.to(tl.uint16, bitcast=True) >> (4 * S)) & 0xF
        values = codes.to(tl.float32) - zero_offset.to(tl.float32)
        widened = values.to(dtype)
    elif dtype == tl.bfloat16:
        widened = tl.inline_asm_elementwise(
            _PLANE_BF16[S], "=r,r,r", [words, zero_offset], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        widened = tl.inline_asm_elementwise(
            _PLANE_FP16[S], "=r,r,r", [words, zero_offset], dtype=tl.float16, is_pure=True, pack=2
        )
    return widened


@triton.jit
def int4_plane_scaled(words, zero_offset, scale, S: tl.constexpr, dtype: tl.constexpr):
    """(q - zero) * scale of plane S in ``dtype``, rounded once (the dequantized weight in
    the model dtype); ``scale`` in ``dtype``, broadcast to words' shape."""
    if _INTERPRETED or dtype == tl.float32:
        values = int4_plane(words, zero_offset, S, tl.float32) * scale.to(tl.float32)
        scaled = cast_rounded(values, dtype)
    elif dtype == tl.bfloat16:
        scaled = tl.inline_asm_elementwise(
            _PLANE_SCALED_BF16[S],
            "=r,r,r,r",
            [words, zero_offset, scale],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=2,
        )
    else:
        scaled = tl.inline_asm_elementwise(
            _PLANE_SCALED_FP16[S],
            "=r,r,r,r",
            [words, zero_offset, scale],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )
    return scaled


@triton.jit
def round_to_e4m3(value):
    """value (fp32, |value| <= 448) rounded to the nearest e4m3 number, ties to even, by
    arithmetic. Only the interpreter needs it: its float-to-fp8 cast drops the carry when
    rounding up crosses a power of two (124.3 becomes 64); the GPU's cvt is exact."""
    bits = value.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals step as 2^-6
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return ((value / step + ROUND_MAGIC) - ROUND_MAGIC) * step


@triton.jit
def round_to_8bit(scaled, IS_FP8: tl.constexpr):
    """fp32 activations already divided by their row's scale -> the value of their fp8 e4m3
    code (round to nearest even, saturating at +-448) or int8 code (round half to even,
    clamped to [-128, 127]), as fp32: the rounding of quant_reference.quantize_rows,
    exact in bf16 and fp16 too."""
    if IS_FP8:
        clamped = tl.minimum(tl.maximum(scaled, -448.0), 448.0)
        if _INTERPRETED:
            rounded = round_to_e4m3(clamped)
        else:
            rounded = clamped.to(tl.float8e4nv).to(tl.float32)
    else:
        rounded = (scaled + ROUND_MAGIC) - ROUND_MAGIC
        rounded = tl.minimum(tl.maximum(rounded, -128.0), 127.0)
    return rounded
