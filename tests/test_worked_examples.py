"""Figure 2(b) and 2(c): the numbers worked out by hand in docs/capacity.md, from the real optimizers."""

from __future__ import annotations

import pytest
import torch

from pl_pathsgd.experiments.worked_examples import EXAMPLES, main, one_step, run, same_function


def values(weights) -> list[float]:
    """Every weight of every layer, in order (layer, row, column)."""
    return [value for matrix in weights for value in matrix.flatten().tolist()]


def test_figure_2b_chain():
    """x = 1, delta = -1, step 1.  SGD: dw1 = delta * w2 * x, dw2 = delta * h.  Path-SGD divides the gradient of
    w1 by gamma_in(x) gamma_out(h) = w2^2 and that of w2 by gamma_in(h) gamma_out(y) = w1^2."""
    outcomes = run(EXAMPLES["b"])
    balanced, rescaled = outcomes["balanced"], outcomes["rescaled"]
    assert balanced.output.tolist() == rescaled.output.tolist() == [1.0]  # the same function before
    sgd_b, sgd_r = balanced.after["sgd"], rescaled.after["sgd"]
    assert values(sgd_b[0]) == [2.0, 2.0] and sgd_b[1].tolist() == [4.0]
    assert values(sgd_r[0]) == pytest.approx([10.1, 10.1], rel=1e-14) and sgd_r[1].item() == pytest.approx(102.01, rel=1e-14)
    path_b, path_r = balanced.after["pathsgd"], rescaled.after["pathsgd"]
    assert values(path_b[0]) == pytest.approx([2.0, 2.0], rel=1e-14)
    assert path_b[1].tolist() == pytest.approx([4.0], rel=1e-14)
    assert values(path_r[0]) == pytest.approx([0.2, 20.0], rel=1e-14)  # 0.1 + 10/100 and 10 + 0.1/0.01
    assert path_r[1].item() == pytest.approx(4.0, rel=1e-14)  # the same function as the balanced network's


def test_figure_2c_two_by_two():
    """x = (1, 1), delta = (-1, -1), all weights 1; rescaled: hidden unit 1's incoming weights x10, outgoing /10."""
    outcomes = run(EXAMPLES["c"])
    balanced, rescaled = outcomes["balanced"], outcomes["rescaled"]
    assert balanced.output.tolist() == rescaled.output.tolist() == [4.0, 4.0]
    sgd_b, sgd_r = balanced.after["sgd"], rescaled.after["sgd"]
    assert values(sgd_b[0]) == [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    assert sgd_b[1].tolist() == [36.0, 36.0]
    assert values(sgd_r[0]) == pytest.approx([10.2, 10.2, 3.0, 3.0, 20.1, 3.0, 20.1, 3.0], rel=1e-14)
    assert sgd_r[1].tolist() == pytest.approx([428.04, 428.04], rel=1e-14)
    path_b, path_r = balanced.after["pathsgd"], rescaled.after["pathsgd"]
    assert values(path_b[0]) == pytest.approx([2.0] * 8, rel=1e-14)  # 1 + 2 / 2 (divisors computed in float64)
    assert path_b[1].tolist() == pytest.approx([16.0, 16.0], rel=1e-14)
    assert values(path_r[0]) == pytest.approx([20.0, 20.0, 2.0, 2.0, 0.2, 2.0, 0.2, 2.0], rel=1e-14)
    assert path_r[1].tolist() == pytest.approx([16.0, 16.0], rel=1e-14)
    # as functions, on inputs of both signs: Path-SGD's two networks agree, SGD's do not
    assert same_function(path_b[0], path_r[0], 2) and not same_function(sgd_b[0], sgd_r[0], 2)
    assert same_function(balanced.weights, rescaled.weights, 2)


def test_one_step_checks_its_optimizer():
    with pytest.raises(ValueError, match="choose one of"):
        one_step((((1.0,),), ((1.0,),)), (1.0,), (-1.0,), "adam")
    weights, output = one_step((((1.0,),), ((1.0,),)), (1.0,), (-1.0,), "sgd")
    assert isinstance(weights[0], torch.Tensor) and output.dtype == torch.float64


def test_main_prints_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "after one SGD step the equivalent networks compute different functions; at x: (4) vs (102.01)" in printed
    assert "after one Path-SGD step the equivalent networks compute the same function; at x: (16, 16) vs (16, 16)" in printed
    assert (tmp_path / "figure2bc.png").stat().st_size > 10_000
    main(["--no-figure", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
