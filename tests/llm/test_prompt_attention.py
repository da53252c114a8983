"""The native attention kernel for prompt chunks (AVX-512 builds): PyTorch's causal attention, chunk by chunk.

It is checked against `lamina.arch.llama.attend` with the same mask the model builds, over the shapes that
exercise its edges (grouped, multi- and single-kv-head, head sizes that are not a multiple of 16, a sliding
window, a bfloat16 cache, chunks shorter than a unit and longer than many), with float32 queries and with
bfloat16 ones (the bfloat16 dot products where the CPU has AVX-512-BF16, and the float32 arithmetic of a build
without them); then for what the engine relies on: a query's output does not depend on the chunk it came in or
on the thread count, and the model hands the kernel only what it computes (batch 1, no autograd).
"""

from __future__ import annotations

import pytest
import torch

from lamina.arch.kv_cache import SlotCache
from lamina.arch.llama import Llama, LlamaConfig, attend, causal_mask
from lamina.llm.kernels import native
from lamina.llm.kernels.native_decode import use_native_prompt_attention
from lamina.settings import Settings

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"native kernels: {native.unavailable_reason()}")


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    lib = native.library(tmp_path_factory.mktemp("native"))
    if not lib.lam_has_prompt_attention():
        pytest.skip(f"the {native.isa(None)} build has no prompt attention kernel (AVX-512 only); SDPA serves")
    return lib


def _qkv(nh: int, nkv: int, hd: int, T: int, start: int, dtype: torch.dtype = torch.float32, seed: int = 0):  # type: ignore[no-untyped-def]
    """q as the model makes it (a transposed view), k and v as a cache holds them (a view of a longer buffer)."""
    g = torch.Generator().manual_seed(seed)
    S = start + T
    q = torch.randn(1, T, nh, hd, generator=g).transpose(1, 2)
    k = (torch.randn(1, nkv, S + 9, hd, generator=g) * 2)[:, :, :S].to(dtype)
    v = torch.randn(1, nkv, S + 9, hd, generator=g)[:, :, :S].to(dtype)
    return q, k, v


def _reference(q, k, v, window):  # type: ignore[no-untyped-def]
    T, S = q.shape[2], k.shape[2]
    y = attend(q.double(), k.double(), v.double(), causal_mask(T, S, q.device, window))
    return y.transpose(1, 2).reshape(1, T, -1)


@pytest.mark.parametrize(
    ("nh", "nkv", "hd", "T", "start", "window", "dtype"),
    [
        (9, 3, 64, 200, 0, None, torch.float32),  # SmolLM2's heads, a prompt's first chunk
        (9, 3, 64, 130, 900, None, torch.bfloat16),  # a later chunk over a bfloat16 cache
        (4, 4, 32, 7, 0, None, torch.float32),  # multi-head, a chunk shorter than a unit
        (8, 1, 128, 70, 1000, None, torch.float32),  # single kv head, two 64-dim halves
        (6, 2, 48, 65, 5, 16, torch.float32),  # a head of 48 (a masked tail), a sliding window
        (9, 3, 64, 33, 2000, 100, torch.bfloat16),  # a window far behind the chunk
        (2, 1, 80, 1, 3, None, torch.float32),  # one query
    ],
)
def test_prompt_attention_equals_causal_attention(lib, nh, nkv, hd, T, start, window, dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _qkv(nh, nkv, hd, T, start, dtype)
    got = native.prompt_attention(lib, q, k, v, window)
    assert got.shape == (1, T, nh * hd) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(q, k.float(), v.float(), window), rtol=1e-5, atol=2e-6)


SHAPES_BF16 = [
    (9, 3, 64, 200, 0, None),  # SmolLM2's heads, a prompt's first chunk
    (9, 3, 64, 130, 900, None),  # a later chunk
    (4, 4, 32, 7, 0, None),  # a chunk shorter than a unit
    (8, 1, 128, 70, 1000, None),  # two 64-dim halves
    (6, 2, 48, 65, 5, 16),  # a masked tail of dimensions, a sliding window
    (3, 1, 37, 70, 11, None),  # an odd head size: a dimension pair and a key pair half empty
    (9, 3, 64, 33, 2000, 100),  # a window far behind the chunk
    (2, 1, 80, 1, 3, None),  # one query
]
# bfloat16 queries: the result is rounded to bfloat16 (2**-9 relative) and, on the dot path, so is P for P V
BF16_TOL = {"rtol": 1e-2, "atol": 1e-2}


def _bf16_builds(lib, tmp_path_factory):  # type: ignore[no-untyped-def]
    """(name, library) for each prompt-attention path this CPU can run: the dot products where it has AVX-512-BF16
    (this machine's build), and the float32 arithmetic of an AVX-512 build without them."""
    from lamina.infra.device import cpu_features

    builds = [("native", lib)]
    if lib.lam_has_prompt_attention() == 2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(cpu_features()):
        options = native.NativeOptions(march="icelake-server")
        other = native.library(tmp_path_factory.mktemp("icelake"), options)
        assert other is not None and other.lam_has_prompt_attention() == 1
        builds.append(("icelake-server", other))
    return builds


@pytest.fixture(scope="module")
def bf16_builds(lib, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _bf16_builds(lib, tmp_path_factory)


@pytest.mark.parametrize(("nh", "nkv", "hd", "T", "start", "window"), SHAPES_BF16)
def test_bfloat16_queries_equal_causal_attention_on_every_path(bf16_builds, nh, nkv, hd, T, start, window) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _qkv(nh, nkv, hd, T, start, torch.bfloat16)
    q = q.bfloat16()
    ref = _reference(q.float(), k.float(), v.float(), window)
    for name, build in bf16_builds:
        got = native.prompt_attention(build, q, k, v, window)
        assert got.shape == (1, T, nh * hd) and got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.double(), ref, **BF16_TOL, msg=lambda m, n=name: f"{n}: {m}")
        over_floats = native.prompt_attention(build, q, k.float(), v.float(), window)  # a float32 cache: float32 arithmetic
        torch.testing.assert_close(over_floats.double(), ref, **BF16_TOL, msg=lambda m, n=name: f"{n}, float32 cache: {m}")


def test_the_dot_path_is_as_close_as_sdpa_in_bfloat16(lib) -> None:  # type: ignore[no-untyped-def]
    """Not just within a tolerance: over 2,000 keys its error against exact attention is that of PyTorch's own
    bfloat16 attention (SDPA), within 1.5x in the mean."""
    q, k, v = _qkv(9, 3, 64, 300, 1700, torch.bfloat16)
    q = q.bfloat16()
    T, S = 300, 2000
    ref = _reference(q.float(), k.float(), v.float(), None)
    sdpa = attend(q, k, v, causal_mask(T, S, q.device)).transpose(1, 2).reshape(1, T, -1)
    got = native.prompt_attention(lib, q, k, v)
    ours, theirs = (got.double() - ref).abs().mean().item(), (sdpa.double() - ref).abs().mean().item()
    assert ours <= 1.5 * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_in_any_chunk_and_on_any_thread_count(lib, dtype) -> None:  # type: ignore[no-untyped-def]
    """What greedy decoding after a prefix-cache hit needs: the same prompt split at other places gives each
    query the same output, to the bit, whatever the thread count."""
    q, k, v = _qkv(9, 3, 64, 300, 0, dtype)
    q = q.to(dtype)
    whole = native.prompt_attention(lib, q, k, v)
    threads = torch.get_num_threads()
    try:
        for cut, n in ((64, 1), (100, 2), (299, 3)):
            torch.set_num_threads(n)
            first = native.prompt_attention(lib, q[:, :, :cut], k[:, :, :cut], v[:, :, :cut])
            rest = native.prompt_attention(lib, q[:, :, cut:], k, v)
            assert torch.equal(torch.cat([first, rest], 1), whole)
    finally:
        torch.set_num_threads(threads)


def test_bad_calls_are_refused(lib) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _qkv(4, 2, 32, 8, 0)
    with pytest.raises(ValueError, match="float32 or bfloat16 queries"):
        native.prompt_attention(lib, q.double(), k, v)
    with pytest.raises(ValueError, match="contiguous"):
        native.prompt_attention(lib, q, k.transpose(2, 3), v)
    with pytest.raises(native.LaminaError, match="refused"):  # 5 query heads cannot share 2 kv heads
        native.prompt_attention(lib, torch.randn(1, 5, 8, 32), k, v)


def _model() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256)
    return Llama(config).eval()


def _prefill(model: Llama, ids: list[int], chunk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    c = model.config
    slots = SlotCache(c.n_layers, c.n_kv_heads, c.head_dim, dtype=dtype, device="cpu")  # type: ignore[arg-type]
    slots.reserve(1, 256)
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([ids[s : s + chunk]]), slots.row(0)) for s in range(0, len(ids), chunk)], 1)


def test_the_model_runs_prompt_chunks_through_the_kernel_only_where_it_applies(lib, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _prefill(model, ids, 64)  # SDPA
    assert use_native_prompt_attention(model, tmp_path)
    calls = []
    kernel = model.layers[0].self_attn.prompt_attention
    for layer in model.layers:
        layer.self_attn.prompt_attention = lambda *a, _k=kernel: calls.append(1) or _k(*a)
    got = _prefill(model, ids, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3 * 2  # three chunks, two layers
    calls.clear()
    x = torch.tensor([ids[:40]])
    model(x).sum().backward()  # training: no cache, autograd on; never the kernel
    assert calls == []
    model.bfloat16()  # bfloat16 activations over a bfloat16 cache (the default for quantised weights): the kernel too
    hooked = [layer.self_attn.prompt_attention for layer in model.layers]
    for layer in model.layers:
        layer.self_attn.prompt_attention = None
    want = _prefill(model, ids, 64, torch.bfloat16)  # SDPA in bfloat16
    for layer, fn in zip(model.layers, hooked, strict=True):
        layer.self_attn.prompt_attention = fn
    got = _prefill(model, ids, 64, torch.bfloat16)
    assert len(calls) == 3 * 2 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_the_avx2_build_has_no_kernel_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lamina.infra.device import cpu_features

    if not {"avx2", "fma", "f16c"} <= set(cpu_features()):
        pytest.skip("this CPU cannot run the AVX2 build")
    monkeypatch.setenv("LAMINA_NATIVE_MARCH", "haswell")
    options = native.NativeOptions.from_settings(Settings())
    avx2 = native.library(tmp_path, options)
    assert avx2 is not None and not avx2.lam_has_prompt_attention()
    q, k, v = _qkv(4, 2, 32, 8, 0)
    with pytest.raises(native.LaminaError, match="refused"):
        native.prompt_attention(avx2, q, k, v)
    model = _model()
    assert not use_native_prompt_attention(model, tmp_path, options)
    assert model.layers[0].self_attn.prompt_attention is None
