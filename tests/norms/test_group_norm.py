import pytest
import torch
from torch import nn

from norms import choose_groups, group_norm


@pytest.mark.parametrize(
    "channels,groups",
    # The seed notes' table (groupnorm-notes, choose_gn_groups).
    [
        (24, 8),
        (32, 32),
        (48, 16),
        (64, 32),
        (96, 32),
        (128, 32),
        (160, 32),
        (256, 32),
        (12, 4),
        (6, 2),
        (7, 1),
    ],
)
def test_choose_groups_table(channels, groups):
    assert choose_groups(channels) == groups


def test_choose_groups_custom_preferences_and_errors():
    assert choose_groups(64, preferred=(16, 8)) == 16
    with pytest.raises(ValueError, match="num_channels=7"):
        choose_groups(7, preferred=(4, 2))
    with pytest.raises(ValueError, match="num_channels=0"):
        choose_groups(0)


def test_group_norm_builder():
    gn = group_norm(48)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 16 and gn.num_channels == 48
    assert group_norm(48, num_groups=4).num_groups == 4
    with pytest.raises(ValueError, match=r"num_groups=5 does not divide num_features=48"):
        group_norm(48, num_groups=5)


def test_group_norm_is_batch_independent():
    gn = group_norm(8)
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))
