import math

import pytest
import torch
from jaxtyping import TypeCheckError

from capi_lab.model.rope import (
    Rope,
    patch_coordinates,
    register_coordinates,
    rescale_to_bbox,
    rope_frequencies,
    rotate_half,
)


def test_patch_coordinates_row_major_linspace():
    c = patch_coordinates(3, 5)
    assert c.shape == (15, 2)
    # token i*W + j has coordinates (i/(H-1), j/(W-1))
    for i in range(3):
        for j in range(5):
            assert torch.allclose(c[i * 5 + j], torch.tensor([i / 2, j / 4]))


def test_register_coordinates_walk_the_border():
    c = register_coordinates(8)  # s = 2, c = [0, 0.5]
    expected = torch.tensor(
        [[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1], [0.5, 1], [0, 1], [0, 0.5]], dtype=torch.float32
    )
    assert torch.equal(c, expected)
    assert register_coordinates(16).shape == (16, 2)


def test_registers_rescaled_into_visible_bbox():
    unit = register_coordinates(4)  # (0,0), (1,0), (1,1), (0,1)
    visible = torch.tensor([[[0.25, 0.5], [0.75, 1.0], [0.5, 0.75]]])
    out = rescale_to_bbox(unit, visible)
    expected = torch.tensor([[[0.25, 0.5], [0.75, 0.5], [0.75, 1.0], [0.25, 1.0]]])
    assert torch.allclose(out, expected)


def test_frequency_table_hand_computed():
    t = rope_frequencies(8, max_freq=7.0, min_freq=7e-4)
    # d_h/4 = 2 frequencies: 7 and 7 * (1e4)^-1 = 7e-4; duplicated, times 2 pi
    f = torch.tensor([7.0, 7e-4]) * 2 * math.pi
    assert torch.allclose(t[0], torch.cat([f, f, torch.zeros(4)]))
    assert torch.allclose(t[1], torch.cat([torch.zeros(4), f, f]))


def test_rope_angle_for_one_coordinate():
    rope = Rope(8)
    coords = torch.tensor([[[0.5, 0.25]]])
    angle = rope.angles(coords)[0, 0]
    f = torch.tensor([7.0, 7e-4]) * 2 * math.pi
    expected = torch.cat([0.5 * f, 0.5 * f, 0.25 * f, 0.25 * f])
    assert torch.allclose(angle, expected)


def test_rotate_half():
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def _score_fn(layout):
    rope = Rope(16, layout=layout).double()
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(pq, pk):
        rq = rope(q, torch.tensor([[pq]], dtype=torch.float64))
        rk = rope(k, torch.tensor([[pk]], dtype=torch.float64))
        return float((rq * rk).sum().detach())

    return rope, q, score


SHIFTS = ([0.3, -0.1], [1.5, 2.0], [-0.05, 0.6], [0.2, 0.2])


def test_rotation_layout_scores_depend_only_on_relative_position():
    rope, q, score = _score_fn("rotation")
    pq, pk = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.7], dtype=torch.float64)
    base = score(pq.tolist(), pk.tolist())
    for shift in SHIFTS:
        s = torch.tensor(shift, dtype=torch.float64)
        assert score((pq + s).tolist(), (pk + s).tolist()) == pytest.approx(base, abs=1e-9)
    assert score(pq.tolist(), [0.5, 0.7]) != pytest.approx(base, abs=1e-3)  # but it does see the offset
    rq = rope(q, torch.tensor([[[0.3, 0.9]]], dtype=torch.float64))
    assert torch.allclose(rq.norm(), q.norm())  # a rotation


def test_capi_layout_is_the_specified_formula_and_not_a_rotation():
    """capi-method.md §1 pairs channel c (row angle) with c + d/2 (column angle) through rotate_half.
    We reproduce it exactly (published weights need it); this records that it is then not
    shift-invariant nor norm-preserving, except when both coordinates are equal."""
    rope, q, score = _score_fn("capi")
    pq, pk = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.7], dtype=torch.float64)
    base = score(pq.tolist(), pk.tolist())
    moved = [
        score(
            (pq + torch.tensor(s, dtype=torch.float64)).tolist(), (pk + torch.tensor(s, dtype=torch.float64)).tolist()
        )
        for s in SHIFTS
    ]
    assert max(abs(m - base) for m in moved) > 1e-3
    # x*cos(angle) + rotate_half(x)*sin(angle), written out channel by channel
    coords = torch.tensor([[[0.3, 0.9]]], dtype=torch.float64)
    angle = coords[0, 0] @ rope.freqs
    x = q[0, 0, 0]
    h = 8
    expected = torch.empty(16, dtype=torch.float64)
    for c in range(h):
        expected[c] = x[c] * torch.cos(angle[c]) - x[c + h] * torch.sin(angle[c])
        expected[c + h] = x[c + h] * torch.cos(angle[c + h]) + x[c] * torch.sin(angle[c + h])
    assert torch.allclose(rope(q, coords)[0, 0, 0], expected)
    # on the diagonal (row == column coordinate) paired angles agree and it is a rotation
    diag = rope(q, torch.tensor([[[0.6, 0.6]]], dtype=torch.float64))
    assert torch.allclose(diag.norm(), q.norm())


def test_shape_annotations_are_checked():
    with pytest.raises(TypeCheckError):
        rescale_to_bbox(register_coordinates(4), torch.rand(3, 2))  # missing batch axis
