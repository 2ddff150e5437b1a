"""The results scripts' own arithmetic against the project's functions."""
import importlib.util
import math
import os

import torch

import distill
from model import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "results", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnosis_losses_equal_relation_loss():
    """linearard_diagnosis derives L_rel (own and query) from its per-layer values: the same
    numbers as distill.relation_loss."""
    diagnosis = load_script("linearard_diagnosis")
    cfg = LlamaConfig(n_heads=6, n_kv_heads=2, head_dim=4, n_layers=3)
    g = torch.Generator().manual_seed(0)
    cap_t = {}
    cap_s = {}
    for kind, heads in (("q", 6), ("k", 2), ("v", 2)):
        cap_t[kind] = {l: torch.randn(2, heads, 9, 4, generator=g, dtype=torch.float64)
                       for l in range(3)}
        cap_s[kind] = {l: torch.randn(2, heads, 9, 4, generator=g, dtype=torch.float64)
                       for l in range(3)}
    table = diagnosis.per_layer(cap_t, cap_s, [0, 1, 2])
    losses = diagnosis.losses(table, cfg)
    for norm in ("own", "query"):
        reference = distill.relation_loss(cap_t, cap_s, [0, 1, 2], norm=norm).item()
        assert math.isclose(losses[f"loss_{norm}"], reference, rel_tol=1e-12)
