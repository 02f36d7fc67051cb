"""Loss-curve plots from metrics.jsonl rows (matplotlib, imported only when a plot is drawn).

One function draws both a single run's ``loss.png`` and ``compare``'s ``compare.png``: left
panel training loss against tokens (raw in a light line, an exponential moving average over
about 5% of the points on top), right panel validation loss at the evaluation steps.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_losses"]


def _ema(values: list[float], window: float) -> list[float]:
    """Exponential moving average with a time constant of ``window`` points (<= 1: raw)."""
    beta = 1 - 1 / max(1.0, window)
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_losses(
    runs: dict[str, list[dict]], path: str | Path, title: str = "", smooth: float = 0.05
) -> Path:
    """Draw training and validation loss of each run in ``runs`` ({label: metrics rows}).

    Rows are metrics.jsonl objects: those with ``loss`` give the training curve, those with
    ``val_loss`` the validation points; the x axis is ``tokens``. ``smooth`` is the EMA window
    of the training curve as a fraction of its points (0 draws it raw). Returns the written
    path (the image format follows its suffix).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [r for r in rows if r.get("loss") is not None]
        val = [r for r in rows if r.get("val_loss") is not None]
        if train:
            x = [r["tokens"] for r in train]
            y = [r["loss"] for r in train]
            ax_train.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax_train.plot(x, _ema(y, smooth * len(y)), color=color, label=label)
        if val:
            ax_val.plot(
                [r["tokens"] for r in val],
                [r["val_loss"] for r in val],
                "o-",
                color=color,
                label=label,
                markersize=3,
            )
    for ax, name in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    ax_train.set_title("training loss (light: raw, dark: moving average)")
    ax_val.set_title("validation loss")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
