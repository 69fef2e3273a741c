"""The paper's qualitative claims, checked on a finished run (printed by the runner, asserted by the smoke tests)."""

from __future__ import annotations

from pl_pathsgd.experiments.summaries import best_curves, by_cell, figure1_summary, finite

Claim = tuple[str, bool, str]


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
    ]


def _sgd_unbalanced_slower(curves: dict) -> list[Claim]:
    if ("sgd", "balanced") not in curves or ("sgd", "unbalanced") not in curves:
        return []
    balanced = finite(curves[("sgd", "balanced")][-1]["train_loss"])
    unbalanced = finite(curves[("sgd", "unbalanced")][-1]["train_loss"])
    return [("SGD from the unbalanced init ends with a higher training loss than from the balanced one",
             unbalanced > balanced, f"{unbalanced:.4g} vs {balanced:.4g}")]


def _figure2(rows: list[dict]) -> list[Claim]:
    return _sgd_unbalanced_slower({(c[0]["method"], c[0]["init"]): c for c in by_cell(rows).values()})


def _figure3(rows: list[dict]) -> list[Claim]:
    claims = []
    cells = by_cell(rows)
    for name, balanced in cells.items():
        if balanced[0]["method"] != "pathsgd" or balanced[0]["init"] != "balanced":
            continue
        twin = cells.get(name.replace("-balanced-", "-unbalanced-"))
        if twin is None:
            continue
        gap = max(abs(finite(a["train_loss"]) - finite(b["train_loss"])) / abs(finite(a["train_loss"]))
                  for a, b in zip(balanced, twin))
        claims.append((f"Path-SGD gives the same loss curve from the balanced and the unbalanced init ({name})",
                       gap <= 1e-6, f"largest relative gap {gap:.2e}"))
    return claims + _sgd_unbalanced_slower(best_curves(rows))
