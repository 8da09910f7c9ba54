"""The fused decode step: its arithmetic is transformers' Qwen2 arithmetic (on synthetic tensors and on
the tiny model), fusing leaves the model's own outputs unchanged, unsupported models keep their own
step; on a GPU the Triton kernels equal the torch definitions (``pytest -m gpu``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaOnevisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from dycoke.attention import language_model_of
from dycoke.decoding import kernels
from dycoke.decoding.fused import FusedStep, fused_decoder_for
from dycoke.tiny import build_tiny_model
from tests import interpreted_kernels


def _rotary(b: int, d: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(b, d // 2, device=device) * 40
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_residual_add_and_qwen2_rmsnorm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = Qwen2RMSNorm(48, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(48).to(dtype)
    hidden, delta = torch.randn(3, 48).to(dtype), torch.randn(3, 48).to(dtype)
    h, x = kernels.add_rms_norm_torch(hidden, delta, norm.weight, 1e-6)
    assert torch.equal(h, hidden + delta) and torch.equal(x, norm(hidden + delta))
    same, x0 = kernels.add_rms_norm_torch(hidden, None, norm.weight, 1e-6)
    assert same is hidden and torch.equal(x0, norm(hidden))
    parts = torch.randn(4, 3, 48)  # a split projection's float32 slices: their sum, rounded, is the delta
    summed = (((parts[0] + parts[1]) + parts[2]) + parts[3]).to(dtype)
    h, x = kernels.add_rms_norm_torch(hidden, parts, norm.weight, 1e-6)
    assert torch.equal(h, hidden + summed) and torch.equal(x, norm(hidden + summed))


def test_a_split_gemv_off_the_gpu_is_one_slice_of_the_product() -> None:
    x, weight = torch.randn(1, 64), torch.randn(16, 32)
    parts = kernels.gemv(x, weight, silu_input=True, config=kernels.DOWN_GEMV_CONFIG)
    assert parts.shape == (1, 1, 16) and parts.dtype == torch.float32
    torch.testing.assert_close(parts[0], torch.nn.functional.linear(kernels.silu_mul_torch(x), weight))
    with pytest.raises(ValueError, match="no bias"):
        kernels.gemv(x[:, :32], weight, weight[:, 0], config=kernels.DOWN_GEMV_CONFIG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_to_cache_is_qwen2_rotary_and_a_cache_write(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    b, hq, hkv, d, length = 2, 4, 2, 16, 7
    qkv = torch.randn(b, (hq + 2 * hkv) * d).to(dtype)
    cos, sin = _rotary(b, d, dtype)
    keys, values = torch.randn(b, hkv, length, d).to(dtype), torch.randn(b, hkv, length, d).to(dtype)
    before_k, before_v = keys.clone(), values.clone()
    q = kernels.rotary_to_cache_torch(qkv, cos, sin, keys, values, torch.tensor([5]), hq, hkv)
    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(
        q_ref.view(b, 1, hq, d).transpose(1, 2), k_ref.view(b, 1, hkv, d).transpose(1, 2), cos[:, None], sin[:, None]
    )
    assert q.shape == (b, hq, 1, d) and torch.equal(q, q_ref)
    assert torch.equal(keys[:, :, 5:6], k_ref) and torch.equal(values[:, :, 5], v_ref.view(b, hkv, d))
    untouched = [0, 1, 2, 3, 4, 6]
    assert torch.equal(keys[:, :, untouched], before_k[:, :, untouched])
    assert torch.equal(values[:, :, untouched], before_v[:, :, untouched])


def test_silu_mul_is_qwen2_mlp_activation() -> None:
    gate_up = torch.randn(3, 20)
    assert torch.equal(kernels.silu_mul_torch(gate_up), torch.nn.functional.silu(gate_up[:, :10]) * gate_up[:, 10:])


def test_fusing_makes_views_and_keeps_the_models_outputs() -> None:
    model = build_tiny_model(seed=3).eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 500, (2, 9))
    step = fused_decoder_for(model)
    assert isinstance(step, FusedStep) and fused_decoder_for(model) is step  # built once per model
    layer = language_model_of(model).layers[0]
    fused = step.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == fused.qkv_weight[attn.q_proj.weight.shape[0] :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == fused.gate_up_weight[mlp.gate_proj.weight.shape[0] :].data_ptr()
    assert torch.equal(fused.qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert FusedStep(model).layers[0].qkv_weight.data_ptr() == fused.qkv_weight.data_ptr()  # idempotent


def test_models_the_step_does_not_implement_keep_their_own() -> None:
    model = build_tiny_model(seed=4)
    language_model_of(model).config.hidden_act = "gelu"
    assert fused_decoder_for(model) is None
    other = build_tiny_model(seed=5)
    language_model_of(other).layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64))
    assert fused_decoder_for(other) is None


# -- GPU: the Triton kernels --------------------------------------------------------------------------


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _one_ulp_apart(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Whether bf16 ``got`` is within one bf16 step of ``want`` everywhere, and the share that differs."""
    step = want.float().abs().clamp_min(1e-30) * 2**-7
    return bool(((got.float() - want.float()).abs() <= step).all()), float((got != want).float().mean())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b", [1, 5])
def test_triton_add_rms_norm(b: int) -> None:
    torch.manual_seed(2)
    hidden = torch.randn(b, 3584, device="cuda", dtype=torch.bfloat16)
    delta, weight = torch.randn_like(hidden), torch.randn(3584, device="cuda", dtype=torch.bfloat16)
    h, x = kernels.add_rms_norm(hidden, delta, weight, 1e-6)
    h_ref, x_ref = kernels.add_rms_norm_torch(hidden, delta, weight, 1e-6)
    assert torch.equal(h, h_ref)
    close, share = _one_ulp_apart(x, x_ref)  # only the float32 sum's order differs
    print(f"share of elements one bf16 step apart: {share:.4f}")  # shown with -s
    assert close and share < 0.3, share
    _, x0 = kernels.add_rms_norm(hidden, None, weight, 1e-6)
    close, share = _one_ulp_apart(x0, kernels.add_rms_norm_torch(hidden, None, weight, 1e-6)[1])
    print(f"share of elements one bf16 step apart: {share:.4f}")  # shown with -s
    assert close and share < 0.3, share


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b", [1, 5])
def test_triton_rotary_to_cache(b: int) -> None:
    """Bit for bit: the kernel rounds to bf16 with integer operations between the ops (with float round
    trips, most likely folded by the compiler, 23% of the queries were off on an H200; passes since)."""
    torch.manual_seed(3)
    hq, hkv, d, length = 28, 4, 128, 40
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    cos, sin = _rotary(b, d, torch.bfloat16, "cuda")
    keys = torch.zeros(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    keys_ref, values_ref = keys.clone(), values.clone()
    slot = torch.tensor(17, device="cuda").view(1)
    q = kernels.rotary_to_cache(qkv, cos, sin, keys, values, slot, hq, hkv)
    q_ref = kernels.rotary_to_cache_torch(qkv, cos, sin, keys_ref, values_ref, slot, hq, hkv)
    _, share = _one_ulp_apart(q, q_ref)
    print(f"share of elements one bf16 step apart: {share:.4f}")  # shown with -s
    assert torch.equal(q, q_ref) and torch.equal(keys, keys_ref) and torch.equal(values, values_ref)


@pytest.mark.gpu
@needs_gpu
def test_triton_silu_mul() -> None:
    gate_up = torch.randn(3, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    close, share = _one_ulp_apart(kernels.silu_mul(gate_up), kernels.silu_mul_torch(gate_up))
    print(f"share of elements one bf16 step apart: {share:.4f}")  # shown with -s
    assert close and share < 0.3, share


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("n", "k", "bias", "silu"),
    [(4608, 3584, True, False), (3584, 3584, False, False), (37888, 3584, False, False), (896, 4864, False, True),
     (1152, 896, True, False), (151936, 896, False, False)],
)  # fmt: skip
def test_triton_gemv(n: int, k: int, bias: bool, silu: bool) -> None:
    """7B and 0.5B projection shapes (0.5B's 896 is not a multiple of the 512 block): the float32 sum
    rounded once, like cuBLAS's (one bf16 step apart where the sums' order tips the rounding)."""
    torch.manual_seed(n + k)
    x = torch.randn(1, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    got = kernels.gemv(x, weight, b, silu_input=silu)
    x_in = kernels.silu_mul(x) if silu else x
    exact = torch.nn.functional.linear(x_in.double(), weight.double(), None if b is None else b.double())
    # one bf16 rounding of the result, plus what a float32 sum of K products may drift where they cancel
    drift = k * 2**-24 * (weight.double().abs() @ x_in.double().abs().T).T
    bound = (exact.abs() + drift) * 2**-8 + drift
    assert bool(((got.double() - exact).abs() <= bound).all())
    cublas = torch.nn.functional.linear(x_in, weight, b)
    _, share = _one_ulp_apart(got, exact.to(torch.bfloat16))
    print(f"one bf16 step from the exact sum: {share:.4f}; differs from cuBLAS: {(got != cublas).float().mean():.4f}")
    assert share < 0.05, share


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("n", "k"), [(3584, 18944), (896, 4864)])
def test_triton_split_down_projection_and_the_norm_that_adds_its_slices(n: int, k: int) -> None:
    """7B's and 0.5B's down projections (0.5B's 4864 is not a multiple of the 512 block), SiLU * up read
    in, four float32 slices: their sum, rounded once, is the product as closely as the unsplit kernel's;
    the RMSNorm kernel adds the slices in order exactly as the torch definition does (0.5B's 4864 columns,
    10 blocks, make 5 slices of 2 blocks)."""
    torch.manual_seed(k)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    parts = kernels.gemv(gate_up, weight, silu_input=True, config=kernels.DOWN_GEMV_CONFIG)
    blocks = -(-k // 512)
    slice_columns = -(-blocks // kernels.DOWN_GEMV_CONFIG["split_k"]) * 512
    assert parts.shape == (-(-k // slice_columns), 1, n) and parts.dtype == torch.float32  # 8 (7B), 5 (0.5B)
    x_in = kernels.silu_mul(gate_up)
    exact = torch.nn.functional.linear(x_in.double(), weight.double())
    drift = k * 2**-24 * (weight.double().abs() @ x_in.double().abs().T).T
    product = parts.sum(dim=0).to(torch.bfloat16)
    assert bool(((product.double() - exact).abs() <= (exact.abs() + drift) * 2**-8 + drift).all())
    hidden, norm = torch.randn(1, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda").bfloat16()
    h, x = kernels.add_rms_norm(hidden, parts, norm, 1e-6)
    h_ref, x_ref = kernels.add_rms_norm_torch(hidden, parts, norm, 1e-6)
    assert torch.equal(h, h_ref)
    assert _one_ulp_apart(x, x_ref)[0]


@pytest.mark.gpu
@needs_gpu
def test_one_row_projections_take_gemv_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke.decoding import fused

    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    one, two = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16), torch.randn(2, 512, device="cuda")
    calls = []
    monkeypatch.setattr(fused, "gemv", lambda *a, **kw: calls.append(a) or kernels.gemv(*a, **kw))
    fused._linear(one, weight)
    fused._linear(two.to(torch.bfloat16), weight)  # two rows: cuBLAS
    fused._linear(one.float(), weight.float())  # float32: cuBLAS
    assert len(calls) == 1
    monkeypatch.setenv(fused.GEMV_ENV, "cublas")
    fused._linear(one, weight)
    assert len(calls) == 1
    gate_up, down = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), weight.repeat(1, 8)  # K = 4096
    assert fused._down(gate_up, down).shape == (1, 256)  # cuBLAS: the (B, D) product
    monkeypatch.setenv(fused.GEMV_ENV, "cublas-down")
    assert fused._down(gate_up, down).shape == (1, 256) and len(calls) == 1
    monkeypatch.delenv(fused.GEMV_ENV)
    slices = fused._down(gate_up, down)  # the split gemv's float32 slices, one per 512 columns here
    assert slices.shape == (8, 1, 256) and slices.dtype == torch.float32 and len(calls) == 2


@pytest.mark.parametrize(
    ("programs", "length"), [(4, 1), (4, 64), (4, 65), (4, 3200), (4, 25_000), (128, 3200), (1, 10**6)]
)
def test_split_attention_cuts_the_cache_into_nonempty_whole_block_chunks(programs: int, length: int) -> None:
    splits, chunk = kernels.attention_splits(programs, length, sms=132)
    assert chunk % 64 == 0
    assert (splits - 1) * chunk < length <= splits * chunk  # every slot in one chunk, no chunk empty
    assert programs * splits <= max(2 * 132 + programs, programs)  # about two programs per multiprocessor
    if length >= 2 * 132 * 64:
        assert programs * splits >= 132  # a long cache fills the GPU


def test_split_attention_definition_is_grouped_sdpa() -> None:
    torch.manual_seed(4)
    query, key, value = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    bias = torch.zeros(2, 1, 1, 30).masked_fill_(torch.rand(2, 1, 1, 30) < 0.5, float("-inf"))
    bias[..., -1] = 0.0
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, enable_gqa=True)
    got = kernels.split_attention_torch(query, key, value, bias, 16**-0.5)
    assert got.shape == (2, 1, 6, 16)
    torch.testing.assert_close(got, expected.transpose(1, 2))


def _decode_case(b: int, hq: int, hkv: int, d: int, length: int) -> tuple[torch.Tensor, ...]:
    query = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    allowed = torch.rand(b, length, device="cuda") < 0.3
    allowed[:, -1] = True
    storage = torch.zeros(b, 1, 1, length + (-length) % 16, device="cuda", dtype=torch.bfloat16)
    bias = storage[..., :length].masked_fill_(~allowed.view(b, 1, 1, length), float("-inf"))
    return query, key, value, bias


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "length"),
    [(1, 28, 4, 128, 1), (1, 28, 4, 128, 3203), (1, 28, 4, 128, 25_001), (3, 14, 2, 64, 1000), (32, 28, 4, 128, 700)],
)
def test_triton_split_attention_is_as_close_to_exact_as_sdpa(b: int, hq: int, hkv: int, d: int, length: int) -> None:
    """7B (28/4 heads of 128) and 0.5B (14/2 of 64) shapes, one row to 32, one slot to 25k: no further from
    the float32 definition than torch's SDPA (cuDNN on Hopper) is, give or take one bf16 step."""
    torch.manual_seed(length)
    query, key, value, bias = _decode_case(b, hq, hkv, d, length)
    exact = kernels.split_attention_torch(query.double(), key.double(), value.double(), bias.double(), d**-0.5)
    got = kernels.split_attention(query, key, value, bias, d**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, enable_gqa=True)
    ours, theirs = (got.double() - exact).abs().max(), (sdpa.transpose(1, 2).double() - exact).abs().max()
    print(f"largest error: split {float(ours):.2e}, sdpa {float(theirs):.2e}")  # shown with -s
    assert got.shape == (b, 1, hq, d)
    assert ours <= theirs + exact.abs().max() * 2**-8


@pytest.mark.gpu
@needs_gpu
def test_triton_split_attention_replays_in_a_cuda_graph_and_compiles_once() -> None:
    torch.manual_seed(9)
    query, key, value, bias = _decode_case(1, 28, 4, 128, 3000)
    eager = kernels.split_attention(query, key, value, bias, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.split_attention(query, key, value, bias, 0.1)
    query.copy_(torch.randn_like(query))
    graph.replay()
    assert torch.equal(captured, kernels.split_attention(query, key, value, bias, 0.1))
    assert not torch.equal(captured, eager)
    partial = kernels._build()["decode_attention_partial"]
    caches = getattr(partial, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton does not expose its compiled-kernel cache")
    compiled = sum(len(entry[0]) for entry in caches.values())
    for length in (3001, 3017, 4099, 12_345):  # other lengths, sizes that do and do not divide by 16
        kernels.split_attention(*_decode_case(1, 28, 4, 128, length), 0.1)
    assert sum(len(entry[0]) for entry in caches.values()) == compiled


@pytest.mark.gpu
@needs_gpu
def test_masked_decode_attention_takes_the_split_kernel_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke import attention

    query, key, value, bias = _decode_case(1, 28, 4, 128, 100)
    calls = []
    monkeypatch.setattr(attention, "split_attention", lambda *a: calls.append(a) or kernels.split_attention(*a))
    attention.masked_decode_attention(query, key, value, bias, None)
    attention.masked_decode_attention(query.float(), key.float(), value.float(), bias.float(), None)  # SDPA
    attention.masked_decode_attention(query, key, value, bias == 0, None)  # a boolean mask: SDPA
    assert len(calls) == 1
    monkeypatch.setenv(kernels.DECODE_ATTENTION_ENV, "sdpa")
    attention.masked_decode_attention(query, key, value, bias, None)
    assert len(calls) == 1


def test_kernels_are_not_compiled_where_they_cannot_run() -> None:
    config = build_tiny_model(seed=6).config.text_config
    assert kernels.compile_in_background(config, torch.device("cpu"), torch.float32) is None
    if torch.cuda.is_available():  # a model type the fused step does not implement: nothing to compile
        config.model_type = "llama"
        assert kernels.compile_in_background(config, torch.device("cuda"), torch.bfloat16) is None


def test_the_early_compile_reads_the_checkpoints_json_and_runs_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config_file = tiny_checkpoint / "config.json"
    assert kernels.compile_for_checkpoint(config_file, torch.device("cpu"), torch.float32) is None
    assert kernels.compile_for_checkpoint(tmp_path / "missing.json", torch.device("cuda"), torch.bfloat16) is None
    lacking = json.loads(config_file.read_text())
    del lacking["text_config"]["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(lacking))
    assert kernels.compile_for_checkpoint(tmp_path / "config.json", torch.device("cuda"), torch.bfloat16) is None
    if not torch.cuda.is_available() or not kernels.triton_available(torch.device("cuda")):
        return
    early = kernels.compile_for_checkpoint(config_file, torch.device("cuda"), torch.bfloat16)
    assert early is not None
    text_config = LlavaOnevisionConfig.from_pretrained(tiny_checkpoint).text_config
    assert kernels.compile_in_background(text_config, torch.device("cuda"), torch.bfloat16) is early


# -- the Triton kernels in Triton's interpreter (CPU; runs wherever Triton is installed) -----------------


def test_kernels_in_tritons_interpreter() -> None:
    """The kernels' logic on CPU tensors, in a fresh process (the interpreter must be on before Triton
    is imported): rotary bit for bit in bf16 and float32, RMSNorm and SiLU * up in float32
    (``tests/interpreted_kernels.py``)."""
    if importlib.util.find_spec("triton") is None:  # not imported here: only the child process needs it
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "tests.interpreted_kernels"], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode == interpreted_kernels.CANNOT_LOOP:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "all kernels agree"
