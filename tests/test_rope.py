import math

import pytest
import torch

from rope import (apply_rope, extend, max_wavelength, phase_thetas, rope_cos_sin, rope_inv_freq,
                  skipped_positions)

SCALINGS = [None, {"rope_type": "linear", "factor": 4.0},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
            {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
             "beta_fast": 16, "beta_slow": 2},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("head_dim,theta", [(64, 1e5), (128, 5e5), (16, 1e4)])
def test_inv_freq_matches_transformers(scaling, head_dim, theta):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=32768, rope_parameters=params)
    ref, ref_attn = (LlamaRotaryEmbedding.compute_default_rope_parameters(cfg) if scaling is None
                     else ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu"))
    ours, attn = rope_inv_freq(head_dim, theta, scaling, 32768)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert attn == pytest.approx(ref_attn, rel=1e-12)


def test_extend_methods():
    assert extend("pi", 1e5, 64, 8192, 32768) == (1e5, {"rope_type": "linear", "factor": 4.0})
    assert extend("abf", 5e5, 128, 8192, 32768) == (2e7, None)  # LongReD's Llama-3 32K theta
    assert extend("abf", 5e5, 128, 8192, 32768, abf_theta=1e8)[0] == 1e8
    th, sc = extend("ntk", 1e5, 64, 8192, 32768)
    assert sc is None and max_wavelength(th, 64) == pytest.approx(4 * max_wavelength(1e5, 64))
    with pytest.raises(ValueError, match="unknown rope method"):
        extend("longrope", 1e5, 64, 8192, 32768)
    with pytest.raises(ValueError, match="unknown rope_type"):
        rope_inv_freq(64, 1e5, {"rope_type": "longrope", "factor": 4.0})


def test_cos_sin_exact_far_positions_in_bf16():
    """Angles in fp32 from integer positions, cast last: bf16 cos/sin at 131071 stay within bf16
    rounding of a float64 reference (angles computed in bf16 would be wrong by O(1))."""
    inv, _ = rope_inv_freq(128, 5e5)
    pos = torch.tensor([0, 1, 8191, 65535, 131071])
    cos, sin = rope_cos_sin(pos, inv, 1.0, torch.bfloat16)
    ang = (pos.double()[:, None] * inv.double()).repeat(1, 2)  # fp32 inv_freq: the definition
    assert cos.dtype == torch.bfloat16 and (cos.double() - ang.cos()).abs().max() < 1e-2
    assert (sin.double() - ang.sin()).abs().max() < 1e-2
    bad = (pos.bfloat16()[:, None] * inv.bfloat16()).double().cos()
    assert (bad - ang[:, :64].cos()).abs().max() > 0.1  # the test can tell the difference


def test_apply_rope_is_rotation_and_relative(gen):
    """RoPE preserves norms and q.k depends only on the position difference."""
    inv, _ = rope_inv_freq(16, 1e4)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=gen, dtype=torch.float64)
    rot = lambda x, i: apply_rope(x, *rope_cos_sin(torch.tensor([i]), inv, 1.0, torch.float64))
    dot = lambda i, j: float((rot(q, i) * rot(k, j)).sum())
    assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-5)
    assert rot(q, 77).norm() == pytest.approx(float(q.norm()), rel=1e-6)


@pytest.mark.parametrize("method", ["uniform", "cream"])
@pytest.mark.parametrize("t_orig,t_target", [(96, 384), (300, 4800), (8192, 32768)])
def test_skipped_positions_invariants(method, t_orig, t_target):
    for seed in range(20):
        p = skipped_positions(t_orig, t_target, method, torch.Generator().manual_seed(seed))
        assert p.dtype == torch.int64 and p.shape == (t_orig,)
        assert (p.diff() > 0).all() and p[0] == 0 and p[-1] == t_target - 1
        heads = [h for h in (t_orig // 3, min(4 * t_target // t_orig, t_orig // 3))
                 if torch.equal(p[:h], torch.arange(h))
                 and torch.equal(p[-h:], torch.arange(t_target - h, t_target))]
        assert heads, "head must be 0..h-1 and tail end the target window, h = T//3 or 4s"
        again = skipped_positions(t_orig, t_target, method, torch.Generator().manual_seed(seed))
        assert torch.equal(p, again)


def test_skipped_positions_spread():
    """Uniform spreads the mid run over the whole range; CREAM concentrates it (SPEC section 2)."""
    g = torch.Generator().manual_seed(1)
    mids = {m: [int(skipped_positions(900, 3600, m, g)[450]) for _ in range(300)]
            for m in ("uniform", "cream")}
    assert max(mids["uniform"]) > 2500 and min(mids["uniform"]) < 800
    assert all(300 <= x <= 3600 - 300 for x in mids["cream"])
    with pytest.raises(ValueError, match="must exceed"):
        skipped_positions(100, 100, "uniform", g)
    with pytest.raises(ValueError, match="unknown skipped"):
        skipped_positions(100, 400, "gauss", g)


def test_phase_thetas():
    phases = phase_thetas(1e5, 64, 8192, [8192, 16384, 32768])
    assert phases[0] == (8192, 1e5)
    w0 = max_wavelength(1e5, 64)
    for L, th in phases:
        assert max_wavelength(th, 64) == pytest.approx(max(w0 / 8192 * L, w0), rel=1e-9)
    assert phases[2][1] == pytest.approx(extend("ntk", 1e5, 64, 8192, 32768)[0])
    loose = phase_thetas(1e5, 64, 8192, [32768], c=100.0)[0][1]
    assert max_wavelength(loose, 64) == pytest.approx(100.0 * 32768) and math.isfinite(loose)
