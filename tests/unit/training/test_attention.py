import torch

from fedtune.training.attention import training_attention


def test_cuda_steps_run_without_cudnn_attention_and_restore_it():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cpu_steps_change_nothing():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
