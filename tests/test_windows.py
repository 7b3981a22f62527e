import numpy as np
import pytest
import torch

from fbnet.models.text import text_windows, window_spans
from fbnet.windows import blocks_upto, branch_blocks, level_boxes, level_slices, region_blocks


@pytest.mark.parametrize("level", [1, 2, 3])
def test_level_boxes_follow_eqs_8_9(level):
    w = h = 120
    boxes = level_boxes((0, 0, w, h), level)
    assert boxes.shape == (level * level, 4)
    x = (level + 1) / 2
    widths = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(widths, np.ceil(w / x))  # window = ceil(w / x)
    xs = np.unique(boxes[:, 0])
    assert np.allclose(np.diff(xs), w / (2 * x))  # step = w / (2x): half overlap
    assert boxes[:, 2].max() == pytest.approx(w) and boxes.min() >= 0


def test_level_boxes_inside_an_offset_box():
    boxes = level_boxes((10, 20, 50, 40), 3)
    assert (boxes[:, 0] >= 10).all() and (boxes[:, 2] <= 50).all()
    assert (boxes[:, 1] >= 20).all() and (boxes[:, 3] <= 40).all()


def test_region_blocks_and_slices():
    assert blocks_upto(3) == 14
    assert region_blocks((0, 0, 64, 64), 3).shape == (14, 4)
    assert [s.stop - s.start for s in level_slices(3)] == [1, 4, 9]


def test_branch_blocks_uses_whole_image_when_nothing_is_detected():
    bg, fg, mask = branch_blocks(128, np.zeros((0, 4)), 3, 9)
    assert bg.shape == (14, 4) and fg.shape == (9, 14, 4)
    assert mask.tolist() == [True] + [False] * 8
    assert np.allclose(fg[0], bg)
    _, fg, mask = branch_blocks(128, np.array([[10.0, 20.0, 70.0, 90.0]]), 3, 9)
    assert mask.tolist() == [True] + [False] * 8
    assert np.array_equal(fg[0], region_blocks((10.0, 20.0, 70.0, 90.0), 3))
    assert all(np.array_equal(f, bg) for f in fg[1:])  # padded slots: the whole image's blocks


def test_branch_blocks_keeps_at_most_j_boxes_and_widens_thin_ones():
    boxes = np.array([[10, 10, 11, 60]] * 12, dtype=float)
    _, fg, mask = branch_blocks(128, boxes, 3, 9)
    assert mask.all()
    assert (fg[..., 2] - fg[..., 0] > 0).all()


def test_text_window_spans_eqs_11_12():
    lengths = torch.tensor([10, 3, 1])
    start, end = window_spans(lengths, 4)
    assert start.shape == (3, 4)
    # 10 words, N=4: windows of ceil(2*10/5)=4 words moving by 2
    assert start[0].tolist() == [0, 2, 4, 6] and end[0].tolist() == [4, 6, 8, 10]
    # short captions are clamped: every window has at least one word inside the caption
    assert ((end - start) >= 1).all() and (end <= lengths[:, None]).all()


def test_text_windows_are_sums_over_spans():
    torch.manual_seed(0)
    words = torch.randn(2, 7, 5)
    lengths = torch.tensor([7, 4])
    words[1, 4:] = 0
    out = text_windows(words, lengths, 9)
    start, end = window_spans(lengths, 9)
    for b in range(2):
        for n in range(9):
            assert torch.allclose(out[b, n], words[b, start[b, n]:end[b, n]].sum(0), atol=1e-5)
    assert torch.allclose(text_windows(words, lengths, 1)[0, 0], words[0].sum(0), atol=1e-5)
