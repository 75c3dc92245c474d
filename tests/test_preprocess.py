import math

import pytest
import torch

from clasp_torch.preprocess import preprocess_image, target_size


@pytest.mark.parametrize("p", [14, 16])
def test_exact_multiples_unchanged(p):
    assert target_size(10 * p, 20 * p, p) == (10 * p, 20 * p)


def test_rounds_down_not_up():
    assert target_size(480, 640, 14) == (476, 630)  # 34 x 45 patches = 1530
    assert target_size(427, 640, 16) == (416, 640)


@pytest.mark.parametrize("H,W", [(3000, 4000), (4000, 3000), (12000, 1000), (3024, 4032)])
@pytest.mark.parametrize("p", [14, 16])
def test_large_images_capped_and_aspect_kept(H, W, p):
    Ht, Wt = target_size(H, W, p, max_patches=2500)
    assert Ht % p == 0 and Wt % p == 0
    h, w = Ht // p, Wt // p
    assert h * w <= 2500
    assert h * w >= 0.9 * 2500 * min(1.0, 1.0)  # uses most of the budget
    assert math.isclose(h / w, H / W, rel_tol=0.1)


def test_max_patches_respected_for_many_sizes():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        H, W = (int(v) for v in torch.randint(14, 5000, (2,), generator=g))
        m = int(torch.randint(1, 3000, (1,), generator=g))
        Ht, Wt = target_size(H, W, 14, m)
        assert (Ht // 14) * (Wt // 14) <= m
        assert 14 <= Ht <= H and 14 <= Wt <= W


def test_too_small_raises():
    with pytest.raises(ValueError, match="smaller than one"):
        target_size(10, 100, 14)


def test_preprocess_uint8_and_float():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8, generator=g)
    x, (h, w) = preprocess_image(img, 16, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 96, 144) and (h, w) == (6, 9) and x.dtype == torch.float32
    x2, _ = preprocess_image(img.float() / 255, 16, (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(x, x2)
    assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5


def test_preprocess_normalisation_constant_image():
    img = torch.full((3, 28, 42), 0.5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x, (h, w) = preprocess_image(img, 14, mean, std)
    assert (h, w) == (2, 3)
    expected = (0.5 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)


def test_preprocess_large_image_capped():
    img = torch.zeros(3, 3000, 4000, dtype=torch.uint8)
    x, (h, w) = preprocess_image(img, 14, (0.5,) * 3, (0.5,) * 3, max_patches=2500)
    assert h * w <= 2500 and x.shape == (3, 14 * h, 14 * w)
