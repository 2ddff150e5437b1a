"""Distillation losses for RoPE restoration: pure functions, the maths in each docstring.

Papers: LongReD (Dong et al., ACL 2025, arXiv 2502.07365), LinearARD (Yang et al.,
arXiv 2604.00004), SDLC (Huber et al., arXiv 2604.06070). Legend: B batch, T time, D model,
H query heads, K kv heads, hd head dim, V vocab, N rows of a batched matmul, R x C one tile.
Teacher inputs are constants: no gradient ever flows to them. Half inputs are multiplied with
fp32 output (cuBLAS out_dtype on CUDA); every logit, exp and sum is fp32 (fp64 stays fp64).
"""
import functools
import math
import warnings

import torch
import torch.nn.functional as F


def _mm(a, b):
    """a @ b for (R,K)@(K,C) or (N,R,K)@(N,K,C); fp32 output for half operands."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_(acc, a, b):
    """acc += a @ b, acc fp32 while a, b may be half: in-place cuBLAS accumulation in fp32."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:  # a self of dtype out_dtype is accepted from torch 2.10 on
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError):
            return acc.add_(a @ b)  # older torch: one half rounding per chunk, the sum stays fp32
    return acc.add_(a.float() @ b.float())


@functools.cache
def _compiled(fn, on):
    """fn, or torch.compile(fn) when on; if compiling fails, warn once and run fn eagerly."""
    if not on:
        return fn
    compiled, failed = torch.compile(fn, dynamic=False, fullgraph=True), []

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

def _stats_tile(zt, zs, keep, scale, m_t, l_t, a_t, m_s, l_s):
    """Fold one tile into the online row statistics (flash-style rescaling by the new max).
    zt, zs (N,R,C) raw dot products, keep (R,C) causal mask or None; per row (N,R), z = s x.y:
    m = max_j z_j, l = sum_j e^(z_j - m), a = sum_j e^(zt_j - m_t) (zt_j - zs_j)."""
    zt, zs = zt * scale, zs * scale
    diff = zt - zs
    if keep is not None:  # diagonal tile: columns j > i drop out of both softmaxes
        zt, zs = zt.masked_fill(~keep, -math.inf), zs.masked_fill(~keep, -math.inf)
        diff = diff.masked_fill(~keep, 0.0)
    new_t, new_s = torch.maximum(m_t, zt.amax(-1)), torch.maximum(m_s, zs.amax(-1))
    e_t, r_t = torch.exp(zt - new_t[..., None]), torch.exp(m_t - new_t)
    l_t = l_t * r_t + e_t.sum(-1)
    a_t = a_t * r_t + (e_t * diff).sum(-1)
    l_s = l_s * torch.exp(m_s - new_s) + torch.exp(zs - new_s[..., None]).sum(-1)
    return new_t, l_t, a_t, new_s, l_s


def _grad_tile(zt, zs, lse_t, lse_s, coef, keep, scale, dtype):
    """D = coef (p_s - p_t) = dKL/dz_s on one tile, p = exp(s z - lse), 0 above the diagonal."""
    d = torch.exp(zs * scale - lse_s[..., None]) - torch.exp(zt * scale - lse_t[..., None])
    if keep is not None:
        d = torch.where(keep, d, 0.0)
    return (d * coef).to(dtype)


def _tiles(T, G, block, device):
    """Causal tiles in row-block order: (rows, cols, keep). Positions [p0,p1) are rows
    [p0 G, p1 G); column blocks stop at the diagonal tile, the only one with a mask (R,C)."""
    for p0 in range(0, T, block):
        p1 = min(T, p0 + block)
        r = torch.arange((p1 - p0) * G, device=device) // G  # position of each row, minus p0
        for c0 in range(0, p1, block):
            keep = r[:, None] >= torch.arange(p1 - p0, device=device) if c0 == p0 else None
            yield slice(p0 * G, p1 * G), slice(c0, min(T, c0 + block)), keep


def _layout(x, k):
    """(B,H,T,hd) -> (B*k, T*G, hd), G = H/k: the G query heads of a kv head interleaved per
    position, so a block of positions is a block of rows and the kv side is never repeated."""
    B, H, T, hd = x.shape
    return x.reshape(B, k, H // k, T, hd).transpose(2, 3).reshape(B * k, T * (H // k), hd)


def _operands(xt, xs, yt, ys):
    """Row operands X (N, T*G, hd), column operands Y (N, T, hd) of teacher and student; G."""
    k = xt.shape[1] if yt is None else yt.shape[1]
    Xt, Xs = _layout(xt, k), _layout(xs, k)
    Yt, Ys = (Xt, Xs) if yt is None else (_layout(yt, k), _layout(ys, k))
    return Xt, Xs, Yt, Ys, Xs.shape[1] // Ys.shape[1]


class _RelationKL(torch.autograd.Function):
    """Forward keeps per-row log-sum-exps only; backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, xt, xs, yt, ys, block, compile):
        Xt, Xs, Yt, Ys, G = _operands(xt, xs, yt, ys)
        (N, TG, _), scale = Xs.shape, xs.shape[-1] ** -0.5
        acc = torch.float64 if xs.dtype == torch.float64 else torch.float32
        lse_t, lse_s = Xs.new_empty(N, TG, dtype=acc), Xs.new_empty(N, TG, dtype=acc)
        kl, tile = Xs.new_zeros((), dtype=acc), _compiled(_stats_tile, compile)
        for rows, cols, keep in _tiles(TG // G, G, block, xs.device):
            if cols.start == 0:  # a new row block: m = -inf, l = a = 0
                st = [Xs.new_full((N, rows.stop - rows.start), v, dtype=acc)
                      for v in (-math.inf, 0, 0, -math.inf, 0)]
            st = tile(_mm(Xt[:, rows], Yt[:, cols].mT), _mm(Xs[:, rows], Ys[:, cols].mT),
                      keep, scale, *st)                   # logits (N, R, C), freed right after
            if keep is not None:  # the diagonal tile closes the row block
                m_t, l_t, a_t, m_s, l_s = st
                lse_t[:, rows], lse_s[:, rows] = m_t + l_t.log(), m_s + l_s.log()
                kl += (a_t / l_t - lse_t[:, rows] + lse_s[:, rows]).sum()
        ctx.save_for_backward(xt, xs, yt, ys, lse_t, lse_s)
        ctx.block, ctx.compile = block, compile  # backward recomputes with the same tiles
        return kl

    @staticmethod
    def backward(ctx, grad):
        xt, xs, yt, ys, lse_t, lse_s = ctx.saved_tensors
        Xt, Xs, Yt, Ys, G = _operands(xt, xs, yt, ys)
        pair, need_x, need_y = yt is not None, ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        gX = torch.zeros_like(Xs, dtype=lse_s.dtype) if need_x else None
        gY = gX if not pair else (torch.zeros_like(Ys, dtype=lse_s.dtype) if need_y else None)
        if gX is None and gY is None:  # only a teacher asked for a gradient: it gets none
            return None, None, None, None, None, None
        scale = xs.shape[-1] ** -0.5
        tile, coef = _compiled(_grad_tile, ctx.compile), (grad * scale).to(lse_s.dtype)
        for rows, cols, keep in _tiles(Ys.shape[1], G, ctx.block, xs.device):
            d = tile(_mm(Xt[:, rows], Yt[:, cols].mT), _mm(Xs[:, rows], Ys[:, cols].mT),
                     lse_t[:, rows], lse_s[:, rows], coef, keep, scale, xs.dtype)  # (N, R, C)
            if gX is not None:                                       # dX = s D Y
                gX[:, rows] += _mm(d, Ys[:, cols])
            if gY is not None:                                       # dY = s D^T X
                gY[:, cols] += _mm(d.mT, Xs[:, rows])
        if need_x:  # undo _layout: (B*k, T*G, hd) -> (B,H,T,hd)
            (B, H, T, hd), k = xs.shape, Ys.shape[0] // xs.shape[0]
            gX = gX.reshape(B, k, T, G, hd).transpose(2, 3).reshape(B, H, T, hd).to(xs.dtype)
        gY = gY.reshape(ys.shape).to(ys.dtype) if pair and need_y else None
        return None, gX, None, gY, None, None


def relation_kl(xt, xs, yt=None, ys=None, block=1024, compile=None):
    """LinearARD relation KL: sum over batch, heads and rows i of KL(P_t,i || P_s,i),
    P_i = softmax_{j<=i}(x_i . y_j / sqrt(hd)). Self relation (Q/Q, K/K, V/V) when y is None;
    pair (Q,K) = attention KL with GQA: x (B,H,T,hd), y (B,K,T,hd), H % K == 0, no repeat.
    Exact, memory linear in T: forward keeps lse_t, lse_s per row and KL_i = sum_j p_t,ij
    (z_t,ij - z_s,ij) - lse_t,i + lse_s,i; backward recomputes tiles, D = p_s - p_t,
    dX = s D Y, dY = s D^T X (self: s (D + D^T) X), s = 1/sqrt(hd). block: tile edge in
    positions; compile: torch.compile the tile body (default: on CUDA only)."""
    y = (xt if yt is None else yt, xs if ys is None else ys)
    if (xt.dim() != 4 or xt.shape != xs.shape or y[0].shape != y[1].shape or block < 1
            or (yt is None) != (ys is None) or xt.shape[1] % y[0].shape[1]
            or xt.shape[0] != y[0].shape[0] or xt.shape[2:] != y[0].shape[2:]):
        raise ValueError(f"need x (B,H,T,hd), optional y (B,K,T,hd) with H % K == 0, teacher "
                         f"shape = student shape, block >= 1; got x {xt.shape} {xs.shape}, "
                         f"y {y[0].shape} {y[1].shape}, block {block}")
    compile = xs.is_cuda if compile is None else bool(compile)
    return _RelationKL.apply(xt, xs, yt, ys, int(block), compile)


def relation_loss(cap_t, cap_s, layers, kinds=("q", "k", "v"), norm="own", **kw):
    """LinearARD loss (SPEC 3): mean over layers of sum over kinds of relation_kl / (B T heads).
    norm="own": heads of that relation (H for q, K for k and v); "query": H for all kinds, as
    LinearARD's code. cap = {"q": {l: (B,H,T,hd)}, "k": {l: (B,K,T,hd)}, "v": {...}}."""
    if norm not in ("own", "query") or not layers:
        raise ValueError(f'need norm "own" or "query" and >= 1 layer, got {norm!r}, {layers}')
    total = 0.0
    for l in layers:
        for kind in kinds:
            rows = cap_s["q" if norm == "query" else kind][l][..., 0].numel()  # B T heads
            total = total + relation_kl(cap_t[kind][l], cap_s[kind][l], **kw) / rows
    return total / len(layers)


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
    top = sorted(range(n - 1), key=lambda i: kl_per_layer[i], reverse=True)[:m]
    return sorted(top) + [n - 1]


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
                _addmm_(gw, d.T, hs[c0:c1])                           # dW += dZ^T H
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
    gradients are formed in the loop. ht = wt = None: chunked CE alone (needs ce_weight > 0)."""
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
    compile = hs.is_cuda if compile is None else bool(compile)
    return _LogitKD.apply(hs, ht, ws, wt, int(chunk), float(temperature), targets,
                          float(ce_weight), compile)
