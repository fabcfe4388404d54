#!/usr/bin/env python3
"""Compiles the CUDA kernels of src/mlx/gpu_kernels.cc with NVRTC, put together the way
`assemble` in that file puts them together (the storage types, the kernel's helpers, an
`extern "C"` entry point taking the inputs, the outputs and the int scalars, the constants, the
body), for each compute dtype, for Ampere and Hopper, with the options the service compiles them
with (src/mlx/nvrtc.cc). Without this, those sources are compiled only when a model first runs on
an NVIDIA GPU.

    python3 scripts/check-cuda-kernels.py [NVRTC_DIR]

NVRTC_DIR holds the pinned NVIDIA wheels of scripts/requirements-nvrtc-check.txt (scripts/setup.sh
installs them into .tools/nvrtc, the default). Before the kernels, a copy of one with a name
that does not exist must fail to compile: a check that cannot fail proves nothing. Exits non-zero
when any kernel fails, printing NVRTC's log.
"""
import ctypes
import pathlib
import re
import struct
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src/mlx/gpu_kernels.cc"

def literal(v):
    """A float as the kernels' sources write it (gpu_kernels.cc: `literal`)."""
    return "__int_as_float((int)0x%08xu)" % struct.unpack("<I", struct.pack("<f", v))[0]


NORM_HEADERS = ["kHeader", "kGateAct", "kRowDots", "kStageRows"]


def kernels(t):
    """Every kernel for compute dtype `t` (its CUDA name): (name, header sources, body source,
    inputs, outputs, template arguments, placeholder replacements), with the values of
    Qwen3-Embedding-0.6B and EmbeddingGemma-300m where a size matters."""
    vec = 4 if t == "float" else 8
    key_cap = 40960 // (256 * (4 if t == "float" else 2))
    eps, scale = literal(1e-6), literal(0.0625)
    return [
        ("mlx_embed_qkv_heads", ["kHeader", "kHeadNormRope"], "kQkvHeads",
         [("qkv", t), ("qw", t), ("kw", t)], [("q", t), ("k", t), ("v", t)],
         [("T", t), ("H", 16), ("HKV", 8), ("D", 128), ("HALF", 64)],
         [("EPS", eps), ("LOG2BASE", literal(19.93)), ("SCALE", literal(1.0))]),
        ("mlx_embed_qk_rows", ["kHeader", "kHeadNormRope"], "kQkRows",
         [("qkv", t), ("qw", t), ("kw", t)], [("qk", t)],
         [("T", t), ("H", 16), ("HKV", 8), ("D", 128), ("HALF", 64)],
         [("EPS", eps), ("LOG2BASE", literal(19.93)), ("SCALE", literal(1.0))]),
        # Heads not a multiple of the four loaded together.
        ("mlx_embed_qk_rows", ["kHeader", "kHeadNormRope"], "kQkRows",
         [("qkv", t), ("qw", t), ("kw", t)], [("qk", t)],
         [("T", t), ("H", 3), ("HKV", 2), ("D", 64), ("HALF", 32)],
         [("EPS", eps), ("LOG2BASE", literal(13.29)), ("SCALE", literal(0.5))]),
        ("mlx_embed_gated", ["kHeader", "kGateAct"], "kGated", [("gu", t)], [("out", t)],
         [("T", t), ("I", 3072), ("V", vec), ("GELU", True)], []),
        # Widths not a multiple of 16 bytes take one feature per thread; SiLU.
        ("mlx_embed_gated", ["kHeader", "kGateAct"], "kGated", [("gu", t)], [("out", t)],
         [("T", t), ("I", 37), ("V", 1), ("GELU", False)], []),
        ("mlx_embed_gated_matmul", ["kHeader", "kGateAct", "kRowDots"], "kGatedMatmul",
         [("x", t), ("w", t)], [("out", t)],
         [("T", t), ("NMAX", 16), ("K", 1024), ("I", 3072), ("V", vec), ("GELU", False)], []),
        # Rows not a multiple of 16 bytes take one feature per load.
        ("mlx_embed_gated_matmul", ["kHeader", "kGateAct", "kRowDots"], "kGatedMatmul",
         [("x", t), ("w", t)], [("out", t)],
         [("T", t), ("NMAX", 16), ("K", 37), ("I", 40), ("V", 1), ("GELU", True)], []),
        ("mlx_embed_residual_norm", ["kHeader"], "kResidualNorm",
         [("x", "float"), ("y", t), ("w", "float")], [("xo", "float"), ("h", t)],
         [("T", t), ("U", t), ("E", 1024), ("POST", False)],
         [("POST_EPS", eps), ("EPS", eps), ("POST_W", "w")]),
        ("mlx_embed_residual_post_norm", ["kHeader"], "kResidualNorm",
         [("x", "float"), ("y", t), ("w", "float"), ("pw", t)], [("xo", "float"), ("h", t)],
         [("T", t), ("U", t), ("E", 768), ("POST", True)],
         [("POST_EPS", eps), ("EPS", eps), ("POST_W", "pw")]),
        # The norm of the stream alone (the first layer), then q/k/v rows (Qwen3).
        ("mlx_embed_norm_matmul", NORM_HEADERS, "kNormMatmul",
         [("x", "float"), ("nw", "float"), ("w", t)], [("out", t)],
         [("T", t), ("NMAX", 16 if t != "float" else 12), ("E", 1024), ("O", 4096), ("V", vec),
          ("ADD", False), ("POST", False), ("GATE", False), ("GELU", False)],
         [("STAGE", "x, (const T*)nullptr, (const T*)nullptr, nw, (float*)nullptr"),
          ("POST_EPS", eps), ("EPS", eps)]),
        # A block's output added, normed first (Gemma), then gate/up rows and GELU.
        ("mlx_embed_residual_norm_matmul", NORM_HEADERS, "kNormMatmul",
         [("x", "float"), ("y", t), ("pw", t), ("nw", "float"), ("w", t)], [("xo", "float"), ("out", t)],
         [("T", t), ("NMAX", 16), ("E", 768), ("O", 1152), ("V", vec),
          ("ADD", True), ("POST", True), ("GATE", True), ("GELU", True)],
         [("STAGE", "x, y, pw, nw, xo"), ("POST_EPS", eps), ("EPS", eps)]),
        # Rows not a multiple of 16 bytes, an odd number of outputs, no post-norm.
        ("mlx_embed_residual_norm_matmul", NORM_HEADERS, "kNormMatmul",
         [("x", "float"), ("y", t), ("nw", "float"), ("w", t)], [("xo", "float"), ("out", t)],
         [("T", t), ("NMAX", 16), ("E", 37), ("O", 41), ("V", 1),
          ("ADD", True), ("POST", False), ("GATE", False), ("GELU", False)],
         [("STAGE", "x, y, (const T*)nullptr, nw, xo"), ("POST_EPS", eps), ("EPS", eps)]),
        ("mlx_embed_attention", ["kHeader", "kAttendRow"], "kAttention",
         [("q", t), ("k", t), ("v", t), ("mask", t)], [("out", t)],
         [("T", t), ("M", t), ("D", 128), ("H", 16), ("HKV", 8)], [("SCALE", scale)]),
        ("mlx_embed_qkv_attention", ["kHeader", "kHeadNormRope", "kAttendRow"], "kQkvAttention",
         [("qkv", t), ("qw", t), ("kw", t), ("mask", t)], [("out", t)],
         [("T", t), ("M", t), ("H", 3), ("HKV", 1), ("D", 256), ("HALF", 128), ("KCAP", key_cap),
          ("QROWS", 16)],
         [("ATTN_SCALE", scale), ("ROPE_SCALE", literal(1.0)), ("EPS", eps),
          ("LOG2BASE", literal(13.29))]),
    ]


# The int scalars each kernel takes after its outputs (the per-batch sizes).
SCALARS = {
    "mlx_embed_qkv_heads": ["B", "L"], "mlx_embed_qk_rows": ["B", "L"], "mlx_embed_gated": ["N"], "mlx_embed_gated_matmul": ["n"],
    "mlx_embed_residual_norm": [], "mlx_embed_residual_post_norm": [], "mlx_embed_norm_matmul": ["n"],
    "mlx_embed_residual_norm_matmul": ["n"], "mlx_embed_attention": ["B", "L"], "mlx_embed_qkv_attention": ["L"],
}


def assemble(raw, name, headers, body, inputs, outputs, targs, replacements):
    """The source the service compiles (gpu_kernels.cc: `assemble`)."""
    body = raw[body]
    for placeholder, value in replacements:
        body = body.replace(placeholder, value)
    params = ["const %s* %s" % (t, n) for n, t in inputs]
    params += ["%s* %s" % (t, n) for n, t in outputs]
    params += ["int %s" % n for n in SCALARS[name]]
    consts = []
    for n, v in targs:
        if isinstance(v, bool):
            consts.append("  constexpr bool %s = %s;\n" % (n, "true" if v else "false"))
        elif isinstance(v, int):
            consts.append("  constexpr int %s = %d;\n" % (n, v))
        else:
            consts.append("  using %s = %s;\n" % (n, v))
    return (raw["kTypes"] + "".join(raw[h] for h in headers)
            + '\nextern "C" __global__ void %s(%s) {\n' % (name, ", ".join(params))
            + "".join(consts) + body + "}\n")


class Nvrtc:
    def __init__(self, root):
        libs = sorted(root.glob("nvidia/cu*/lib/libnvrtc.so.*"))
        if not libs:
            sys.exit(f"check-cuda-kernels: no NVRTC under {root} (scripts/setup.sh installs it)")
        # NVRTC opens its builtins by name: loaded first, they are found.
        for builtins in sorted(root.glob("nvidia/cu*/lib/libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(libs[-1]))

    def compile(self, label, source, arch):
        """NVRTC's log, and whether it compiled."""
        prog = ctypes.c_void_p()
        if self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) != 0:
            sys.exit("check-cuda-kernels: nvrtcCreateProgram failed")
        # The service's options (src/mlx/nvrtc.cc): the device's architecture ("a" on Hopper and
        # later), C++17; no headers.
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        result = self.lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        self.lib.nvrtcGetProgramLog(prog, log)
        self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return log.value.decode(errors="replace"), result == 0


def main():
    nvrtc = Nvrtc(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".tools/nvrtc")
    text = SOURCE.read_text()
    raw = dict(re.findall(r'constexpr const char\* (k\w+) = R"\((.*?)\)";', text, re.S))
    listed = {"kTypes"} | {part for k in kernels("float") for part in k[1] + [k[2]]}
    unchecked = sorted(set(raw) - listed)
    if unchecked:
        sys.exit(f"check-cuda-kernels: {', '.join(unchecked)} in {SOURCE.name} not checked: add them to kernels()")

    # The check itself: a kernel using a name that does not exist must be refused.
    name, headers, body, *rest = kernels("float")[0]
    broken = dict(raw, **{body: raw[body] + "\n  undefined_name_for_the_check = 0;"})
    log, ok = nvrtc.compile("broken", assemble(broken, name, headers, body, *rest), "sm_90a")
    if ok or "undefined_name_for_the_check" not in log:
        sys.exit(f"check-cuda-kernels: a broken kernel compiled, the check proves nothing:\n{log}")

    failed = 0
    for t in ["bf16_t", "f16_t", "float"]:
        for kernel in kernels(t):
            source = assemble(raw, *kernel)
            for arch in ["sm_80", "sm_90a"]:
                log, ok = nvrtc.compile(kernel[0], source, arch)
                print(f"{kernel[0]} {t} {arch}: {'ok' if ok else 'FAILED'}")
                if not ok or "warning" in log:
                    print(log)
                failed += not ok
    if failed:
        sys.exit(f"check-cuda-kernels: {failed} kernel builds failed")


if __name__ == "__main__":
    main()
