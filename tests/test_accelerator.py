"""mmgcs.accelerator: the mixed precision a run's `auto` resolves to (what `accelerate launch --mixed_precision`
asked for, else bf16/fp16 on a GPU that has it, else none)."""

from __future__ import annotations

import torch

from mmgcs.accelerator import resolve_mixed_precision


def test_mixed_precision(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no` wins
    assert resolve_mixed_precision("auto") == "no"
