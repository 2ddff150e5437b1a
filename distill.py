"""Distillation losses for RoPE restoration: pure functions, the maths in each docstring.

Papers: LongReD (Dong et al., ACL 2025, arXiv 2502.07365), LinearARD (Yang et al.,
arXiv 2604.00004), SDLC (Huber et al., arXiv 2604.06070). Legend: B batch, T time, D model,
H query heads, K kv heads, hd head dim, V vocab, N rows of a batched matmul, R x C one tile.
Teacher inputs are constants: no gradient ever flows to them. Half inputs are multiplied with
fp32 output (cuBLAS out_dtype on CUDA); every logit, exp and sum is fp32 (fp64 stays fp64).
"""
import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F


def _mm(a, b, acc=None):
    """a @ b, (R,K)@(K,C) or (N,R,K)@(N,K,C), fp32 out for half operands; acc: acc += a @ b."""
    mm, addmm = (torch.bmm, torch.baddbmm) if a.dim() == 3 else (torch.mm, torch.addmm)
    if a.dtype not in (torch.float16, torch.bfloat16):  # fp32, fp64: acc of the same dtype
        return a @ b if acc is None else addmm(acc, a, b, out=acc)
    if not a.is_cuda:
        return a.float() @ b.float() if acc is None else acc.add_(a.float() @ b.float())
    if acc is None:
        return mm(a, b, out_dtype=torch.float32)
    try:  # a self of dtype out_dtype is accepted from torch 2.10 on
        return addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError):
        return acc.add_(a @ b)  # older torch: one half rounding per chunk, the sum stays fp32


@functools.cache
def _compiled(fn, on, dynamic=False):
    """fn, or torch.compile(fn) when on; if compiling fails, warn once and run fn eagerly."""
    if not on:
        return fn
    compiled, failed = torch.compile(fn, dynamic=dynamic, fullgraph=True), []

    def run(*args):
        if not failed:
            try:
                return compiled(*args)
            except Exception as e:  # no Triton, an unsupported op, ...: stay correct, lose speed
                failed.append(e)
                warnings.warn(f"torch.compile({fn.__name__}) failed, running eager: {e!r}")
        return fn(*args)
    return run


# ---- relation KL (LinearARD): exact, memory linear in T --------------------------------------

def _layout(x, k):
    """(B,H,T,hd) -> (B*k, T*G, hd), the G = H/k query heads of a kv head interleaved by T."""
    B, H, T, hd = x.shape
    return x.reshape(B, k, H // k, T, hd).transpose(2, 3).reshape(B * k, T * (H // k), hd)


def _tiles(T, G, rb, cb, device):
    """Causal tiles (rows, cols, keep (R,C) or None): rb positions = rows [p0 G, p1 G), cb cols."""
    pos = torch.arange(T * G, device=device) // G  # the position of each row
    for p0 in range(0, T, rb):
        p1 = min(T, p0 + rb)
        for c0 in range(0, p1, cb):
            q0, c1 = max(p0, c0), min(p1, c0 + cb)  # rows before c0 see none of these columns
            keep = pos[q0 * G:p1 * G, None] >= pos[c0 * G:c1 * G:G] if c1 - 1 > q0 else None
            yield slice(q0 * G, p1 * G), slice(c0, c1), keep


def _lse_tiles(X, Y, G, rb, cb):
    """Fallback and reference: lse_i = log sum_{j<=i} e^(s x_i.y_j) (N, T*G), tile by tile."""
    lse = X.new_full(X.shape[:2], -math.inf, dtype=torch.promote_types(X.dtype, torch.float32))
    for rows, cols, keep in _tiles(Y.shape[1], G, rb, cb, X.device):
        z = _mm(X[:, rows], Y[:, cols].mT) * X.shape[-1] ** -0.5
        z = z if keep is None else z.masked_fill_(~keep, -math.inf)
        lse[:, rows] = torch.logaddexp(lse[:, rows], z.logsumexp(-1))
    return lse


def _kernel_lse(kernel, q, k, s):
    """(B,H,T) fp32 row lse of the causal softmax(s q k^T), q, k (B,H,T,hd) contiguous, by SDPA's
    fused forward (outputs discarded); positional arguments as in the aten schemas of 2.11-2.13."""
    if kernel == "cudnn":  # q, k, v (narrow: faster), attn_bias, compute_log_sumexp, dropout_p,
        lse = torch.ops.aten._scaled_dot_product_cudnn_attention(  # is_causal, return_debug_mask
            q, k, k[..., :16].contiguous(), None, True, 0.0, True, False, scale=s)
    else:  # q, k, v, dropout_p, is_causal, return_debug_mask -> (out, logsumexp, ...)
        lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True, False, scale=s)
    return lse[1].reshape(q.shape[:3])  # cuDNN's is (B,H,T,1); any other size raises


@functools.cache
def lse_kernel(device, dtype, hd):
    """The first fused kernel ("cudnn", "flash") whose lse matches the tile loop's (atol 1e-4) on
    a small causal problem, tried once per device, dtype, head dim; None: CPU, fp32/64, odd hd."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or hd % 8 or hd > 256:
        return None
    x = torch.randn(1, 2, 300, hd, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(0))  # global RNG left alone
    for kernel in ("cudnn", "flash"):  # no such backend, a refused shape, ...: next one
        with contextlib.suppress(Exception):
            if torch.allclose(_kernel_lse(kernel, x, x, hd ** -0.5)[0],
                              _lse_tiles(x[0], x[0], 1, 64, 64), rtol=1e-5, atol=1e-4):
                return kernel


def _row_lse(x, y, X, Y, G, rb, cb):
    """Row lse (N, T*G) in _layout order by lse_kernel, else (or if it raises) by the tile loop."""
    if kernel := lse_kernel(x.device, x.dtype, x.shape[-1]):
        with contextlib.suppress(Exception):  # (B,H,T) -> (B*k, G, T) -> (B*k, T*G)
            lse = _kernel_lse(kernel, x.contiguous(), (x if y is None else y.repeat_interleave(
                G, 1)).contiguous(), x.shape[-1] ** -0.5)
            return lse.reshape(X.shape[0], G, -1).transpose(1, 2).reshape(X.shape[:2])
    return _lse_tiles(X, Y, G, rb, cb)


def _kl_tile(zt, zs, lse_t, lse_s, keep, scale, dtype):
    """Tile zt, zs (N,R,C), p = exp(s z - lse): row sums of p_t s (zt - zs), D = p_s - p_t."""
    zt, zs = zt * scale, zs * scale
    p_t = torch.exp(zt - lse_t[..., None])
    a, d = p_t * (zt - zs), None if dtype is None else torch.exp(zs - lse_s[..., None]) - p_t
    if keep is not None:  # diagonal tile: columns j > i drop out (where: inf/nan there vanish)
        a, d = torch.where(keep, a, 0.0), None if d is None else torch.where(keep, d, 0.0)
    return a.sum(-1), None if d is None else d.to(dtype)


class _RelationKL(torch.autograd.Function):
    """Row lse, then one tile pass forms the KL and the gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, xt, xs, yt, ys, rb, cb, compile, grad):
        pair, k, (_, H, T, hd) = yt is not None, (xt if yt is None else yt).shape[1], xs.shape
        Xt, Xs, Yt, Ys = (_layout(v, k) for v in (xt, xs, *((yt, ys) if pair else (xt, xs))))
        G = H // k  # rows X (N, T*G, hd): a block of positions is a block of rows; Y (N, T, hd)
        lse_t, lse_s = _row_lse(xt, yt, Xt, Yt, G, rb, cb), _row_lse(xs, ys, Xs, Ys, G, rb, cb)
        need_x, need_y = (grad and ctx.needs_input_grad[i] for i in (1, 3 if pair else 1))
        gX = torch.zeros_like(Xs, dtype=lse_s.dtype) if need_x else None
        gY = (torch.zeros_like(Ys, dtype=lse_s.dtype) if pair else gX) if need_y else None
        a, tile = torch.zeros_like(lse_t), _compiled(_kl_tile, compile, True)
        for rows, cols, keep in _tiles(T, G, rb, cb, xs.device):  # contiguous lse: one graph
            a_r, d = tile(_mm(Xt[:, rows], Yt[:, cols].mT), _mm(Xs[:, rows], Ys[:, cols].mT),
                          lse_t[:, rows].contiguous(), lse_s[:, rows].contiguous(), keep,
                          hd ** -0.5, xs.dtype if need_x or need_y else None)
            a[:, rows] += a_r
            if gX is not None:
                _mm(d, Ys[:, cols], gX[:, rows])                     # dX = s D Y
            if gY is not None:
                _mm(d.mT, Xs[:, rows], gY[:, cols])                  # dY = s D^T X
        ctx.grads, ctx.meta = (gX, gY if pair else None), (xs.shape, xs.dtype, G)
        return (a - lse_t + lse_s).sum()

    @staticmethod
    def backward(ctx, grad):  # times grad s, undo _layout: (B*k, T*G, hd) -> (B,H,T,hd), cast
        (gX, gY), (xshape, dt, G), c = ctx.grads, ctx.meta, grad * ctx.meta[0][-1] ** -0.5
        B, H, T, hd = xshape
        if gX is not None:
            gX = (gX.view(B, -1, T, G, hd).transpose(2, 3) * c).to(dt).reshape(xshape)
        gY = None if gY is None else (gY * c).to(dt).view(B, -1, T, hd)
        return None, gX, None, gY, None, None, None, None


def relation_kl(xt, xs, yt=None, ys=None, block=(2048, 1024), compile=None):
    """LinearARD relation KL: sum over batch, heads and rows i of KL(P_t,i || P_s,i),
    P_i = softmax_{j<=i}(x_i . y_j / sqrt(hd)). Self relation (Q/Q, K/K, V/V) when y is None;
    pair (Q,K) = attention KL with GQA: x (B,H,T,hd), y (B,K,T,hd), H % K == 0, no repeat.
    Exact, memory linear in T: row lse (lse_kernel, else tiles), then one tile pass: KL_i = sum_j
    p_t,ij (s z_t,ij - s z_s,ij) - lse_t,i + lse_s,i; for a student that trains, D = p_s - p_t,
    dX = s D Y, dY = s D^T X (self: s (D + D^T) X), s = 1/sqrt(hd), in fp32. A kernel's lse is
    ours to fp32 rounding (~1e-6 rel.), so is the KL. block: tile (rows, cols) or edge, in
    positions; compile: torch.compile the tile body (default: on CUDA)."""
    y, (rb, cb) = (xt if yt is None else yt, xs if ys is None else ys), (
        (block, block) if isinstance(block, int) else block)
    if (xt.dim() != 4 or xt.shape != xs.shape or y[0].shape != y[1].shape or min(rb, cb) < 1
            or (yt is None) != (ys is None) or xt.shape[1] % y[0].shape[1]
            or xt.shape[0] != y[0].shape[0] or xt.shape[2:] != y[0].shape[2:]):
        raise ValueError(f"need x (B,H,T,hd), y None or (B,K,T,hd), H % K == 0, teacher shapes "
                         f"= student's, block >= 1; got {xt.shape} {xs.shape} {y[0].shape} "
                         f"{y[1].shape} {block}")
    return _RelationKL.apply(xt, xs, yt, ys, int(rb), int(cb), xs.is_cuda if compile is None
                             else bool(compile), torch.is_grad_enabled())


def relation_loss(cap_t, cap_s, layers, kinds=("q", "k", "v"), norm="own", **kw):
    """LinearARD loss (SPEC 3): mean over layers of sum over kinds of relation_kl / (B T heads).
    norm="own": heads of that relation (H for q, K for k and v); "query": H for all kinds, as
    LinearARD's code. cap = {"q": {l: (B,H,T,hd)}, "k": {l: (B,K,T,hd)}, "v": {...}}."""
    if norm not in ("own", "query") or not layers:
        raise ValueError(f'need norm "own" or "query" and >= 1 layer, got {norm!r}, {layers}')
    return sum(relation_kl(cap_t[k][l], cap_s[k][l], **kw)
               / cap_s["q" if norm == "query" else k][l][..., 0].numel()  # / (B T heads)
               for l in layers for k in kinds) / len(layers)


@torch.no_grad()
def attention_kl_per_layer(cap_t, cap_s, layers, **kw):
    """Per layer, mean over batch, query heads and rows of KL(A_t,i || A_s,i), A the causal
    softmax of q k^T / sqrt(hd) (relation_kl on the (q, k) pair): LongReD layer selection."""
    return [relation_kl(cap_t["q"][l], cap_s["q"][l], cap_t["k"][l], cap_s["k"][l], **kw).item()
            / cap_s["q"][l][..., 0].numel() for l in layers]  # / (B H T) rows


def select_layers(kl_per_layer, m):
    """LongReD layer selection: the last layer always, plus the m layers of largest attention KL
    among the others (M+1 layers: 6 at 32K, 3 at 128K). kl_per_layer[i] is layer i's KL."""
    if not 0 <= m < (n := len(kl_per_layer)):
        raise ValueError(f"m must be in [0, {n - 1}] for {n} layers, got {m}")
    return sorted(sorted(range(n - 1), key=lambda i: kl_per_layer[i], reverse=True)[:m]) + [n - 1]


# ---- hidden-state losses (LongReD) -----------------------------------------------------------

def hidden_cosine_loss(hs, ht):
    """LongReD L_short = sum_l (1 - mean_{b,t} cos(h_s,l[b,t], h_t,l[b,t])) over the selected
    layers, h_l (B,T,D) the residual after block l (last: final-norm output); fp32."""
    if len(hs) != len(ht) or not hs:
        raise ValueError(f"need equal non-empty lists of hidden states, got {len(hs)}, {len(ht)}")
    dt = torch.promote_types(hs[0].dtype, torch.float32)
    return sum(1 - F.cosine_similarity(s.to(dt), t.detach().to(dt), dim=-1).mean()
               for s, t in zip(hs, ht))


def s2l_loss(hs, ht):
    """LongReD L_s2l = 1 - mean_t cos(h_s, h_t) on the final-norm state (B,T,D) alone; the
    student ran on the skipped position ids, the teacher on 0..T_orig-1."""
    return hidden_cosine_loss([hs], [ht])


# ---- logit KD (SDLC), chunked through the LM head ---------------------------------------------

def _kd_chunk(zt, zs, tgt, tau, w_kd, w_ce, dtype):
    """One chunk of logits (C,V): sum over rows of KL(softmax(zt/tau) || softmax(zs/tau)), summed
    CE of zs on tgt (-100 ignored), dL/dzs = w_kd (p_s - p_t) + w_ce (softmax(zs) - onehot)."""
    ls = torch.log_softmax(zs / tau, -1)
    kl, ce, d = zs.new_zeros(()), zs.new_zeros(()), 0.0
    if zt is not None:
        lt = torch.log_softmax(zt / tau, -1)
        kl, d = (lt.exp() * (lt - ls)).sum(), w_kd * (ls.exp() - lt.exp())
    if tgt is not None:
        valid = (tgt != -100)[:, None]
        lp = ls if tau == 1.0 else torch.log_softmax(zs, -1)
        ce = -(lp.gather(-1, tgt.clamp(min=0)[:, None]) * valid).sum()
        hot = torch.arange(zs.shape[-1], device=zs.device) == tgt[:, None]
        d = d + w_ce * (lp.exp() - hot.to(lp.dtype)) * valid
    return kl, ce, d.to(dtype)


class _LogitKD(torch.autograd.Function):
    """Gradients are formed inside the chunk loop of forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, chunk, tau, targets, ce_weight, compile):
        N, need_h, need_w = hs.shape[0], ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        gh = torch.empty_like(hs) if need_h else None                 # (N, D)
        gw = torch.zeros_like(ws, dtype=acc) if need_w else None      # (V, D)
        w_kd = torch.tensor(tau / N, dtype=acc, device=hs.device)
        nvalid = (targets != -100).sum().clamp(min=1) if targets is not None else 1
        w_ce = ce_weight / torch.as_tensor(nvalid, device=hs.device).to(acc)
        kl, ce, body = hs.new_zeros((), dtype=acc), 0.0, _compiled(_kd_chunk, compile)
        for c0 in range(0, N, chunk):
            c1 = min(N, c0 + chunk)
            zt = _mm(ht[c0:c1], wt.T) if ht is not None else None      # (C, V) fp32
            zs = _mm(hs[c0:c1], ws.T)
            tgt = targets[c0:c1] if targets is not None else None      # (C,)
            kl_c, ce_c, d = body(zt, zs, tgt, tau, w_kd, w_ce, hs.dtype)  # d (C, V)
            del zt, zs  # 2 (C, V) fp32 buffers: free them before the GEMMs and the next chunk
            kl, ce = kl + kl_c, ce + ce_c
            if need_h:
                torch.mm(d, ws, out=gh[c0:c1])                        # dH = dZ W
            if need_w:
                _mm(d.T, hs[c0:c1], gw)                               # dW += dZ^T H
            del d
        ctx.grads = gh, gw.to(ws.dtype) if need_w else None
        return tau * tau * kl / N + w_ce * ce

    @staticmethod
    def backward(ctx, grad):
        gh, gw = (None if g is None else g * grad.to(g.dtype) for g in ctx.grads)
        return gh, None, gw, None, None, None, None, None, None


def logit_kd(hs, ht, ws, wt, chunk=2048, temperature=1.0, targets=None, ce_weight=0.0,
             compile=None):
    """SDLC logit KD: tau^2 / N sum_n KL(softmax(z_t,n / tau) || softmax(z_s,n / tau)), z = h W^T
    over the full vocabulary (tau^2 keeps the gradient scale, Hinton et al. 2015), plus
    ce_weight * mean CE(z_s, targets) over targets != -100 (at tau = 1). hs, ht (N,D); ws, wt
    (V,D), ws may be the tied embedding. Chunked over tokens: only (C,V) fp32 logits exist, the
    gradients are formed in the loop. ht = wt = None: chunked CE alone (needs ce_weight > 0).
    Under autocast the four are cast to its dtype as nn.Linear's would be (fp32 master weights
    made these GEMMs fp32: 21% of a 1B step); the loop then runs with autocast off (fp32 sums)."""
    kind = hs.device.type
    if torch.is_autocast_enabled(kind):
        hs, ht, ws, wt = (x if x is None else x.to(torch.get_autocast_dtype(kind))
                          for x in (hs, ht, ws, wt))
    t = (hs, ws) if ht is None else (ht, wt)
    if (hs.dim() != 2 or ws.shape[1:] != hs.shape[1:] or ws.dtype != hs.dtype
            or (ht is None) != (wt is None) or (t[0].shape, t[1].shape) != (hs.shape, ws.shape)
            or temperature <= 0 or chunk < 1):
        raise ValueError(f"need hs, ht (N,D), ws, wt (V,D) of one dtype, temperature > 0, "
                         f"chunk >= 1; got {hs.shape} {ws.shape} {hs.dtype} {ws.dtype}, "
                         f"{temperature}, {chunk}")
    if (targets is not None and targets.shape != hs.shape[:1]) or (ht is None and (
            targets is None or not ce_weight > 0)):
        raise ValueError("targets must be (N,) int64 (-100 = ignore); without a teacher give "
                         "targets and ce_weight > 0 (chunked CE)")
    with torch.autocast(kind, enabled=False):
        return _LogitKD.apply(hs, ht, ws, wt, int(chunk), float(temperature), targets,
                              float(ce_weight), hs.is_cuda if compile is None else bool(compile))
