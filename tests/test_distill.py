"""distill.py against plain dense references (float64, full T x T maps, full-vocab logits)."""
import math

import pytest
import torch
import torch.nn.functional as F

import distill
import distill_fast

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP hand-off costs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_matches(ours, ref, leaves, tol=1e-6, frozen=(), gtol=None):
    """ours == ref (relative tol) in value and in the gradients of 3 * loss w.r.t. leaves (gtol,
    default tol); frozen inputs (teachers) that require grad get none."""
    assert abs(ours.item() - ref.item()) <= tol * abs(ref.item())
    got = torch.autograd.grad(3 * ours, (*leaves, *frozen), retain_graph=True, allow_unused=True)
    assert all(g is None for g in got[len(leaves):])
    for a, b in zip(got, torch.autograd.grad(3 * ref, leaves)):
        assert rel(a, b) <= (gtol or tol)


def dense_logits(x, y):
    """x_i . y_j / sqrt(hd) as a full (B,H,T,T) map, -inf for j > i; y repeated for GQA."""
    y = x if y is None else y.repeat_interleave(x.shape[1] // y.shape[1], dim=1)
    T = x.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return (x @ y.mT / math.sqrt(x.shape[-1])).masked_fill(~causal, -math.inf), causal


def dense_relation_kl(xt, xs, yt=None, ys=None):
    (zt, causal), (zs, _) = dense_logits(xt, yt), dense_logits(xs, ys)
    lt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
    return torch.where(causal, lt.exp() * (lt - ls), 0.0).sum()


def pair(shape, noise=0.5, gen=None, amp=2.0):
    """A teacher tensor and a nearby student tensor that requires grad."""
    t = amp * torch.randn(shape, dtype=f64, generator=gen)
    return t, (t + noise * amp * torch.randn(shape, dtype=f64, generator=gen)).requires_grad_()


RELATION_CASES = [  # B, H, K, T, hd, block, amp; K = 0: self relation x x^T, else (q, k)
    (2, 3, 0, 37, 8, 8, 2), (1, 2, 0, 37, 4, 64, 2), (1, 1, 0, 9, 5, 1, 2), (2, 2, 0, 40, 8, 8, 2),
    (1, 2, 0, 37, 8, 8, 30),  # logits ~1e3: exp overflows
    (2, 6, 2, 37, 8, 8, 2), (2, 4, 4, 37, 8, 8, 2), (2, 4, 1, 37, 8, 8, 2),  # pairs, GQA
    (2, 2, 0, 37, 8, (16, 5), 2), (2, 2, 0, 40, 8, (8, 24), 2),  # rectangular tiles
    (2, 6, 2, 41, 8, (7, 16), 2), (2, 4, 1, 23, 8, (64, 3), 2)]


@pytest.mark.parametrize("B,H,K,T,hd,block,amp", RELATION_CASES)
def test_relation_kl_matches_dense(B, H, K, T, hd, block, amp):
    """KL and student gradients == dense, teachers get none, a frozen key side gets only dQ;
    the forward without grad (KL only) == the one forming KL and gradients in one pass."""
    torch.manual_seed(0)
    (xt, xs), (yt, ys) = pair((B, H, T, hd), amp=amp), pair((B, K or H, T, hd), amp=amp)
    args = (xt.requires_grad_(), xs, yt.requires_grad_(), ys) if K else (xt.requires_grad_(), xs)
    with torch.no_grad():
        kl_only = distill.relation_kl(*args, block=block)
    ours, ref = distill.relation_kl(*args, block=block), dense_relation_kl(*args)
    assert abs(kl_only.item() - ours.item()) <= 1e-12 * ref.item()
    assert_matches(ours, ref, args[1::2], frozen=args[::2])
    if K:
        args = (xt, xs, yt, ys.detach())
        assert_matches(distill.relation_kl(*args, block=block), dense_relation_kl(*args), [xs])


@pytest.mark.parametrize("B,H,K,T,hd,block,amp", RELATION_CASES)
def test_relation_kl_fast_path_matches_reference(B, H, K, T, hd, block, amp):
    """relation_kl (grouped GQA rows, one tile pass, the fast path's tile body) == the plain
    relation_kl_reference (k repeated, autograd sums the group) in KL and student gradients, a
    frozen key side included; the reference itself == dense."""
    torch.manual_seed(1)
    (xt, xs), (yt, ys) = pair((B, H, T, hd), amp=amp), pair((B, K or H, T, hd), amp=amp)
    xt.requires_grad_()  # a teacher that requires grad still gets none
    cases = [(xt, xs, yt.requires_grad_(), ys) if K else (xt, xs)]
    if K:
        cases.append((xt, xs, yt, ys.detach()))
    for args in cases:
        leaves = [a for a in args[1::2] if a.requires_grad]
        reference = distill.relation_kl_reference(*args, block=block)
        assert_matches(reference, dense_relation_kl(*args), leaves, frozen=args[::2])
        assert_matches(distill.relation_kl(*args, block=block), reference, leaves, tol=1e-12,
                       frozen=args[::2])


def test_relation_kl_zero_for_equal_models_and_positive_otherwise():
    x = torch.randn(2, 3, 33, 8, dtype=f64, generator=torch.Generator().manual_seed(3))
    xs = x.clone().requires_grad_()
    kl = distill.relation_kl(x, xs, block=8)
    assert abs(kl.item()) < 1e-10 and torch.autograd.grad(kl, xs)[0].abs().max().item() < 1e-10
    for seed in range(3):
        xt, xs = pair((1, 2, 25, 4), noise=2.0, gen=torch.Generator().manual_seed(seed))
        assert distill.relation_kl(xt, xs, block=7).item() > 0


def test_gradcheck_self_and_pair():
    torch.manual_seed(4)
    xt, xs = pair((1, 2, 7, 3))
    assert torch.autograd.gradcheck(lambda s: distill.relation_kl(xt, s, block=3), (xs,))
    (qt, qs), (kt, ks) = pair((1, 4, 7, 3)), pair((1, 2, 7, 3))
    assert torch.autograd.gradcheck(lambda q, k: distill.relation_kl(qt, q, kt, k, block=3),
                                    (qs, ks))


@pytest.mark.parametrize("H,K,T,block", [(3, 3, 37, (8, 8)), (2, 2, 37, (16, 5)),
                                         (6, 2, 41, (7, 16)), (4, 1, 23, (64, 3))])
def test_row_lse_tile_loop_matches_dense(H, K, T, block):
    """The tile-loop lse (CPU path, fp32/fp64, fallback of the CUDA kernels) == dense, in
    distill_fast's group_rows order (B*K, T*group_size)."""
    g = torch.Generator().manual_seed(12)
    x, y = (torch.randn(2, n, T, 8, dtype=f64, generator=g) for n in (H, K))
    y = x if H == K else y
    X, Y = distill_fast.group_rows(x, K), distill_fast.group_rows(y, K)
    lse = distill_fast.row_lse(x, None if H == K else y, X, Y, H // K, *block)
    ref = dense_logits(x, y)[0].logsumexp(-1)  # (B,H,T)
    ref = ref.reshape(2, K, H // K, T).transpose(2, 3).reshape(2 * K, T * (H // K))
    assert distill.lse_kernel(x.device, x.dtype, 8) is None and rel(lse, ref) <= 1e-12


def test_relation_kl_with_lse_off_by_fp32_rounding(monkeypatch):
    """A fused kernel's lse is off by ~1e-6 relative: the KL moves by about as much, the
    gradient by ~1e-4 (sum_j D_ij is off by ~1e-6), far below one bf16 rounding of D."""
    torch.manual_seed(14)
    xt, xs = pair((2, 3, 37, 8))
    row_lse, gen = distill_fast.row_lse, torch.Generator().manual_seed(0)
    monkeypatch.setattr(distill_fast, "row_lse", lambda *a: (lambda l: l * (
        1 + 1e-6 * torch.randn(l.shape, dtype=f64, generator=gen)))(row_lse(*a)))
    assert_matches(distill.relation_kl(xt, xs, block=8), dense_relation_kl(xt, xs), [xs],
                   tol=1e-5, gtol=1e-3)


def test_relation_kl_bf16_inputs_accumulate_in_fp32():
    torch.manual_seed(5)
    xt, xs = (t.detach().bfloat16() for t in pair((1, 2, 30, 16)))
    ours = distill.relation_kl(xt, xs.requires_grad_(), block=8)
    x64 = xs.detach().to(f64).requires_grad_()
    ref = dense_relation_kl(xt.to(f64), x64)
    torch.autograd.backward([ours, ref])
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert xs.grad.dtype == torch.bfloat16 and rel(xs.grad.to(f64), x64.grad) <= 1e-2


def caps(seed, B=2, H=4, K=2, T=19, hd=4, layers=3):
    """Teacher and student captures {"q"|"k"|"v": {layer: (B,heads,T,hd)}}."""
    g, cap_t, cap_s = torch.Generator().manual_seed(seed), {}, {}
    for kind, n in {"q": H, "k": K, "v": K}.items():
        ts = [pair((B, n, T, hd), gen=g) for _ in range(layers)]
        cap_t[kind], cap_s[kind] = ({l: ts[l][i] for l in range(layers)} for i in (0, 1))
    return cap_t, cap_s


@pytest.mark.parametrize("tile_elements", [2**28, 1])  # all stacked | one relation a call
@pytest.mark.parametrize("norm", ["own", "query"])
def test_relation_loss_normalisation(norm, tile_elements):
    """Mean over layers of sum over q, k, v of KL / (B T heads), heads: own or the query's; the
    relations stacked into few relation_kl calls give the per-layer sum, values and gradients."""
    cap_t, cap_s = caps(6)
    rows = lambda kind, l: math.prod(cap_s[kind][l].shape[:3])  # B heads T
    ref = sum(dense_relation_kl(cap_t[k][l], cap_s[k][l]) / rows("q" if norm == "query" else k, l)
              for l in (0, 2) for k in "qkv") / 2
    calls = []
    relation_kl = distill.relation_kl
    with pytest.MonkeyPatch.context() as patch:  # count relation_kl's calls
        patch.setattr(distill, "relation_kl",
                      lambda *a, **k: calls.append(1) or relation_kl(*a, **k))
        ours = distill.relation_loss(cap_t, cap_s, [0, 2], norm=norm, block=5,
                                     tile_elements=tile_elements)
    assert len(calls) == (2 if tile_elements > 1 else 6)  # q of 2 layers | k, v of 2 layers
    assert_matches(ours, ref, [cap_s[k][l] for k in "qkv" for l in (0, 2)])
    only_q = distill.relation_loss(cap_t, cap_s, [1], kinds=("q",), block=5)
    ref_q = dense_relation_kl(cap_t["q"][1], cap_s["q"][1]) / rows("q", 1)
    assert abs(only_q.item() - ref_q.item()) <= 1e-9


def test_attention_kl_per_layer_and_select_layers():
    cap_t, cap_s = caps(7)
    kl = distill.attention_kl_per_layer(cap_t, cap_s, [0, 1, 2], block=4)
    for l, v in enumerate(kl):
        ref = dense_relation_kl(cap_t["q"][l], cap_s["q"][l], cap_t["k"][l], cap_s["k"][l])
        assert abs(v - ref.item() / math.prod(cap_s["q"][l].shape[:3])) <= 1e-6 * abs(v)
    for kl, m, want in [([.1, .5, .3, .9, .2], 2, [1, 3, 4]), ([.1, .5, .3, .9, 9.], 2, [1, 3, 4]),
                        ([.4, .1, .2], 0, [2]), ([.4, .1, .2], 2, [0, 1, 2])]:  # last: always
        assert distill.select_layers(kl, m) == want
    with pytest.raises(ValueError):
        distill.select_layers([0.4, 0.1, 0.2], 3)


def test_hidden_cosine_loss_and_s2l():
    g = torch.Generator().manual_seed(8)
    hs = [torch.randn(2, 5, 16, dtype=f64, generator=g, requires_grad=True) for _ in range(3)]
    ht = [h.detach() + 0.3 * torch.randn(2, 5, 16, dtype=f64, generator=g) for h in hs]
    ref = sum(1 - ((s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
              for s, t in zip(hs, ht))
    assert_matches(distill.hidden_cosine_loss(hs, ht), ref, hs)
    assert distill.s2l_loss(hs[0], ht[0]).item() == pytest.approx(
        distill.hidden_cosine_loss(hs[:1], ht[:1]).item())
    assert distill.s2l_loss(hs[0], hs[0].detach()).item() == pytest.approx(0.0, abs=1e-12)


def dense_kd(hs, ht, ws, wt, tau=1.0, targets=None, ce_weight=0.0):
    """Full (N,V) logits: tau^2 mean_n KL(softmax(zt/tau) || softmax(zs/tau)) + w CE."""
    zs, loss = hs @ ws.T, 0.0
    if ht is not None:
        lt, ls = (ht @ wt.T / tau).log_softmax(-1), (zs / tau).log_softmax(-1)
        loss = tau**2 * (lt.exp() * (lt - ls)).sum(-1).mean()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(zs, targets, ignore_index=-100)
    return loss


def kd_inputs(seed, N=30, D=12, V=53):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, D, dtype=f64, generator=g, requires_grad=True)
    ht = hs.detach() + 0.5 * torch.randn(N, D, dtype=f64, generator=g)
    ws = torch.randn(V, D, dtype=f64, generator=g, requires_grad=True)
    wt = ws.detach() + 0.5 * torch.randn(V, D, dtype=f64, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    return hs, ht, ws, wt, targets


@pytest.mark.parametrize("tau,ce_weight,chunk", [(1.0, 0.0, 7), (2.0, 0.0, 30), (1.0, 0.7, 8),
                                                 (0.5, 0.3, 1), (1.0, 0.0, 64)])
def test_logit_kd_matches_dense(tau, ce_weight, chunk):
    hs, ht, ws, wt, targets = kd_inputs(9)
    kw = dict(temperature=tau, targets=targets if ce_weight else None, ce_weight=ce_weight)
    assert_matches(distill.logit_kd(hs, ht, ws, wt, chunk=chunk, **kw),
                   dense_kd(hs, ht, ws, wt, tau, targets, ce_weight), (hs, ws))


def test_logit_kd_tied_embedding_frozen_head_and_ce_only():
    hs0, ht, ws, wt, targets = kd_inputs(10)
    tokens = torch.randint(0, 53, (30,), generator=torch.Generator().manual_seed(0))
    emb = ws.detach().clone().requires_grad_()
    hs = emb[tokens] * 0.5 + hs0.detach()  # tied: hs is built from the same embedding as the head
    assert_matches(distill.logit_kd(hs, ht, emb, wt, chunk=9), dense_kd(hs, ht, emb, wt), [emb])
    frozen = ws.detach()  # a head that does not train: only dH
    assert_matches(distill.logit_kd(hs0, ht, frozen, wt, chunk=4), dense_kd(hs0, ht, frozen, wt),
                   [hs0])
    assert_matches(distill.logit_kd(hs0, None, ws, None, chunk=11, targets=targets, ce_weight=1.0),
                   F.cross_entropy(hs0 @ ws.T, targets), (hs0, ws))
    same = distill.logit_kd(hs0, hs0.detach(), ws, ws.detach(), chunk=7, temperature=3.0)
    assert abs(same.item()) < 1e-12


def test_input_validation():
    x, y3, h, w = (torch.randn(*s) for s in ((1, 4, 8, 4), (1, 3, 8, 4), (5, 3), (7, 3)))
    for bad in (lambda: distill.relation_kl(x, x[:, :2]),
                lambda: distill.relation_kl(x, x, y3, y3),  # 4 heads % 3
                lambda: distill.relation_kl(x, x, y3[:, :2], None),
                lambda: distill.relation_loss({}, {}, [0], norm="rows"),
                lambda: distill.logit_kd(h, h, w, torch.randn(7, 4)),
                lambda: distill.logit_kd(h, None, w, None),  # no teacher and no CE
                lambda: distill.hidden_cosine_loss([h], [])):
        with pytest.raises(ValueError):
            bad()


def test_tile_bodies_trace_as_one_graph():
    """The CUDA path compiles these bodies with fullgraph=True; check they trace and agree."""
    g = torch.Generator().manual_seed(11)
    zt, zs = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    keep = torch.ones(6, 5, dtype=torch.bool).tril()
    lse = torch.randn(2, 6, generator=g)
    tgt = torch.tensor([1, -100, 3, 4, 0, 2])
    calls = [(distill_fast.kl_tile, (zt, zs, lse, lse + 1, keep, 0.5, torch.bfloat16)),
             (distill_fast.kl_tile, (zt, zs, lse, lse + 1, None, 0.5, None)),
             (distill._kd_chunk, (zt[0], zs[0], tgt, 2.0, torch.tensor(0.1), torch.tensor(0.2),
                                  torch.float32))]
    for fn, args in calls:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        for a, b in zip(*(torch.utils._pytree.tree_leaves(f(*args)) for f in (compiled, fn))):
            torch.testing.assert_close(a, b)


def test_compile_failure_falls_back_to_eager():
    def breaks(x):
        torch._dynamo.graph_break()  # fullgraph=True refuses this
        return x + 1

    run = distill_fast.compiled_or_eager(breaks, True)
    with pytest.warns(UserWarning, match="running eager"):
        assert run(torch.ones(2)).tolist() == [2.0, 2.0]
    assert run(torch.ones(2)).tolist() == [2.0, 2.0]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_bf16_matches_dense_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    xt = torch.randn(1, 4, 1500, 64, device="cuda", generator=g).bfloat16()
    xs = (xt.float() + 0.3 * torch.randn(xt.shape, device="cuda", generator=g)).bfloat16()
    xs.requires_grad_()
    ours = distill.relation_kl(xt, xs, block=512)
    ours.backward()
    x32 = xs.detach().float().requires_grad_()
    ref = dense_relation_kl(xt.float(), x32)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-3 * ref.item()
    assert rel(xs.grad.float(), x32.grad) <= 2e-2


@cuda
def test_cuda_peak_memory_grows_linearly():
    def peak(T):
        xt = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16)
        xs = (xt + 0.1).requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        distill.relation_kl(xt, xs, block=512).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    peak(2048)  # warm-up (compile)
    p4, p8, p16 = peak(4096), peak(8192), peak(16384)
    assert p16 / p8 <= 2.2 and p8 / p4 <= 2.2
    assert p16 < 8 * 16384 * 16384 * 4 / 16  # far below one fp32 (H,T,T) map


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="fused SDPA kernels need sm80+")
def test_cuda_kernel_lse_matches_tile_loop(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 8, 1500, 128, device="cuda", generator=g).bfloat16()
    y = torch.randn(2, 2, 1500, 128, device="cuda", generator=g).bfloat16()
    assert distill.lse_kernel(x.device, x.dtype, 128) in ("cudnn", "flash")
    for yy, K in ((None, 8), (y, 2)):  # self relation, GQA pair
        X = distill_fast.group_rows(x, K)
        Y = distill_fast.group_rows(x if yy is None else yy, K)
        lse = distill_fast.row_lse(x, yy, X, Y, 8 // K, 256, 256)
        ref = distill_fast.row_lse_by_tiles(X, Y, 8 // K, 256, 256)
        torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-4)
    xs = (x.float() + 0.3 * torch.randn(x.shape, device="cuda", generator=g)).bfloat16()
    ys = (y.float() + 0.3 * torch.randn(y.shape, device="cuda", generator=g)).bfloat16()
    runs = []
    for kernel in (distill_fast.lse_kernel, lambda *a: None):  # fused kernel lse, then tile loop
        monkeypatch.setattr(distill_fast, "lse_kernel", kernel)
        q, k = xs.clone().requires_grad_(), ys.clone().requires_grad_()
        kl = distill.relation_kl(x, q, y, k, block=512)
        runs.append((kl.item(), *torch.autograd.grad(kl, (q, k))))
    assert abs(runs[0][0] - runs[1][0]) <= 1e-5 * runs[1][0]
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert rel(a.float(), b.float()) <= 1e-2


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="fused SDPA kernels need sm80+")
def test_cuda_fast_path_matches_reference():
    """bf16 on CUDA: relation_kl with all its speed devices (fused-kernel lse, compiled tile body,
    grouped GQA rows, fp32-output GEMMs) == relation_kl_reference (plain fp32 torch), self
    relation and GQA pair. The kernel's lse differs from ours by fp32 rounding, and D is rounded
    to bf16 for the gradient GEMMs: on an H200, KL 3e-5 and gradients 3e-3 apart (relative)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 8, 1500, 128, device="cuda", generator=g).bfloat16()
    y = torch.randn(2, 2, 1500, 128, device="cuda", generator=g).bfloat16()
    assert distill.lse_kernel(x.device, x.dtype, 128) in ("cudnn", "flash")
    xs = (x.float() + 0.3 * torch.randn(x.shape, device="cuda", generator=g)).bfloat16()
    ys = (y.float() + 0.3 * torch.randn(y.shape, device="cuda", generator=g)).bfloat16()
    for args in ((x, xs), (x, xs, y, ys)):
        students = [a.clone().requires_grad_() for a in args[1::2]]
        inputs = (args[0], students[0], *args[2:3], *students[1:])
        runs = []
        for loss in (distill.relation_kl, distill.relation_kl_reference):
            kl = loss(*inputs, block=512)
            runs.append((kl.item(), *torch.autograd.grad(kl, students)))
        assert abs(runs[0][0] - runs[1][0]) <= 2e-4 * runs[1][0]
        for a, b in zip(runs[0][1:], runs[1][1:]):
            assert a.dtype == b.dtype == torch.bfloat16 and rel(a.float(), b.float()) <= 1e-2


def test_logit_kd_computes_in_the_autocast_dtype():
    """Under autocast, fp32 inputs (master weights) are cast as nn.Linear's would be: the loss is
    the one of bf16 copies, and the gradients come back in fp32."""
    torch.manual_seed(0)
    hs, ws = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    ht, wt, t = torch.randn(8, 16), torch.randn(32, 16), torch.randint(0, 32, (8,))
    with torch.autocast("cpu", torch.bfloat16):
        a = distill.logit_kd(hs, ht, ws, wt, targets=t, ce_weight=0.5)
    b = distill.logit_kd(*(x.bfloat16() for x in (hs, ht, ws, wt)), targets=t, ce_weight=0.5)
    assert a.item() == b.item()
    a.backward()
    assert hs.grad.dtype == ws.grad.dtype == torch.float32



def test_relation_kl_under_autocast_runs_in_its_dtype():
    """Under autocast an fp32 student (fp32 master weights, fp32 RoPE) and a bf16 teacher are
    cast to bf16, as an nn.Linear would be: the same KL and gradient as bf16 inputs given
    directly, the gradient returned in fp32."""
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(1, 2, 24, 8, generator=g).bfloat16()
    xs = torch.randn(1, 2, 24, 8, generator=g).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ours = distill.relation_kl(xt, xs, block=8)
    grad, = torch.autograd.grad(ours, xs)
    xs_bf16 = xs.detach().bfloat16().requires_grad_()
    direct = distill.relation_kl(xt, xs_bf16, block=8)
    grad_direct, = torch.autograd.grad(direct, xs_bf16)
    assert ours.item() == direct.item()
    assert grad.dtype == torch.float32 and torch.equal(grad, grad_direct.float())
