"""What a run measures and records: top-k error counts and the metrics.csv file.

`topk_errors` is the one error count of minivgg, used by training (top-1 of each batch,
top-1 and top-5 on validation) and by the test protocols of `minivgg.evaluate` (Sec. 3.2,
Table 3's "top-1 val. error" and "top-5 val. error").

metrics.csv has one row per finished epoch with the columns `METRICS_COLUMNS`; errors are
fractions in [0, 1], `lr` the rate the epoch trained with. `minivgg.plots.plot_curves`
draws it; `examples/visualize.py curves` draws any run's file.
"""

import csv
import io

import numpy as np

from minivgg import backend
from minivgg.checkpoint import atomic_write

METRICS_COLUMNS = ("epoch", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
                   "val_top5_err", "lr", "images_per_s", "seconds")
PLOTTED_COLUMNS = METRICS_COLUMNS[:7]  # what the curves need; the timing columns are extra


def topk_errors(scores, labels, ks=(1, 5)):
    """Number of samples whose label is not among the k highest scores, for each k.

    scores: (N, K) logits or probabilities (host or device array); labels: (N,) ints.
    Returns a dict {k: count}. Ties are broken by class index (a stable sort of the negated
    scores), so the count never depends on chance; k larger than K counts no miss.
    """
    scores, labels = backend.to_numpy(scores), backend.to_numpy(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"topk_errors: expected scores (N, K) and labels (N,), got "
                         f"{scores.shape} and {labels.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = order == labels[:, None]
    return {k: int(len(labels) - hits[:, :k].any(axis=1).sum()) for k in ks}


def epoch_row(epoch, train, val, lr, seconds):
    """One metrics.csv row (strings with fixed precision) from the epoch's results.

    train: dict with train_loss, train_top1_err, images_per_s (`train.train_one_epoch`);
    val: dict with val_loss, val_top1_err, val_top5_err (`train.validate`).
    """
    return {"epoch": epoch, "train_loss": f"{train['train_loss']:.6f}",
            "train_top1_err": f"{train['train_top1_err']:.6f}",
            "val_loss": f"{val['val_loss']:.6f}", "val_top1_err": f"{val['val_top1_err']:.6f}",
            "val_top5_err": f"{val['val_top5_err']:.6f}", "lr": f"{lr:.6g}",
            "images_per_s": f"{train['images_per_s']:.2f}", "seconds": f"{seconds:.2f}"}


def write_metrics(path, rows):
    """Write every row to `path`, replacing it atomically (a kill never leaves half a file;
    a failed write is a `checkpoint.WriteError` naming `path`)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRICS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(path, lambda f: f.write(data), suffix=".csv", overwrite=True)


def read_metrics(path, up_to_epoch=None):
    """Rows of a metrics.csv as dicts of strings, those with epoch <= up_to_epoch if given.

    Raises OSError for a file that cannot be read and ValueError for one without rows or
    without the columns the curves need (`PLOTTED_COLUMNS`).
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [c for c in PLOTTED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {PLOTTED_COLUMNS}")
    if up_to_epoch is None:
        return rows
    return [row for row in rows if int(row["epoch"]) <= up_to_epoch]


def metric_columns(rows):
    """Rows (dicts of strings or numbers) -> {column: list of floats}; '' and 'nan' -> NaN."""
    return {c: [float(r[c]) if r[c] not in ("", "nan") else np.nan for r in rows]
            for c in rows[0]}
