"""Pictures of a pattern's mask (as the Sparse Transformer paper draws them): text or PNG."""

from __future__ import annotations

import io

import torch

from .patterns import PatternBase


def mask_rows(pattern: PatternBase, n: int, *, causal: bool = True, head: int = 0, heads: int = 1) -> torch.Tensor:
    """[n, n] boolean mask of one head, built from the pattern's rule (small n only)."""
    return pattern.resolve(head, heads).attends(torch.arange(n)[:, None], torch.arange(n)[None, :], causal)


def mask_text(pattern: PatternBase, n: int, *, causal: bool = True, head: int = 0, heads: int = 1) -> str:
    """One line per query: '#' for an attended key, '.' for a skipped one."""
    m = mask_rows(pattern, n, causal=causal, head=head, heads=heads)
    return "\n".join("".join("#" if x else "." for x in row) for row in m.tolist())


def mask_png(pattern: PatternBase, n: int, *, causal: bool = True, heads: int = 1) -> bytes:
    """A PNG with one panel per distinct head pattern (queries down, keys across)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(dict.fromkeys(pattern.resolve(h, heads) for h in range(heads)))
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, single in zip(axes[0], shown):
        ax.imshow(mask_rows(single, n, causal=causal).numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(_label(single), fontsize=8)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _label(pattern: PatternBase) -> str:
    data = pattern.describe()
    kind = data.pop("type")
    if kind == "union":
        return " + ".join(_label(p) for p in pattern.patterns)
    return kind + (f"({', '.join(f'{k}={v}' for k, v in data.items())})" if data else "")
