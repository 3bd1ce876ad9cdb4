"""Tests for vlmloc.geometry: hand-computed token grids, masks, box frames and IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmloc import geometry as g
from vlmloc.geometry import TokenGrid

# --------------------------------------------------------------------------- llava_grid


def test_llava_grid_padded_landscape_region_and_cells():
    # 600x400 -> S=600, top offset (600-400)//2 = 100; cells are 600/24 = 25 px.
    grid = g.llava_grid(600, 400)
    assert grid == TokenGrid(0, -100, 600, 500, 24, 24)
    xs, ys = grid.cell_bounds()
    assert xs.shape == (25,) and ys.shape == (25,)
    assert xs[3] == 75.0 and xs[24] == 600.0
    assert ys[0] == -100.0 and ys[4] == 0.0 and ys[20] == 400.0  # rows 0-3 and 20-23 are padding


def test_llava_grid_padded_portrait_and_odd_offset():
    assert g.llava_grid(400, 600) == TokenGrid(-100, 0, 500, 600, 24, 24)
    # (601-400)//2 = 100 (integer division, not 100.5)
    assert g.llava_grid(601, 400) == TokenGrid(0, -100, 601, 501, 24, 24)


def test_llava_grid_square_image_is_whole_image():
    assert g.llava_grid(500, 500) == TokenGrid(0, 0, 500, 500, 24, 24)
    assert g.llava_grid(500, 500, pad_to_square=False) == TokenGrid(0, 0, 500, 500, 24, 24)


def test_llava_grid_no_pad_centre_crop():
    # 600x400: long edge int(336*600/400) = 504; crop left (504-336)//2 = 84;
    # x0 = 84*600/504 = 100, x1 = 420*600/504 = 500; y spans the full height.
    grid = g.llava_grid(600, 400, pad_to_square=False)
    assert grid.x0 == pytest.approx(100) and grid.x1 == pytest.approx(500)
    assert (grid.y0, grid.y1) == (0, 400)
    portrait = g.llava_grid(400, 600, pad_to_square=False)
    assert (portrait.x0, portrait.x1) == (0, 400)
    assert portrait.y0 == pytest.approx(100) and portrait.y1 == pytest.approx(500)


def test_llava_grid_no_pad_truncated_long_edge():
    # 500x333: 336*500/333 = 504.50 -> int 504 (x scale 500/504, not 333/336);
    # left 84 -> x0 = 84*500/504 = 83.333.., x1 = 420*500/504 = 416.666..; y scale 333/336.
    grid = g.llava_grid(500, 333, pad_to_square=False)
    assert grid.x0 == pytest.approx(250 / 3) and grid.x1 == pytest.approx(1250 / 3)
    assert grid.y0 == 0 and grid.y1 == pytest.approx(333)


def test_llava_grid_no_pad_matches_hf_processor_pixels():
    """Column-coded image through LlavaImageProcessorPil (NEAREST): each processed pixel's
    source column is floor of its centre under our mapping."""
    pil = pytest.importorskip("PIL.Image")
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    w, h = 500, 333
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w) % 256
    img[..., 1] = np.arange(w) // 256
    proc = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=False,
        do_normalize=False, do_rescale=False, resample=PILImageResampling.NEAREST,
    )
    out = proc(pil.fromarray(img), return_tensors="np")["pixel_values"][0]
    src_cols = out[0, 0].astype(int) + 256 * out[1, 0].astype(int)
    grid = g.llava_grid(w, h, pad_to_square=False)
    step = (grid.x1 - grid.x0) / 336
    expected = np.floor(grid.x0 + (np.arange(336) + 0.5) * step).astype(int)
    np.testing.assert_array_equal(src_cols, expected)


def test_llava_grid_padded_matches_hf_processor_padding_rows():
    pil = pytest.importorskip("PIL.Image")
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    img = np.full((400, 600, 3), 255, np.uint8)
    proc = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True,
        do_normalize=False, do_rescale=False, resample=PILImageResampling.NEAREST,
    )
    out = proc(pil.fromarray(img), return_tensors="np")["pixel_values"][0, 0]
    token_rows = out.reshape(24, 14, 336).min(axis=(1, 2))
    # grid says rows 0-3 and 20-23 lie in [-100, 0) and [400, 500): padding (not white)
    expected_image_rows = np.zeros(24, bool)
    expected_image_rows[4:20] = True
    np.testing.assert_array_equal(token_rows == 255, expected_image_rows)


# --------------------------------------------------------------------------- internvl tiling


def test_internvl_tiling_hand_cases():
    assert g.internvl_tiling(448, 448) == (1, 1)
    # aspect 2: (2,1), (4,2), (6,3) tie; 896*448 is not > 0.5*448^2*8, so (2,1) stays
    assert g.internvl_tiling(896, 448) == (2, 1)
    assert g.internvl_tiling(448, 896) == (1, 2)
    assert g.internvl_tiling(1344, 448) == (3, 1)


def test_internvl_grids_single_and_multi_tile():
    local, thumb, nc, nr = g.internvl_grids(448, 448)
    assert (nc, nr) == (1, 1) and thumb is None
    assert local == TokenGrid(0, 0, 448, 448, 16, 16)
    local, thumb, nc, nr = g.internvl_grids(1000, 500)
    assert (nc, nr) == (2, 1)
    assert local == TokenGrid(0, 0, 1000, 500, 16, 32)
    assert thumb == TokenGrid(0, 0, 1000, 500, 16, 16)


@pytest.mark.parametrize("size", [(640, 480), (500, 333), (300, 1200), (1920, 400), (448, 448)])
def test_internvl_tile_count_matches_hf_processor(size):
    pil = pytest.importorskip("PIL.Image")
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    w, h = size
    proc = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12
    )
    n = int(proc(pil.fromarray(np.zeros((h, w, 3), np.uint8)))["num_patches"][0])
    local, thumb, nc, nr = g.internvl_grids(w, h)
    assert n == nc * nr + (thumb is not None)
    assert local.rows * local.cols == 256 * nc * nr


# --------------------------------------------------------------------------- grid_mask


def test_grid_mask_pixel_straddling_two_cells():
    grid = TokenGrid(0, 0, 10, 10, 1, 3)  # x edges 0, 3.33, 6.67, 10
    m = np.zeros((10, 10), bool)
    m[:, 3] = True  # pixel [3, 4) straddles the edge 3.33
    np.testing.assert_array_equal(g.grid_mask(m, grid), [[True, True, False]])
    m[:] = False
    m[:, 2] = True  # [2, 3) lies inside cell 0 only
    np.testing.assert_array_equal(g.grid_mask(m, grid), [[True, False, False]])


def test_grid_mask_ending_exactly_on_cell_edge():
    grid = TokenGrid(0, 0, 12, 12, 3, 3)  # edges at 0, 4, 8, 12
    m = np.zeros((12, 12), bool)
    m[0:4, 0:4] = True  # [0, 4) x [0, 4): touches the edge at 4 with zero area
    expected = np.zeros((3, 3), bool)
    expected[0, 0] = True
    np.testing.assert_array_equal(g.grid_mask(m, grid), expected)
    m[:] = False
    m[4, 4] = True  # [4, 5): only cell (1, 1)
    expected[:] = False
    expected[1, 1] = True
    np.testing.assert_array_equal(g.grid_mask(m, grid), expected)


def test_grid_mask_non_integer_edges_snapped():
    # no-pad LLaVA 600x400: x edges 100 + c*400/24; c=3 gives exactly 150
    grid = g.llava_grid(600, 400, pad_to_square=False)
    m = np.zeros((400, 600), bool)
    m[0, 150] = True  # [150, 151) lies in col 3 only ([150, 166.67))
    sel = np.argwhere(g.grid_mask(m, grid))
    np.testing.assert_array_equal(sel, [[0, 3]])
    m[:] = False
    m[0, 99] = True  # left of the crop window: invisible
    assert not g.grid_mask(m, grid).any()


def test_grid_mask_float_edge_rounding_does_not_leak():
    # 107x204 no-pad: new 336x640, crop top 152 -> y0 = 152*204/640 = 48.45, y1 = 155.55;
    # y edge 12 = 48.45 + 12*107.1/24 = 102 exactly, but float gives 101.99999999999999.
    grid = g.llava_grid(107, 204, pad_to_square=False)
    assert grid.cell_bounds()[1][12] == pytest.approx(102, abs=1e-9)
    m = np.zeros((204, 107), bool)
    m[101, 0] = True  # [101, 102) lies in token row 11 only
    np.testing.assert_array_equal(np.argwhere(g.grid_mask(m, grid)), [[11, 0]])
    m[:] = False
    m[102, 0] = True  # [102, 103) lies in token row 12 only
    np.testing.assert_array_equal(np.argwhere(g.grid_mask(m, grid)), [[12, 0]])


def test_grid_mask_padded_image_rows():
    grid = g.llava_grid(600, 400)  # y in [-100, 500), 25 px cells
    full = np.ones((400, 600), bool)
    tm = g.grid_mask(full, grid)
    assert not tm[:4].any() and not tm[20:].any() and tm[4:20].all()
    obj = np.zeros((400, 600), bool)
    obj[150:200, 300:350] = True  # padded y [250, 300) -> rows 10, 11; x [300, 350) -> cols 12, 13
    expected = np.zeros((24, 24), bool)
    expected[10:12, 12:14] = True
    np.testing.assert_array_equal(g.grid_mask(obj, grid), expected)


def test_grid_mask_internvl_tile_boundary_and_thumbnail():
    local, thumb, nc, nr = g.internvl_grids(896, 448)  # (2,1); 28 px tokens on the canvas
    m = np.zeros((448, 896), bool)
    m[100:128, 440:456] = True  # x straddles the tile boundary at 448
    canvas = g.grid_mask(m, local)
    exp = np.zeros((16, 32), bool)
    exp[3:5, 15:17] = True  # rows [84,112),[112,140); cols [420,448),[448,476)
    np.testing.assert_array_equal(canvas, exp)
    tiles = g.split_canvas(canvas, nc, nr)
    assert tiles.shape == (2, 16, 16)
    np.testing.assert_array_equal(np.argwhere(tiles[0]), [[3, 15], [4, 15]])
    np.testing.assert_array_equal(np.argwhere(tiles[1]), [[3, 0], [4, 0]])
    # thumbnail cells are 56 x 28: cols [392,448),[448,504) -> 7, 8; rows 3, 4
    np.testing.assert_array_equal(
        np.argwhere(g.grid_mask(m, thumb)), [[3, 7], [3, 8], [4, 7], [4, 8]]
    )


def _grid_mask_reference(mask: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """Brute force: a cell is selected iff some mask pixel overlaps it with positive area."""
    xs, ys = grid.cell_bounds()
    out = np.zeros((grid.rows, grid.cols), bool)
    for i, j in np.argwhere(mask):
        for r in range(grid.rows):
            if min(i + 1, ys[r + 1]) - max(i, ys[r]) <= 1e-9:
                continue
            for c in range(grid.cols):
                if min(j + 1, xs[c + 1]) - max(j, xs[c]) > 1e-9:
                    out[r, c] = True
    return out


def test_grid_mask_matches_brute_force_random():
    rng = np.random.default_rng(0)
    for trial in range(150):
        h, w = rng.integers(1, 25, size=2)
        rows, cols = rng.integers(1, 9, size=2)
        if trial % 2:  # integer-aligned edges (exact cell sizes), possibly beyond the image
            x0, y0 = rng.integers(-5, 5, size=2)
            x1, y1 = x0 + cols * rng.integers(1, 5), y0 + rows * rng.integers(1, 5)
        else:
            x0, y0 = rng.uniform(-6, 6, size=2)
            x1, y1 = x0 + rng.uniform(0.5, 30), y0 + rng.uniform(0.5, 30)
        grid = TokenGrid(float(x0), float(y0), float(x1), float(y1), int(rows), int(cols))
        mask = rng.random((h, w)) < rng.choice([0.02, 0.1, 0.5])
        np.testing.assert_array_equal(
            g.grid_mask(mask, grid), _grid_mask_reference(mask, grid), err_msg=str(grid)
        )


def test_grid_mask_cells_outside_image_never_selected():
    grid = TokenGrid(-20, -20, 40, 40, 6, 6)  # 10 px cells; image covers [0, 20)
    tm = g.grid_mask(np.ones((20, 20), bool), grid)
    expected = np.zeros((6, 6), bool)
    expected[2:4, 2:4] = True
    np.testing.assert_array_equal(tm, expected)


# --------------------------------------------------------------------------- pad_token_mask


def _grid7(*rows: str) -> np.ndarray:
    return np.array([[ch == "#" for ch in r] for r in rows], bool)


CENTRE = _grid7(".......", ".......", ".......", "...#...", ".......", ".......", ".......")
RING1 = _grid7(".......", ".......", "..###..", "..###..", "..###..", ".......", ".......")
RING2 = _grid7(".......", ".#####.", ".#####.", ".#####.", ".#####.", ".#####.", ".......")
CORNER = _grid7("###....", "###....", "###....", ".......", ".......", ".......", ".......")


def test_pad_token_mask_centre_object():
    np.testing.assert_array_equal(g.pad_token_mask(CENTRE, 1), RING1)
    np.testing.assert_array_equal(g.pad_token_mask(CENTRE, 2), RING2)
    np.testing.assert_array_equal(g.pad_token_mask(RING1, -1), CENTRE)
    assert not g.pad_token_mask(RING1, -2).any()
    np.testing.assert_array_equal(g.pad_token_mask(RING2, -1), RING1)
    np.testing.assert_array_equal(g.pad_token_mask(RING2, -2), CENTRE)


def test_pad_token_mask_zero_is_a_copy():
    out = g.pad_token_mask(RING1, 0)
    np.testing.assert_array_equal(out, RING1)
    assert out is not RING1
    out[0, 0] = True
    assert not RING1[0, 0]


def test_pad_token_mask_object_touching_border():
    grow1 = _grid7("####...", "####...", "####...", "####...", ".......", ".......", ".......")
    grow2 = _grid7("#####..", "#####..", "#####..", "#####..", "#####..", ".......", ".......")
    shrink1 = _grid7(".......", ".#.....", ".......", ".......", ".......", ".......", ".......")
    np.testing.assert_array_equal(g.pad_token_mask(CORNER, 1), grow1)
    np.testing.assert_array_equal(g.pad_token_mask(CORNER, 2), grow2)
    # outside the grid is background: the border ring is eaten too
    np.testing.assert_array_equal(g.pad_token_mask(CORNER, -1), shrink1)
    assert not g.pad_token_mask(CORNER, -2).any()
    # a full grid shrinks by one ring from every side
    full = np.ones((7, 7), bool)
    np.testing.assert_array_equal(g.pad_token_mask(full, -2), CENTRE | RING1)


def test_pad_token_mask_across_internvl_tile_boundary():
    canvas = np.zeros((16, 32), bool)
    canvas[5, 15] = True  # last column of tile 0
    tiles = g.split_canvas(g.pad_token_mask(canvas, 1), n_cols=2, n_rows=1)
    exp0 = np.zeros((16, 16), bool)
    exp0[4:7, 14:16] = True
    exp1 = np.zeros((16, 16), bool)
    exp1[4:7, 0] = True  # the ring continues in the neighbouring tile
    np.testing.assert_array_equal(tiles[0], exp0)
    np.testing.assert_array_equal(tiles[1], exp1)


def test_split_canvas_row_major_order():
    canvas = np.arange(6 * 4).reshape(4, 6)  # 2 rows x 3 cols of 2x2 tiles
    tiles = g.split_canvas(canvas, n_cols=3, n_rows=2, tokens_per_tile=2)
    assert tiles.shape == (6, 2, 2)
    np.testing.assert_array_equal(tiles[1], [[2, 3], [8, 9]])  # tile (0, 1)
    np.testing.assert_array_equal(tiles[3], [[12, 13], [18, 19]])  # tile (1, 0)
    with pytest.raises(ValueError):
        g.split_canvas(canvas, n_cols=2, n_rows=2, tokens_per_tile=2)


# --------------------------------------------------------------------------- box frames


def test_xywh_xyxy():
    assert g.xywh_to_xyxy([10, 20, 30, 40]) == (10, 20, 40, 60)
    assert g.xyxy_to_xywh((10, 20, 40, 60)) == (10, 20, 30, 40)


def test_llava_norm_hand_example():
    # 600x400: S=600, y offset (600-400)//2 = 100
    assert g.llava_norm_to_pixels((0.5, 0.25, 0.75, 0.5), 600, 400) == (300, 50, 450, 200)
    assert g.pixels_to_llava_norm((300, 50, 450, 200), 600, 400) == (0.5, 0.25, 0.75, 0.5)
    # y 0.1*600 - 100 = -40 clips to 0; y 0.95*600 - 100 = 470 clips to 400
    assert g.llava_norm_to_pixels((0.0, 0.1, 1.0, 0.95), 600, 400) == (0, 0, 600, 400)
    # portrait 400x600: x offset 100
    assert g.llava_norm_to_pixels((0.5, 0.5, 0.6, 0.6), 400, 600) == pytest.approx((200, 300, 260, 360))


def test_internvl_1000_hand_example():
    assert g.internvl_1000_to_pixels((610, 360, 920, 830), 600, 400) == pytest.approx((366, 144, 552, 332))
    assert g.pixels_to_internvl_1000((366, 144, 552, 332), 600, 400) == (610, 360, 920, 830)
    assert g.internvl_1000_to_pixels((-5, 0, 1200, 1000), 600, 400) == (0, 0, 600, 400)


def _random_box(rng, w, h):
    xs, ys = np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))
    return (xs[0], ys[0], xs[1], ys[1])


def test_box_frames_round_trip_random():
    rng = np.random.default_rng(1)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 2000, size=2))
        box = _random_box(rng, w, h)
        back = g.llava_norm_to_pixels(g.pixels_to_llava_norm(box, w, h), w, h)
        np.testing.assert_allclose(back, box, atol=1e-6)
        # InternVL is integer: ints round-trip exactly, pixels within half a unit
        b1000 = tuple(int(v) for v in np.sort(rng.integers(0, 1001, 4)))
        assert g.pixels_to_internvl_1000(g.internvl_1000_to_pixels(b1000, w, h), w, h) == b1000
        back = g.internvl_1000_to_pixels(g.pixels_to_internvl_1000(box, w, h), w, h)
        tol = 0.5e-3 * np.array([w, h, w, h]) + 1e-9
        assert np.all(np.abs(np.subtract(back, box)) <= tol)


# --------------------------------------------------------------------------- answers


def test_format_and_parse_llava():
    s = g.format_llava_box((0.61, 0.36, 0.92, 0.83))
    assert s == "[0.61, 0.36, 0.92, 0.83]"
    assert g.parse_llava_box(s) == (0.61, 0.36, 0.92, 0.83)
    assert g.format_llava_box((0.6123, 0.1, 0, 1), decimals=3) == "[0.612, 0.100, 0.000, 1.000]"


def test_format_and_parse_internvl():
    s = g.format_internvl_box((610, 360, 920, 830))
    assert s == "<box>[[610, 360, 920, 830]]</box>"
    assert g.parse_internvl_box("<ref>the dog</ref>" + s) == (610, 360, 920, 830)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The box is [0.61, 0.36, 0.92, 0.83].", (0.61, 0.36, 0.92, 0.83)),
        ("[1,2,3,4]", (1, 2, 3, 4)),
        ("[ -0.5 ,.25, 3., 4 ]", (-0.5, 0.25, 3.0, 4.0)),
        ("[1, 2, 3] then [4, 5, 6, 7]", (4, 5, 6, 7)),
        ("[[0.1, 0.2, 0.3, 0.4]]", (0.1, 0.2, 0.3, 0.4)),
        ("[0.9, 0.8, 0.1, 0.2]", (0.9, 0.8, 0.1, 0.2)),  # raw order kept
        ("[1, 2, 3, 4, 5]", None),
        ("[nan, 1, 2, 3]", None),
        ("[" + "9" * 400 + ", 1, 2, 3]", None),  # overflows to inf: rejected
        ("[" + "9" * 400 + ", 1, 2, 3] [1, 2, 3, 4]", (1, 2, 3, 4)),
        ("no box here", None),
        ("[١, ٢, ٣, ٤]", None),  # non-ASCII digits are not numbers here
        ("", None),
    ],
)
def test_parse_llava_cases(text, expected):
    assert g.parse_llava_box(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[[1, 2, 3, 4]] <box>[[5, 6, 7, 8]]</box>", (5, 6, 7, 8)),  # <box> preferred
        ("<box> [[ 5,6 ,7, 8 ]] </box>", (5, 6, 7, 8)),
        ("answer: [[10, 20, 30, 40]]", (10, 20, 30, 40)),
        ("answer: [10, 20, 30, 40]", (10, 20, 30, 40)),
        ("<box>[[1, 2, 3]]</box> [4, 5, 6, 7]", (4, 5, 6, 7)),
        ("<box>[[1, 2, 3]]</box>", None),
        ("nothing", None),
    ],
)
def test_parse_internvl_cases(text, expected):
    assert g.parse_internvl_box(text) == expected


_BOXY = st.text(alphabet=st.sampled_from(list("[]<>/box ,.-0123456789enaif\n")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _BOXY))
def test_parsers_never_raise(text):
    for parse in (g.parse_llava_box, g.parse_internvl_box):
        out = parse(text)
        assert out is None or (len(out) == 4 and all(math.isfinite(v) for v in out))


def test_parsers_non_string_input():
    assert g.parse_llava_box(None) is None  # type: ignore[arg-type]
    assert g.parse_internvl_box(b"[1,2,3,4]") is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- IoU and scaling


def test_box_iou_hand_values():
    assert g.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)  # 50 / 150
    assert g.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert g.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert g.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_box_iou_none_and_degenerate():
    assert g.box_iou(None, (0, 0, 10, 10)) == 0.0
    assert g.box_iou((5, 5, 5, 10), (0, 0, 10, 10)) == 0.0  # zero width
    assert g.box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # reversed corners
    assert g.box_iou((0, 0, float("nan"), 10), (0, 0, 10, 10)) == 0.0


def test_hits_thresholds():
    assert g.hits(0.7) == {0.5: True, 0.7: True, 0.9: False}
    assert g.hits(0.49) == {0.5: False, 0.7: False, 0.9: False}
    assert g.hits(0.95, thresholds=(0.9,)) == {0.9: True}


def test_scale_box_about_centre():
    # centre (20, 40); 20x40 -> 40x80
    assert g.scale_box((10, 20, 30, 60), 2.0, 100, 100) == (0, 0, 40, 80)
    assert g.scale_box((10, 20, 30, 60), 0.5, 100, 100) == (15, 30, 25, 50)
    assert g.scale_box((0, 0, 10, 10), 2.0, 100, 100) == (0, 0, 15, 15)  # (-5,-5,15,15) clipped
    assert g.scale_box((90, 90, 100, 100), 3.0, 100, 100) == (80, 80, 100, 100)  # (80,80,110,110)


def test_llava_boxes_are_read_in_the_frame_the_model_saw(tiny_llava):
    """pad_to_square=false: the centre crop. 600x400 -> shortest edge 336, width int(336*1.5)=504, crop
    left (504-336)//2 = 84 resized px = 100 original px: the crop covers x 100..500, y 0..400."""
    from conftest import compose_cfg

    crop = type(tiny_llava)(tiny_llava.model, tiny_llava.processor, compose_cfg("model=tiny_llava", "model.pad_to_square=false").model,
                            tiny_llava.device)
    assert crop.parse_box("[0.25, 0.25, 0.5, 0.5]", 600, 400) == pytest.approx((200, 100, 300, 200))
    assert crop.format_box((200, 100, 300, 200), 600, 400) == "[0.25, 0.25, 0.50, 0.50]"
    # a box reaching outside the crop is said as its part inside it; an answer at the crop's edge is its edge
    assert crop.format_box((0, 0, 300, 400), 600, 400) == "[0.00, 0.00, 0.50, 1.00]"
    assert crop.parse_box("[0.0, 0.0, 1.0, 1.0]", 600, 400) == pytest.approx((100, 0, 500, 400))
    # portrait 400x600: the crop covers y 100..500
    assert crop.parse_box("[0.5, 0.5, 1.0, 1.0]", 400, 600) == pytest.approx((200, 300, 400, 500))
    # pad_to_square=true (the default) stays the padded square: S = 600, y offset 100
    assert tiny_llava.parse_box("[0.5, 0.25, 0.75, 0.5]", 600, 400) == pytest.approx((300, 50, 450, 200))
    assert tiny_llava.format_box((300, 50, 450, 200), 600, 400) == "[0.50, 0.25, 0.75, 0.50]"
