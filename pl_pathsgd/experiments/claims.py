"""The paper's qualitative claims, checked on a finished run (printed by the runner, asserted by the smoke tests)."""

from __future__ import annotations

import math

from pl_pathsgd.experiments.summaries import (
    best_curves,
    curves,
    figure1_summary,
    finite,
    invariance_gaps,
    relative_gaps,
    rounding_unit,
    spearman,
)

Claim = tuple[str, bool, str]

#: Path-SGD's balanced/unbalanced gap passes when it is at most this multiple of the control's gap (a run from
#: weights perturbed by one unit in the last place), or of the rounding unit where the control's gap is smaller
CONTROL_MULTIPLE = 10.0
#: in float64 the gap must also be at most this: curves that agree to it are the same on any plot
FLOAT64_GAP = 1e-6
#: Figure 2a: SGD with Rebalance from the unbalanced init recovers the balanced curve when its final training
#: loss is at most this multiple of SGD's from the balanced init
RECOVERED = 1.1


def check_claims(figure: str, rows: list[dict]) -> list[Claim]:
    return {"figure1": _figure1, "figure2": _figure2, "figure3": _figure3}[figure](rows)


def _figure1(rows: list[dict]) -> list[Claim]:
    summary = figure1_summary(rows)
    narrow, wide = summary[0], summary[-1]
    return [
        (f"the widest net (width {wide['width']}) reaches zero training error", wide["train_error"] == 0.0,
         f"training error {wide['train_error']:.4f}"),
        (f"the widest net's test error is no worse than the narrowest net's (width {narrow['width']})",
         wide["test_error_last"] <= narrow["test_error_last"],
         f"{wide['test_error_last']:.4f} vs {narrow['test_error_last']:.4f}"),
        *_norm_tracks_test_error(summary),
    ]


def _norm_tracks_test_error(summary: list[dict]) -> list[Claim]:
    """The paper's explanation: across widths the test error follows the margin-normalized path-norm, not the
    parameter count. Checked where the norm was measured with a positive margin, on three widths or more."""
    measured = [r for r in summary if r["normalized_path_norm_l2"] is not None]
    if len(measured) < 3:
        return []
    errors = [r["test_error_last"] for r in measured]
    by_norm = spearman([r["normalized_path_norm_l2"] for r in measured], errors)
    by_size = spearman([r["parameters"] if r["parameters"] is not None else r["width"] for r in measured], errors)
    widths = f"widths {measured[0]['width']}-{measured[-1]['width']}"
    return [("the test error rises and falls with the margin-normalized l2 path-norm across widths "
             "(positive rank correlation), not with the parameter count",
             by_norm > 0 and not by_norm <= by_size,
             f"Spearman correlation with the last epoch's test error over {widths}: normalized path-norm "
             f"{by_norm:.2f}, parameter count {by_size:.2f}")]


def _sgd_unbalanced_slower(found: dict) -> list[Claim]:
    if ("sgd", "balanced", "") not in found or ("sgd", "unbalanced", "") not in found:
        return []
    balanced = finite(found[("sgd", "balanced", "")][-1]["train_loss"])
    unbalanced = finite(found[("sgd", "unbalanced", "")][-1]["train_loss"])
    return [("SGD from the unbalanced init ends with a higher training loss than from the balanced one",
             unbalanced > balanced, f"{unbalanced:.4g} vs {balanced:.4g}")]


def _figure2(rows: list[dict]) -> list[Claim]:
    found = curves(rows)
    claims = _sgd_unbalanced_slower(found)
    rebalanced, balanced = found.get(("sgd", "unbalanced", "rebalanced")), found.get(("sgd", "balanced", ""))
    if rebalanced and balanced:
        end, reference = finite(rebalanced[-1]["train_loss"]), finite(balanced[-1]["train_loss"])
        claims.append((f"SGD with Rebalance (l2, every epoch) from the unbalanced init recovers the balanced curve: "
                       f"it ends with a training loss at most {RECOVERED:g} times SGD's from the balanced init",
                       end <= RECOVERED * reference,
                       f"{end:.4g} vs {reference:.4g}; largest relative gap of the curves "
                       f"{max(relative_gaps(balanced, rebalanced)):.2e}"))
    return claims


def _figure3(rows: list[dict]) -> list[Claim]:
    claims = []
    for gaps in invariance_gaps(rows):
        claims += _invariance(gaps)
    return claims + _sgd_unbalanced_slower(best_curves(rows))


def _invariance(gaps: dict) -> list[Claim]:
    """Path-SGD's curves from the two inits are the same up to rounding: the gap between them is at most
    ``CONTROL_MULTIPLE`` times what a rounding-level perturbation of the weights causes (and tiny in float64)."""
    precision, unit = gaps["precision"] or "32-true", rounding_unit(gaps["precision"])
    in_float64 = unit == rounding_unit("64-true")
    pathsgd, control, sgd = gaps["pathsgd"], gaps["control"], gaps["sgd"]
    where = f"lr {gaps['lr']:g}, precision {precision}"
    numbers = f"relative gaps of the training loss: Path-SGD {pathsgd:.2e}"
    if control is None:
        ok = in_float64 and pathsgd <= FLOAT64_GAP
        rule = (f"no control cell: checked against {FLOAT64_GAP:g}" + ("" if in_float64 else
                ", which float32 rounding exceeds; run without --no-control to compare with the control"))
    else:
        allowed = CONTROL_MULTIPLE * max(control, unit)
        ok = pathsgd <= allowed and (not in_float64 or pathsgd <= FLOAT64_GAP)
        numbers += f", control (balanced vs balanced moved by one unit in the last place) {control:.2e}"
        rule = f"passes at <= {CONTROL_MULTIPLE:g} x max(control, eps {unit:.1e})" + \
            (f" and <= {FLOAT64_GAP:g} in float64" if in_float64 else "")
    if sgd is not None:
        numbers += f", SGD {sgd:.2e}"
    claims = [(f"Path-SGD gives the same loss curve from the balanced and the unbalanced init up to rounding ({where})",
               ok, f"{numbers}; {rule}")]
    if control is not None and sgd is not None:
        claims.append((f"SGD's curves from the two inits differ far beyond rounding ({where})",
                       sgd > CONTROL_MULTIPLE * max(control, unit) and not math.isnan(sgd),
                       f"SGD's gap {sgd:.2e} against the control's {control:.2e}"))
    return claims
