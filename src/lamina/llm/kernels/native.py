"""Lamina's native CPU kernels (csrc/lamina_cpu.c): block-quantised matmuls and a fused Llama decode step.

Why native code: at batch 1 a 135M-parameter decoder spends more time dispatching ~600 small PyTorch ops
per token than reading its quantised weights, and PyTorch's int8/int4 CPU kernels are themselves slower
than the float ones on AVX2 machines. The C file does what llama.cpp does: weights in blocks of 32 with an
fp16 scale (Q4 with an offset, Q8 symmetric), activations quantised to int8 per block, integer dot products
(AVX-512 VNNI, AVX-512, AVX-VNNI or AVX2, whichever the build targets: `isa()`), and one call per decode step
that runs every layer. The kernels read the blocks in tiles of 16 output rows (`tile_blocks`), so one vector
instruction meets 16 rows at once; `pack_q4`, `pack_q8`, `unpack` and the GGUF files speak the plain
row-major blocks.

Threads: each call runs on torch.get_num_threads() threads, passed explicitly: the calling thread and the
workers of a team the library keeps (not OpenMP's: libgomp throttles its barriers to sleeping once the
process holds more OpenMP threads than cores, which the engine's worker thread beside PyTorch's main-thread
pool already does on 2 cores; the C file's "thread team" says more).

The library is compiled on first use with the system C compiler (`-O3 -march=native -pthread`, about a
second, no Python or PyTorch headers) into LAMINA_HOME/cache/native, keyed by the source, the compiler and
the CPU (or copied from the user's ~/.cache/lamina/native where an earlier home built it), and loaded with
ctypes (which releases the GIL while it runs). Where there is no compiler, or the CPU lacks AVX2/FMA/F16C,
`library()` returns None and quantisation uses PyTorch's kernels.

What to build with (on or off, the `-march`, the compiler) is a `NativeOptions` the caller passes; this
module reads no environment. `NativeOptions.from_settings` makes one from LAMINA_NATIVE,
LAMINA_NATIVE_MARCH and LAMINA_CC/CC, for the composition root.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lamina.errors import LaminaError
from lamina.infra.device import cpu_features
from lamina.settings import Settings

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lamina_cpu.c"
QK = 32
Q4, Q8 = 4, 8
BF16, F32 = 16, 32  # float weights (the fused step reads float32/bfloat16 `nn.Linear`s as they are)
BLOCK_BYTES = {Q4: 20, Q8: 34}
TILE = 16  # output rows per tile (NR in csrc/lamina_cpu.c)
REQUIRED_FEATURES = ("avx2", "fma", "f16c")
DEFAULT_CC = "cc"

# Return codes of the C entry points (`LAM_OK ...` in csrc/lamina_cpu.c).
LAM_OK, LAM_ERR_RANGE, LAM_ERR_NOMEM, LAM_ERR_CONFIG = 0, 1, 2, 3


@dataclass(frozen=True)
class NativeOptions:
    """How to build the native kernels: whether to use them at all, the `-march`, the C compiler."""

    enabled: bool = True
    """False: never build or load them (PyTorch's forward and kernels serve instead)."""
    march: str = "native"
    """The target the C compiler builds for, e.g. "haswell" for the AVX2 path on a VNNI CPU."""
    cc: str = DEFAULT_CC
    """The C compiler: the default "cc" means cc or else gcc on PATH; any other value is used as given."""

    @classmethod
    def from_settings(cls, settings: Settings) -> NativeOptions:
        """The options LAMINA_NATIVE, LAMINA_NATIVE_MARCH and LAMINA_CC (or CC) ask for."""
        return cls(enabled=settings.native, march=settings.native_march, cc=settings.cc)


DEFAULT_OPTIONS = NativeOptions()


class DecodeConfig(ctypes.Structure):
    """The fused decode step's shapes and options: `LamDecodeConfig` in csrc/lamina_cpu.c, field for field.

    The C side refuses a call whose `size` or `version` differ from its own (and `library()` compares the
    two layouts when it loads the library), so a field added on one side only fails loudly.
    """

    VERSION = 3  # LAM_DECODE_CONFIG_VERSION
    _fields_ = [(name, ctypes.c_int64) for name in (
        "size", "version", "n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "vocab",
        "rows", "slots", "capacity", "kv_bf16", "window", "head_fmt", "threads", "n_logits",
        "n_adapters", "max_rank", "lora", "row_adapter",
    )] + [("eps", ctypes.c_float)]

    def __init__(self, **fields: int | float) -> None:
        super().__init__(size=ctypes.sizeof(DecodeConfig), version=DecodeConfig.VERSION, **fields)


_lock = threading.Lock()
_loaded: dict[tuple[str, NativeOptions], ctypes.CDLL | None] = {}


def library(cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> ctypes.CDLL | None:
    """The compiled kernels, building them once per machine; None (with the reason logged) if impossible."""
    with _lock:
        key = (str(cache_dir), options)
        if key not in _loaded:
            _loaded[key] = _build_and_load(cache_dir, options)
        return _loaded[key]


def library_path(cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> str | None:
    """Where the compiled kernels were loaded from (building them first if needed); None if they cannot be."""
    lib = library(cache_dir, options)
    return None if lib is None else lib._name


@functools.cache
def source_key() -> str:
    """A short digest of the kernels' source: measurements of one version are not reused for another."""
    return "kernels " + hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def isa(cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> str | None:
    """The integer-dot path the built kernels run ("avx512-vnni", "avx512", "avx2-vnni", "avx2"), or None."""
    lib = library(cache_dir, options)
    return None if lib is None else lib.lam_isa().decode()


def unavailable_reason(options: NativeOptions = DEFAULT_OPTIONS) -> str | None:
    """Why the native kernels cannot run here, or None."""
    if not options.enabled:
        return "disabled by LAMINA_NATIVE=0"
    missing = [f for f in REQUIRED_FEATURES if f not in cpu_features()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler(options) is None:
        return "no C compiler (cc/gcc) on PATH"
    return None


def _compiler(options: NativeOptions) -> str | None:
    if options.cc and options.cc != DEFAULT_CC:  # named by the caller: used as given, as make does with CC
        return options.cc
    return shutil.which("cc") or shutil.which("gcc")


def raise_for_status(status: int, what: str) -> None:
    """Raise for a C entry point's non-zero return code (LAM_ERR_RANGE is left to the caller, who knows the rows)."""
    if status == LAM_ERR_NOMEM:
        raise MemoryError(f"{what}: the native kernels could not allocate their scratch memory; "
                          "free memory or serve fewer rows at once (a smaller batch or prefill chunk)")
    if status == LAM_ERR_CONFIG:
        raise LaminaError(f"{what}: the native kernels refused the call's configuration (a layout the compiled "
                          f"{SOURCE.name} does not expect); rebuild by deleting LAMINA_HOME/cache/native and "
                          f"{shared_builds()}")
    if status != LAM_OK:
        raise LaminaError(f"{what}: the native kernels returned the unknown status {status}")


def _build_and_load(cache_dir: Path | None, options: NativeOptions) -> ctypes.CDLL | None:
    reason = unavailable_reason(options)
    if reason:
        logger.info("native kernels unavailable: %s", reason)
        return None
    cc = _compiler(options)
    assert cc is not None
    flags = ["-O3", f"-march={options.march}", "-pthread", "-shared", "-fPIC", "-std=gnu11"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("native kernels unavailable: %s --version failed: %s", cc, e)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags, version, *cpu_features()]).encode()).hexdigest()[:16]
    folder = (cache_dir or Path(tempfile.gettempdir()) / "lamina-cache") / "native"
    path = folder / f"lamina_cpu-{digest}.so"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not _copy_atomically(shared_builds() / path.name, path, trusted_source=True):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
        os.close(fd)
        cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            Path(tmp).unlink(missing_ok=True)
            logger.warning("native kernels unavailable: compiling failed: %s", e)
            return None
        if done.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            logger.warning("native kernels unavailable: %s failed:\n%s", " ".join(cmd), done.stderr[-2000:])
            return None
        os.replace(tmp, path)  # atomic: a concurrent process sees the old state or a whole library
        shared = shared_builds()
        with contextlib.suppress(OSError):
            shared.mkdir(parents=True, exist_ok=True, mode=0o700)
        _copy_atomically(path, shared / path.name)
    return _bind(path)


def shared_builds() -> Path:
    """Where built libraries are kept for every cache of this user, so that a new LAMINA_HOME (or LAMINA_CACHE)
    copies the build instead of compiling again (3.3 s on a 2-core AMD EPYC): the user's cache folder, as pip
    and torch.utils.cpp_extension keep theirs (XDG_CACHE_HOME, else ~/.cache), under lamina/native. A build's
    name is the digest of its source, compiler, flags and CPU, so a copy is the build that would be made."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lamina" / "native"


def _copy_atomically(source: Path, target: Path, trusted_source: bool = False) -> bool:
    """Copy `source` to `target` through a temporary file and a rename; False (and no file left) if it cannot be.

    `trusted_source`: the source's folder must be this user's and writable by no one else (a library is loaded
    into the process: one another user could have written is never taken)."""
    try:
        if trusted_source:
            st = source.parent.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022 or not source.is_file():
                return False
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
    except OSError:
        return False
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


def _bind(path: Path) -> ctypes.CDLL:
    """Load the library at `path` and declare its entry points."""
    lib = ctypes.CDLL(str(path))
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.lam_matmul.argtypes = [i32, vp, i32, i32, vp, i32, vp, i32]
    lib.lam_matmul.restype = i32
    lib.lam_dequant.argtypes = [i32, vp, i32, i32, vp, i32, i32]
    lib.lam_dequant.restype = None
    lib.lam_isa.argtypes = []
    lib.lam_isa.restype = ctypes.c_char_p
    lib.lam_decode_config_size.argtypes = lib.lam_decode_config_version.argtypes = []
    lib.lam_decode_config_size.restype = lib.lam_decode_config_version.restype = i64
    lib.lam_llama_decode.argtypes = [ctypes.POINTER(DecodeConfig)] + [vp] * 11
    lib.lam_llama_decode.restype = i32
    lib.lam_has_prompt_attention.argtypes = []
    lib.lam_has_prompt_attention.restype = i32
    lib.lam_prompt_attention.argtypes = [vp, i64, i64, i32, vp, vp, i64, i64, i32, vp, i32, i32, i32, i32, i32, i32, ctypes.c_float, i32]
    lib.lam_prompt_attention.restype = i32
    layout = (lib.lam_decode_config_size(), lib.lam_decode_config_version())
    if layout != (ctypes.sizeof(DecodeConfig), DecodeConfig.VERSION):
        raise LaminaError(f"{path.name} lays out its decode config as {layout} (bytes, version) but "
                          f"native.DecodeConfig as {(ctypes.sizeof(DecodeConfig), DecodeConfig.VERSION)}: "
                          "change LamDecodeConfig in csrc/lamina_cpu.c and DecodeConfig together")
    return lib


# --- block formats -----------------------------------------------------------------------------------------


def pack_q4(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) float -> (N, K/32 * 20) uint8 blocks {fp16 d, fp16 m, 16 bytes of nibbles}: w ≈ d * q + m, q in 0..15."""
    w = _groups(weight)
    low, high = w.amin(-1), w.amax(-1)
    d = ((high - low) / 15.0).half()
    m = low.half()
    dd = d.float()[..., None]
    q = torch.where(dd > 0, torch.round((w - m.float()[..., None]) / dd.clamp(min=1e-30)), torch.zeros_like(w))
    q = q.clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    blocks = torch.cat([_bytes(d), _bytes(m), nibbles], dim=-1)  # (N, nb, 20)
    return blocks.reshape(weight.shape[0], -1).contiguous()


def pack_q8(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) float -> (N, K/32 * 34) uint8 blocks {fp16 d, 32 int8}: w ≈ d * q, q in -127..127."""
    w = _groups(weight)
    d = (w.abs().amax(-1) / 127.0).half()
    dd = d.float()[..., None]
    q = torch.where(dd > 0, torch.round(w / dd.clamp(min=1e-30)), torch.zeros_like(w)).clamp(-127, 127).to(torch.int8)
    blocks = torch.cat([_bytes(d), q.view(torch.uint8)], dim=-1)  # (N, nb, 34)
    return blocks.reshape(weight.shape[0], -1).contiguous()


def unpack(blocks: torch.Tensor, fmt: int, in_features: int) -> torch.Tensor:
    """The float32 (N, K) weight the blocks stand for."""
    n, nb = blocks.shape[0], in_features // QK
    b = blocks.reshape(n, nb, BLOCK_BYTES[fmt])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (N, nb, 1)
    if fmt == Q4:
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        qs = b[..., 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        return (q * d + m).reshape(n, in_features)
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(n, in_features)


def _groups(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()
    n, k = w.shape
    if k % QK:
        raise ValueError(f"block quantisation needs input sizes divisible by {QK} (got {k})")
    return w.reshape(n, k // QK, QK)


def _bytes(half: torch.Tensor) -> torch.Tensor:
    return half.contiguous().view(torch.uint8).reshape(*half.shape, 2)


def tile_blocks(blocks: torch.Tensor, fmt: int, in_features: int) -> torch.Tensor:
    """Row-major blocks (N, K/32 * bytes) -> the kernels' tiles (ceil(N/16), K/32 * 16 * bytes).

    Per tile and block column: the 16 rows' fp16 d, for Q4 their fp16 m, then the quants in 64-byte chunks of
    4 bytes per row (csrc/lamina_cpu.c describes it). The last tile is padded with zero rows.
    """
    n, nb, bb = blocks.shape[0], in_features // QK, BLOCK_BYTES[fmt]
    if tuple(blocks.shape) != (n, nb * bb):
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} are not {n} rows of {nb} blocks of {bb} bytes")
    tiles = -(-n // TILE)
    padded = torch.zeros(tiles * TILE, nb, bb, dtype=torch.uint8)
    padded[:n] = blocks.reshape(n, nb, bb)
    b = padded.reshape(tiles, TILE, nb, bb).transpose(1, 2)  # (tiles, nb, 16 rows, bytes)
    head = 4 if fmt == Q4 else 2  # d (and m) per row
    scales = [b[..., i : i + 2].reshape(tiles, nb, TILE * 2) for i in range(0, head, 2)]
    quants = b[..., head:].reshape(tiles, nb, TILE, -1, 4).transpose(2, 3)  # (tiles, nb, chunks, 16 rows, 4)
    return torch.cat([*scales, quants.reshape(tiles, nb, -1)], dim=-1).reshape(tiles, nb * TILE * bb).contiguous()


def untile_blocks(tiles: torch.Tensor, fmt: int, in_features: int, out_features: int) -> torch.Tensor:
    """The row-major blocks (N, K/32 * bytes) that `tile_blocks` laid out as `tiles`."""
    nb, bb = in_features // QK, BLOCK_BYTES[fmt]
    t = tiles.shape[0]
    b = tiles.reshape(t, nb, TILE * bb)
    head = 4 if fmt == Q4 else 2
    scales = [b[..., TILE * i : TILE * (i + 2)].reshape(t, nb, TILE, 2) for i in range(0, head, 2)]
    quants = b[..., TILE * head :].reshape(t, nb, -1, TILE, 4).transpose(2, 3).reshape(t, nb, TILE, -1)
    rows = torch.cat([*scales, quants], dim=-1)  # (tiles, nb, 16 rows, bytes)
    return rows.transpose(1, 2).reshape(t * TILE, nb * bb)[:out_features].contiguous()


def matmul(lib: ctypes.CDLL, fmt: int, tiles: torch.Tensor, out_features: int, in_features: int, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 contiguous @ W^T -> (M, N) float32, W in tiles (`tile_blocks`)."""
    m, n = x.shape[0], out_features
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        status = lib.lam_matmul(fmt, tiles.data_ptr(), n, in_features, x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())
        raise_for_status(status, f"a ({m}, {in_features}) x ({n}, {in_features}) native matmul")
    return y


_scratch = threading.local()


def dequantize(lib: ctypes.CDLL, fmt: int, tiles: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype,
               scratch: bool = False) -> torch.Tensor:
    """The (N, K) weight in float32 or bfloat16, expanded by the native code (for long inputs' float GEMM).

    `scratch`: into this thread's buffer for that shape and dtype, which the next such call overwrites (for a
    weight used at once and dropped: a prompt chunk's layers then reuse a few warm buffers instead of faulting
    in fresh pages for every matrix, 0.33 ms a call at 8,000 tokens on a 2-core AMD EPYC), and on the calling
    thread alone: between PyTorch's operations the team's worker finds its core held by PyTorch's spinning
    threads, and two threads took longer than one (0.18 against 0.06 s of a 2,048-token prefill).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize to float32 or bfloat16, not {dtype}")
    if scratch:
        buffers = _scratch.__dict__.setdefault("buffers", {})
        w = buffers.get((out_features, in_features, dtype))
        if w is None:
            w = buffers[out_features, in_features, dtype] = torch.empty(out_features, in_features, dtype=dtype)
    else:
        w = torch.empty(out_features, in_features, dtype=dtype)
    lib.lam_dequant(fmt, tiles.data_ptr(), out_features, in_features, w.data_ptr(), int(dtype == torch.bfloat16), 1 if scratch else torch.get_num_threads())
    return w


def prompt_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal attention of a prompt chunk: q (1, nh, T, hd) float32 or bfloat16 at positions S - T .. S - 1 over
    k, v (1, nkv, S, hd) float32 or bfloat16 (any strides but the last dimension's) -> (1, T, nh * hd) in q's
    dtype, as `lamina.arch.llama.attend` with `causal_mask(T, S, window)` computes it. bfloat16 queries over a
    bfloat16 cache take bfloat16 dot products where the build has them (`lam_has_prompt_attention() == 2`):
    SDPA's arithmetic for bfloat16, P rounded to bfloat16 for P V; everything else is float32 arithmetic.
    """
    _, nh, T, hd = q.shape
    _, nkv, S, _ = k.shape
    floats = (torch.float32, torch.bfloat16)
    if q.dtype not in floats or k.dtype != v.dtype or k.dtype not in floats:
        raise ValueError(f"prompt attention takes float32 or bfloat16 queries, keys and values, not {q.dtype}/{k.dtype}/{v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride()[1:] != v.stride()[1:]:
        raise ValueError("prompt attention needs the head dimension contiguous and keys and values laid out alike")
    out = torch.empty(1, T, nh * hd, dtype=q.dtype)
    status = lib.lam_prompt_attention(
        q.data_ptr(), q.stride(1), q.stride(2), int(q.dtype == torch.bfloat16), k.data_ptr(), v.data_ptr(), k.stride(1),
        k.stride(2), int(k.dtype == torch.bfloat16), out.data_ptr(), T, S - T, nh, nkv, hd, window or 0, hd**-0.5,
        torch.get_num_threads())
    raise_for_status(status, f"attention of {T} queries over {S} keys ({nh}/{nkv} heads of {hd})")
    return out
