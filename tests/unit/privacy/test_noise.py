import torch

from fedtune.privacy.noise import flat_gaussian_noise


def test_noise_is_one_flat_draw_split_in_order():
    refs = [torch.zeros(2, 3), torch.zeros(4)]
    noise = flat_gaussian_noise(0.5, refs, torch.Generator().manual_seed(3))
    flat = torch.normal(0.0, 0.5, size=(10,), generator=torch.Generator().manual_seed(3))
    assert [n.shape for n in noise] == [torch.Size([2, 3]), torch.Size([4])]
    assert torch.equal(torch.cat([n.reshape(-1) for n in noise]), flat)


def test_zero_std_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    assert all(torch.count_nonzero(n) == 0 for n in flat_gaussian_noise(0.0, [torch.zeros(5)], gen))
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(3)))
