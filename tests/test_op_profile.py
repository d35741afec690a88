"""tools/op_profile: FLOPs read off optimized HLO (CPU-compiled, and GPU custom calls as XLA prints them) and
the top-op table of a real CPU trace."""

import jax
import jax.numpy as jnp

from tools import op_profile

# One instruction each, as XLA's GPU backend prints them (SD3's attention at 4096², a q/k/v GEMM).
_QKV = "bf16[2,16717,24,64]{3,2,1,0}"
_BMM1 = '"bmm1_dot_dimension_numbers":{"lhs_contracting_dimensions":["3"],"lhs_batch_dimensions":["0","2"]}'
_GPU_HLO = "\n".join([
    "ENTRY %main (q: bf16[2,16717,24,64], k: bf16[2,16717,24,64], v: bf16[2,16717,24,64], x: bf16[16717,1536], "
    "w: bf16[1536,4608]) -> bf16[2] {",
    '  %gemm = (bf16[16717,4608]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", '
    'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}',
    f"  %fmha = ({_QKV}, f32[2,24,16717]{{2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), "
    f'custom_call_target="__cudnn$fmhaSoftmax", backend_config={{"cudnn_fmha_backend_config":{{{_BMM1}}}}}',
    f"  %fmha_bwd = ({_QKV}, {_QKV}, {_QKV}, u8[0]{{0}}) custom-call(%q, %k, %v), "
    'custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={}',
    "}",
])  # fmt: skip


def test_flops_of_gpu_gemm_and_attention_calls():
    flops = op_profile.hlo_flops(_GPU_HLO)
    b, t, n, h = 2, 16717, 24, 64
    assert flops["gemm"] == 2 * 16717 * 4608 * 1536
    assert flops["fmha"] == 4 * b * n * t * t * h
    assert flops["fmha_bwd"] == 2.5 * flops["fmha"]


def _conv_dot(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y.reshape(-1, 16) @ m).sum()


def test_flops_of_cpu_hlo_count_fused_dots_and_convolutions():
    args = jnp.ones((2, 32, 32, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((16, 32))
    compiled = jax.jit(_conv_dot).lower(*args).compile()
    flops = sorted(op_profile.hlo_flops(compiled.as_text()).values())
    conv, dot = 2 * (2 * 32 * 32 * 16) * 9 * 8, 2 * (2 * 32 * 32) * 32 * 16
    # the dot may sit in a fusion (then the fusion and its inner dot both carry its count)
    assert set(flops) == {dot, conv}, flops


def test_profile_table_of_a_cpu_trace(tmp_path):
    args = jnp.ones((2, 32, 32, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((16, 32))
    compiled = jax.jit(jax.grad(_conv_dot, argnums=(1, 2))).lower(*args).compile()
    run = lambda: jax.block_until_ready(compiled(*args))
    run()
    rows = op_profile.profile(run, tmp_path, [compiled.as_text()], runs=2, top=5)
    assert 0 < len(rows) <= 5
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert all(r["module"] == "jit__conv_dot" and r["calls"] == 1 and 0 < r["share"] <= 100 for r in rows)
    assert any(r["tflops"] for r in rows), rows  # a convolution or dot is among the slowest ops
    op_profile.save(rows, tmp_path / "ops.md", "test")
    assert "| op | what | kind |" in (tmp_path / "ops.md").read_text()
