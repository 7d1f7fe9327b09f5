"""Pictures with matplotlib, an optional dependency (`pip install minivgg[plot]`).

`import_pyplot` is the one way minivgg gets matplotlib: with the file-only Agg backend (no
display needed) and a clear ImportError when it is missing. `plot_curves` draws a run's
metrics.csv: training writes it as metrics.png after every epoch, and
`examples/visualize.py curves` draws any metrics.csv.
"""

import numpy as np

from minivgg.checkpoint import atomic_write
from minivgg.metrics import metric_columns

MISSING = "this picture needs matplotlib: pip install matplotlib"


def import_pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError with `MISSING` if not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(MISSING) from None
    return plt


def plot_curves(rows, path, title=""):
    """Loss, top-1/top-5 error and the learning rate (log scale) against the epoch, to a PNG.

    rows: metrics.csv rows (`minivgg.metrics.read_metrics`, or the dicts training builds).
    Raises ImportError when matplotlib is missing.
    """
    plt = import_pyplot()
    col = metric_columns(rows)
    epoch = col["epoch"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    ax1.plot(epoch, col["train_loss"], "o-", label="train")
    ax1.plot(epoch, col["val_loss"], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(epoch, 100 * np.array(col["train_top1_err"]), "o-", label="train top-1")
    ax2.plot(epoch, 100 * np.array(col["val_top1_err"]), "o-", label="val top-1")
    ax2.plot(epoch, 100 * np.array(col["val_top5_err"]), "o-", label="val top-5")
    ax2.set(xlabel="epoch", ylabel="error (%)", title="error", ylim=(0, 100))
    ax3.semilogy(epoch, col["lr"], "o-", color="C3")
    ax3.set(xlabel="epoch", ylabel="learning rate", title="rate (divided by 10 on plateaus)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs only
    ax1.legend()
    ax2.legend()
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path, dpi=100):
    """Write a matplotlib figure as a PNG through the one atomic write, and close it.

    Every picture minivgg draws is written this way: never half a file, and a failed
    write is a `checkpoint.WriteError` naming `path`."""
    plt = import_pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), suffix=".png",
                     overwrite=True)
    finally:
        plt.close(fig)
