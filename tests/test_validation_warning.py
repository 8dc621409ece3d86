"""`decay_warning`: a validation curve that rises, then decays while the loss falls."""

from __future__ import annotations

from mfbatch.training.validation import decay_warning


def _curve(values: list[float | None], losses: list[float] | None = None):
    losses = losses or [1.0 - 0.01 * e for e in range(len(values))]
    return [(e + 1, loss, v) for e, (loss, v) in enumerate(zip(losses, values, strict=True))]


def test_a_peak_then_a_long_decay_under_a_falling_loss_is_flagged() -> None:
    # Issue 23's shape: up to 0.1446 at epoch 15, down to 0.1185 by epoch 80, every 5.
    values: list[float | None] = []
    for epoch in range(1, 81):
        if epoch % 5:
            values.append(None)
        elif epoch <= 15:
            values.append(0.10 + 0.0446 * epoch / 15)
        else:
            values.append(0.1446 - (0.1446 - 0.1185) * (epoch - 15) / 65)
    line = decay_warning(_curve(values), "Recall@20")
    assert line is not None and "\n" not in line
    assert "peaked at epoch 15 (0.1446)" in line and "18% to 0.1185 by epoch 80" in line


def test_healthy_or_ambiguous_curves_are_not_flagged() -> None:
    rising = [0.1, 0.12, 0.13, 0.14, 0.145, 0.15]
    assert decay_warning(_curve(rising), "Recall@20") is None
    # Down 3% only: noise, not a symptom.
    small = [0.1, 0.15, 0.149, 0.148, 0.147, 0.1455]
    assert decay_warning(_curve(small), "Recall@20") is None
    # Down 20%, but the loss rose with it: divergence or a schedule, not this symptom.
    decayed = [0.1, 0.15, 0.14, 0.13, 0.125, 0.12]
    rising_loss = [1.0, 0.9, 0.95, 1.0, 1.05, 1.1]
    assert decay_warning(_curve(decayed, rising_loss), "Recall@20") is None
    assert decay_warning(_curve(decayed), "Recall@20") is not None
    # Best at the very first check (nothing rose) or only two checks after the peak.
    assert decay_warning(_curve([0.15, 0.14, 0.13, 0.12, 0.11]), "Recall@20") is None
    assert decay_warning(_curve([0.1, 0.12, 0.15, 0.13, 0.12]), "Recall@20") is None
