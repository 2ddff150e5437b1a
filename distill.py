"""Distillation losses for RoPE restoration: pure functions, each docstring holds its formula.

Papers: LongReD (Dong et al., ACL 2025, arXiv 2502.07365), LinearARD (Yang et al.,
arXiv 2604.00004), SDLC (Huber et al., arXiv 2604.06070). The methods, with the data each term
sees, are in docs/METHODS.md; each section below names its part of it.
Legend: B batch, T time, D model, H query heads, K kv heads, hd head dim, V vocab, N rows of a
batched matmul, R x C one tile, s = 1/sqrt(hd).
Teacher inputs are constants: no gradient ever flows to them. Half inputs are multiplied with
fp32 output (cuBLAS out_dtype on CUDA); every logit, exp and sum is fp32 (fp64 stays fp64).
relation_kl runs distill_fast.py (a fused-kernel lse, a compiled tile body, a GQA row layout);
relation_kl_reference is the same algorithm in plain torch.
"""
import math

import torch
import torch.nn.functional as F

import distill_fast
from distill_fast import lse_kernel  # noqa: F401  (bench.py reports relation_kl's lse source)


# ---- Relation KL (LinearARD) ------------------------------------------------------------------

RELATION_TILE = (2048, 1024)  # relation_kl's tile (rows, cols) in positions


def relation_kl(xt, xs, yt=None, ys=None, block=RELATION_TILE, compile=None):
    """LinearARD relation KL (docs/METHODS.md, "Relation KL (LinearARD)"):

        L = sum_{b,h,i} KL(P_t,i || P_s,i),   P_i = softmax_{j<=i}(z_ij),   z_ij = s x_i . y_j

    A self relation (Q/Q, K/K, V/V) when y is None; the (q, k) pair is the attention KL, with
    GQA: x (B,H,T,hd), y (B,K,T,hd), H % K == 0, k not repeated. Exact and memory linear in T,
    in two passes over causal tiles (relation_kl_reference reads as plain torch):
      pass 1: lse_i = log sum_{j<=i} exp(z_ij) of teacher and student;
      pass 2: KL_i = sum_j p_t,ij (z_t,ij - z_s,ij) - lse_t,i + lse_s,i,  p = exp(z - lse),
              and for a student that trains D = p_s - p_t, dX = s D Y, dY = s D^T X
              (a self relation: dX = s (D + D^T) X); fp32 throughout.
    A fused kernel's lse is ours to fp32 rounding (~1e-6 relative), and so is the KL.
    Under autocast the inputs are cast to its dtype (bf16 in, fp32 accumulation).
    block: the tile (rows, cols) or its edge, in positions; compile: torch.compile the tile body
    (default: on CUDA)."""
    block_rows, block_cols = _tile_shape(block)
    _check_relation_inputs(xt, xs, yt, ys, block_rows, block_cols, block)
    if compile is None:
        compile = xs.is_cuda
    device_type = xs.device.type
    # a student with fp32 master weights hands over fp32 q (its RoPE runs in fp32), which would
    # make every tile GEMM an fp32 one (10x slower)
    xt, xs, yt, ys = _autocast_inputs(device_type, xt, xs, yt, ys)
    with torch.autocast(device_type, enabled=False):
        return distill_fast.relation_kl_fast(xt, xs, yt, ys, int(block_rows), int(block_cols),
                                             bool(compile))


def relation_kl_reference(xt, xs, yt=None, ys=None, block=RELATION_TILE):
    """relation_kl's KL and gradients by the same two passes in plain torch: y repeated to every
    query head (autograd sums each group's dY), the row lse by tiles, every tile masked, no
    compile, all in fp32 (fp64 stays fp64). Slower; the tests compare relation_kl with it."""
    block_rows, block_cols = _tile_shape(block)
    _check_relation_inputs(xt, xs, yt, ys, block_rows, block_cols, block)
    if yt is None:  # a self relation: the rows are their own columns
        yt = xt
        ys = xs
    B, H, T, hd = xs.shape
    group_size = H // yt.shape[1]
    dtype = torch.promote_types(xs.dtype, torch.float32)
    x_teacher = xt.detach().to(dtype).reshape(B * H, T, hd)
    x_student = xs.to(dtype).reshape(B * H, T, hd)
    y_teacher = yt.detach().to(dtype).repeat_interleave(group_size, 1).reshape(B * H, T, hd)
    y_student = ys.to(dtype).repeat_interleave(group_size, 1).reshape(B * H, T, hd)
    return _RelationKLReference.apply(x_teacher, x_student, y_teacher, y_student,
                                      block_rows, block_cols)


class _RelationKLReference(torch.autograd.Function):
    """sum_{n,i} KL(P_t,i || P_s,i) of rows x (N,T,hd) and columns y (N,T,hd), one dtype."""

    @staticmethod
    def forward(ctx, x_teacher, x_student, y_teacher, y_student, block_rows, block_cols):
        T = x_student.shape[1]
        s = x_student.shape[-1] ** -0.5
        # Pass 1: lse_i = log sum_{j<=i} exp(z_ij), z_ij = s x_i . y_j, of both models (N,T)
        lse_teacher = _row_lse(x_teacher, y_teacher, block_rows, block_cols)
        lse_student = _row_lse(x_student, y_student, block_rows, block_cols)
        # Pass 2: KL_i = sum_j p_t,ij (z_t,ij - z_s,ij) - lse_t,i + lse_s,i, p = exp(z - lse);
        # dKL/dz_s = D = p_s - p_t, so dX = s D Y and dY = s D^T X.
        expected_gap = torch.zeros_like(lse_teacher)  # sum_j p_t,ij (z_t,ij - z_s,ij)
        grad_x = torch.zeros_like(x_student)
        grad_y = torch.zeros_like(y_student)
        for rows, cols in _causal_tiles(T, block_rows, block_cols):
            causal = _causal_mask(rows, cols, x_student.device)  # (R,C)
            logits_teacher = _tile_logits(x_teacher, y_teacher, rows, cols)  # (N,R,C)
            logits_student = _tile_logits(x_student, y_student, rows, cols)
            p_teacher = torch.exp(logits_teacher - lse_teacher[:, rows, None])
            p_student = torch.exp(logits_student - lse_student[:, rows, None])
            gap = torch.where(causal, p_teacher * (logits_teacher - logits_student), 0.0)
            expected_gap[:, rows] += gap.sum(-1)
            grad_logits = torch.where(causal, p_student - p_teacher, 0.0)  # D
            grad_x[:, rows] += s * (grad_logits @ y_student[:, cols])
            grad_y[:, cols] += s * (grad_logits.mT @ x_student[:, rows])
        ctx.grad_x = grad_x
        ctx.grad_y = grad_y
        kl_rows = expected_gap - lse_teacher + lse_student  # KL_i (N,T)
        return kl_rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        return None, grad_loss * ctx.grad_x, None, grad_loss * ctx.grad_y, None, None


def _row_lse(x, y, block_rows, block_cols):
    """Pass 1: lse_i = log sum_{j<=i} exp(s x_i . y_j) (N,T), a running logaddexp over tiles."""
    T = x.shape[1]
    lse = torch.full(x.shape[:2], -math.inf, dtype=x.dtype, device=x.device)
    for rows, cols in _causal_tiles(T, block_rows, block_cols):
        causal = _causal_mask(rows, cols, x.device)
        logits = _tile_logits(x, y, rows, cols).masked_fill(~causal, -math.inf)
        lse[:, rows] = torch.logaddexp(lse[:, rows], logits.logsumexp(-1))
    return lse


def _causal_tiles(T, block_rows, block_cols):
    """(rows, cols) slices of the tiles that hold a j <= i of the T x T map."""
    for row_start in range(0, T, block_rows):
        row_end = min(T, row_start + block_rows)
        for col_start in range(0, row_end, block_cols):
            col_end = min(row_end, col_start + block_cols)
            yield slice(row_start, row_end), slice(col_start, col_end)


def _causal_mask(rows, cols, device):
    """(R,C) bool, true where column j <= row i."""
    i = torch.arange(rows.start, rows.stop, device=device)
    j = torch.arange(cols.start, cols.stop, device=device)
    return j[None, :] <= i[:, None]


def _tile_logits(x, y, rows, cols):
    """z_ij = s x_i . y_j on one tile, (N,R,C)."""
    s = x.shape[-1] ** -0.5
    return s * (x[:, rows] @ y[:, cols].mT)


def _tile_shape(block):
    """(rows, cols) of a tile given as a pair or as one edge."""
    if isinstance(block, int):
        return block, block
    rows, cols = block
    return rows, cols


def _check_relation_inputs(xt, xs, yt, ys, block_rows, block_cols, block):
    """ValueError unless x (B,H,T,hd), y None or (B,K,T,hd), H % K == 0, teacher shapes equal
    the student's, and both tile edges >= 1."""
    y_teacher = xt if yt is None else yt
    y_student = xs if ys is None else ys
    bad = (xt.dim() != 4
           or xt.shape != xs.shape
           or y_teacher.shape != y_student.shape
           or min(block_rows, block_cols) < 1
           or (yt is None) != (ys is None)
           or xt.shape[1] % y_teacher.shape[1]
           or xt.shape[0] != y_teacher.shape[0]
           or xt.shape[2:] != y_teacher.shape[2:])
    if bad:
        raise ValueError(f"need x (B,H,T,hd), y None or (B,K,T,hd), H % K == 0, teacher shapes "
                         f"= student's, block >= 1; got {xt.shape} {xs.shape} "
                         f"{y_teacher.shape} {y_student.shape} {block}")


def relation_loss(cap_t, cap_s, layers, kinds=("q", "k", "v"), norm="own",
                  tile_elements=2**28, **kw):
    """LinearARD loss (docs/METHODS.md, "Relation KL (LinearARD)"):

        L_rel = (1 / |layers|) sum_{l in layers} sum_{X in kinds} KL_rel(X_l) / (B T heads_X)

    KL_rel = relation_kl (kw go to it). heads_X: norm="own", the heads of that relation (H for
    q, K for k and v); norm="query", H for every kind, as LinearARD's code divides.
    cap = {"q": {l: (B,H,T,hd)}, "k": {l: (B,K,T,hd)}, "v": {...}}.

    Relations of one shape and one divisor B T heads_X are terms of one sum, so they are stacked
    along the batch axis and go through relation_kl together: a few large calls instead of one
    small call per layer and kind (3 L of them). A call stacks as many as keep one fp32 tile of
    logits (stacked rows x tile) within tile_elements (1 GiB by default); a tile step holds a few
    such tensors at once (two logit tiles, D, the compiled body's), so plan for ~4 GiB."""
    if norm not in ("own", "query") or not layers:
        raise ValueError(f'need norm "own" or "query" and >= 1 layer, got {norm!r}, {layers}')
    by_shape = {}  # (shape, divisor) -> the relations that share them, as (kind, layer)
    for layer in layers:
        for kind in kinds:
            heads_kind = "q" if norm == "query" else kind
            divisor = cap_s[heads_kind][layer][..., 0].numel()  # B T heads_X
            shape = tuple(cap_s[kind][layer].shape)
            by_shape.setdefault((shape, divisor), []).append((kind, layer))
    block_rows, block_cols = _tile_shape(kw.get("block", RELATION_TILE))
    total = 0
    for (shape, divisor), relations in by_shape.items():
        B, heads, T, hd = shape
        elements_per_relation = B * heads * min(block_rows, T) * min(block_cols, T)
        per_call = max(1, tile_elements // elements_per_relation)
        for first in range(0, len(relations), per_call):
            call = relations[first:first + per_call]
            teacher = torch.cat([cap_t[kind][layer] for kind, layer in call])  # (n B,heads,T,hd)
            student = torch.cat([cap_s[kind][layer] for kind, layer in call])
            total = total + relation_kl(teacher, student, **kw) / divisor
    return total / len(layers)


# ---- Layer selection (LongReD) ----------------------------------------------------------------

@torch.no_grad()
def attention_kl_per_layer(cap_t, cap_s, layers, **kw):
    """LongReD's layer score (docs/METHODS.md, "Layer selection (LongReD)"), per layer l:

        KL_l = (1 / (B H T)) sum_{b,h,i} KL(A_t,i || A_s,i),   A_i = softmax_{j<=i}(s q_i . k_j)

    relation_kl on the (q, k) pair of each layer (kw go to it); floats, no gradient."""
    kl_per_layer = []
    for layer in layers:
        kl = relation_kl(cap_t["q"][layer], cap_s["q"][layer],
                         cap_t["k"][layer], cap_s["k"][layer], **kw)
        rows = cap_s["q"][layer][..., 0].numel()  # B H T
        kl_per_layer.append(kl.item() / rows)
    return kl_per_layer


def select_layers(kl_per_layer, m):
    """LongReD layer selection (docs/METHODS.md, "Layer selection (LongReD)"):

        layers = sorted(the m layers of largest KL_l among 0 .. L-2) + [L-1]

    the last layer always (M+1 layers: 6 at 32K, 3 at 128K); kl_per_layer[l] is KL_l."""
    num_layers = len(kl_per_layer)
    if not 0 <= m < num_layers:
        raise ValueError(f"m must be in [0, {num_layers - 1}] for {num_layers} layers, got {m}")
    last = num_layers - 1
    by_kl = sorted(range(last), key=lambda layer: kl_per_layer[layer], reverse=True)
    return sorted(by_kl[:m]) + [last]


# ---- Hidden-state losses (LongReD) ------------------------------------------------------------

def hidden_cosine_loss(hs, ht):
    """LongReD L_short (docs/METHODS.md, "Hidden-state losses (LongReD)"):

        L_short = sum_{l in layers} (1 - mean_{b,t} cos(h_s,l[b,t], h_t,l[b,t]))

    hs, ht: lists of (B,T,D), h_l the residual after block l (the last: the final-norm output);
    fp32, the teacher side detached."""
    if len(hs) != len(ht) or not hs:
        raise ValueError(f"need equal non-empty lists of hidden states, got {len(hs)}, {len(ht)}")
    dtype = torch.promote_types(hs[0].dtype, torch.float32)
    loss = 0
    for student, teacher in zip(hs, ht):
        cosine = F.cosine_similarity(student.to(dtype), teacher.detach().to(dtype), dim=-1)
        loss = loss + (1 - cosine.mean())
    return loss


def s2l_loss(hs, ht):
    """LongReD L_s2l (docs/METHODS.md, "Hidden-state losses (LongReD)"):

        L_s2l = 1 - mean_{b,t} cos(h_s[b,t], h_t[b,t])

    on the final-norm state (B,T,D) alone; the student ran on the skipped position ids, the
    teacher on 0..T_orig-1."""
    return hidden_cosine_loss([hs], [ht])


# ---- Logit KD (SDLC), chunked through the LM head ---------------------------------------------

def logit_kd(hs, ht, ws, wt, chunk=2048, temperature=1.0, targets=None, ce_weight=0.0,
             compile=None):
    """SDLC logit KD (docs/METHODS.md, "Logit KD (SDLC)"), z = h W^T over the full vocabulary:

        L = tau^2 / N sum_n KL(softmax(z_t,n / tau) || softmax(z_s,n / tau))
            + ce_weight * mean_{n: target_n != -100} CE(z_s,n, target_n)

    tau = temperature (tau^2 keeps the gradient scale, Hinton et al. 2015); CE at tau = 1.
    hs, ht (N,D); ws, wt (V,D), ws may be the tied embedding. Chunked over tokens: only (C,V)
    fp32 logits exist, and dL/dz_s = (tau/N) (p_s - p_t) + ce_weight (softmax(z_s) - onehot) /
    n_valid is formed in the loop. ht = wt = None: the chunked CE alone (needs ce_weight > 0).
    Under autocast the four are cast to its dtype as nn.Linear's would be (fp32 master weights
    made these GEMMs fp32: 21% of a 1B step); the loop then runs with autocast off (fp32 sums)."""
    device_type = hs.device.type
    hs, ht, ws, wt = _autocast_inputs(device_type, hs, ht, ws, wt)
    _check_kd_inputs(hs, ht, ws, wt, chunk, temperature, targets, ce_weight)
    if compile is None:
        compile = hs.is_cuda
    with torch.autocast(device_type, enabled=False):
        return _LogitKD.apply(hs, ht, ws, wt, int(chunk), float(temperature), targets,
                              float(ce_weight), bool(compile))


def _autocast_inputs(device_type, *tensors):
    """The tensors cast to the autocast dtype when autocast is on, as an nn.Linear's inputs would
    be; as they are otherwise (None stays None)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    autocast_dtype = torch.get_autocast_dtype(device_type)
    return tuple(_to_dtype(tensor, autocast_dtype) for tensor in tensors)


def _to_dtype(tensor, dtype):
    """tensor cast to dtype; None stays None."""
    if tensor is None:
        return None
    return tensor.to(dtype)


def _check_kd_inputs(hs, ht, ws, wt, chunk, temperature, targets, ce_weight):
    """ValueError unless hs, ht (N,D) and ws, wt (V,D) of one dtype, temperature > 0, chunk >= 1,
    targets (N,) or None, and something to learn (a teacher, or targets with ce_weight > 0)."""
    teacher_h = hs if ht is None else ht  # no teacher: nothing to compare
    teacher_w = ws if ht is None else wt
    bad = (hs.dim() != 2
           or ws.shape[1:] != hs.shape[1:]
           or ws.dtype != hs.dtype
           or (ht is None) != (wt is None)
           or teacher_h.shape != hs.shape
           or teacher_w.shape != ws.shape
           or temperature <= 0
           or chunk < 1)
    if bad:
        raise ValueError(f"need hs, ht (N,D), ws, wt (V,D) of one dtype, temperature > 0, "
                         f"chunk >= 1; got {hs.shape} {ws.shape} {hs.dtype} {ws.dtype}, "
                         f"{temperature}, {chunk}")
    targets_misshapen = targets is not None and targets.shape != hs.shape[:1]
    nothing_to_learn = ht is None and (targets is None or not ce_weight > 0)
    if targets_misshapen or nothing_to_learn:
        raise ValueError("targets must be (N,) int64 (-100 = ignore); without a teacher give "
                         "targets and ce_weight > 0 (chunked CE)")


def _kd_chunk(logits_teacher, logits_student, targets, tau, kd_weight, ce_weight, grad_dtype):
    """One chunk of logits (C,V) (teacher None: CE alone; targets None: KL alone). Returns
    sum_n KL(softmax(z_t,n / tau) || softmax(z_s,n / tau)), sum_n CE(z_s,n, target_n) over
    targets != -100, and dL/dz_s = kd_weight (p_s - p_t) + ce_weight (softmax(z_s) - onehot)
    in grad_dtype."""
    log_p_student = torch.log_softmax(logits_student / tau, -1)
    kl = logits_student.new_zeros(())
    ce = logits_student.new_zeros(())
    grad_logits = 0.0
    if logits_teacher is not None:
        log_p_teacher = torch.log_softmax(logits_teacher / tau, -1)
        p_teacher = log_p_teacher.exp()
        kl = (p_teacher * (log_p_teacher - log_p_student)).sum()
        grad_logits = kd_weight * (log_p_student.exp() - p_teacher)
    if targets is not None:
        valid = (targets != -100)[:, None]
        log_p = log_p_student  # CE at tau = 1
        if tau != 1.0:
            log_p = torch.log_softmax(logits_student, -1)
        ce = -(log_p.gather(-1, targets.clamp(min=0)[:, None]) * valid).sum()
        vocab = torch.arange(logits_student.shape[-1], device=logits_student.device)
        one_hot = (vocab == targets[:, None]).to(log_p.dtype)
        grad_logits = grad_logits + ce_weight * (log_p.exp() - one_hot) * valid
    return kl, ce, grad_logits.to(grad_dtype)


class _LogitKD(torch.autograd.Function):
    """Chunks of tokens: each chunk's (C,V) logits give its KL, its CE and dL/dz_s, whose GEMMs
    with W and H are dL/dH and dL/dW; backward only scales them."""

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, chunk, tau, targets, ce_weight, compile):
        N = hs.shape[0]
        sum_dtype = torch.float64 if hs.dtype == torch.float64 else torch.float32
        grad_h = torch.empty_like(hs) if ctx.needs_input_grad[0] else None  # (N, D)
        grad_w = torch.zeros_like(ws, dtype=sum_dtype) if ctx.needs_input_grad[2] else None
        # the KL term of dL/dz_s: tau^2/N times (p_s - p_t)/tau
        kd_weight = torch.tensor(tau / N, dtype=sum_dtype, device=hs.device)
        ce_weight_per_token = ce_weight / _valid_target_count(targets, hs.device).to(sum_dtype)
        kl_sum = hs.new_zeros((), dtype=sum_dtype)
        ce_sum = 0.0
        chunk_body = distill_fast.compiled_or_eager(_kd_chunk, compile)
        for start in range(0, N, chunk):
            tokens = slice(start, min(N, start + chunk))
            logits_teacher = _chunk_logits(ht, wt, tokens)  # (C, V) fp32; None: no teacher
            logits_student = _chunk_logits(hs, ws, tokens)
            targets_chunk = None if targets is None else targets[tokens]  # (C,)
            kl_chunk, ce_chunk, grad_logits = chunk_body(
                logits_teacher, logits_student, targets_chunk, tau, kd_weight,
                ce_weight_per_token, hs.dtype)  # grad_logits (C, V)
            del logits_teacher, logits_student  # free 2 (C, V) fp32 buffers before the GEMMs
            kl_sum = kl_sum + kl_chunk
            ce_sum = ce_sum + ce_chunk
            if grad_h is not None:
                torch.mm(grad_logits, ws, out=grad_h[tokens])  # dH = dZ W
            if grad_w is not None:
                distill_fast.matmul_fp32(grad_logits.T, hs[tokens], grad_w)  # dW += dZ^T H
            del grad_logits
        ctx.grad_h = grad_h
        ctx.grad_w = _to_dtype(grad_w, ws.dtype)
        kd_loss = tau * tau * kl_sum / N
        ce_loss = ce_weight_per_token * ce_sum
        return kd_loss + ce_loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h = _times(ctx.grad_h, grad_loss)
        grad_w = _times(ctx.grad_w, grad_loss)
        return grad_h, None, grad_w, None, None, None, None, None, None


def _chunk_logits(h, w, tokens):
    """z = h W^T (C,V) of one chunk of tokens, fp32 (fp64 stays fp64); None when h is None."""
    if h is None:
        return None
    return distill_fast.matmul_fp32(h[tokens], w.T)


def _valid_target_count(targets, device):
    """n_valid: the number of targets != -100, at least 1 (1 without targets), on device."""
    if targets is None:
        return torch.as_tensor(1, device=device)
    count = (targets != -100).sum().clamp(min=1)
    return torch.as_tensor(count, device=device)


def _times(grad, grad_loss):
    """grad * grad_loss in grad's dtype; None stays None."""
    if grad is None:
        return None
    return grad * grad_loss.to(grad.dtype)
