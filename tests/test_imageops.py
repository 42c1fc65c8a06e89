import numpy as np
import pytest
import torch

from corrvos.imageops import aggregate, pad_divide_by, to_float_image, unpad


@pytest.mark.parametrize("h,w", [(480, 854), (17, 33), (32, 48), (1, 1)])
def test_pad_unpad_round_trip(h, w):
    x = torch.randn(2, 3, h, w)
    padded, pad = pad_divide_by(x, 16)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    torch.testing.assert_close(unpad(padded, pad), x)


def test_padding_is_centred_floor_before():
    _, pad = pad_divide_by(torch.zeros(1, 480, 854))
    assert pad == (5, 5, 0, 0)  # 854 -> 864: 10 columns, 5 left 5 right
    _, pad = pad_divide_by(torch.zeros(1, 17, 17))
    assert pad == (7, 8, 7, 8)


def test_soft_aggregation_hand_values():
    prob = torch.tensor([[[0.9]], [[0.2]]])  # two objects, one pixel
    logits = aggregate(prob, dim=0)
    p = torch.tensor([0.1 * 0.8, 0.9, 0.2])
    torch.testing.assert_close(logits[:, 0, 0], torch.log(p / (1 - p)))
    out = torch.softmax(logits, 0)[:, 0, 0]
    assert out.argmax() == 1 and abs(out.sum() - 1) < 1e-6


def test_to_float_image_rejects_bad_input():
    with pytest.raises(ValueError, match="HxWx3"):
        to_float_image(np.zeros((4, 4), np.uint8))
    img = to_float_image(np.full((2, 3, 3), 255, np.uint8))
    assert img.shape == (3, 2, 3) and float(img.max()) == 1.0
