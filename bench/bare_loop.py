"""The reference a client step is compared against: a bare peft + opacus loop, no fedtune.

It does the same work as ``fedtune.training.train_local`` (same base, LoRA, AdamW, opacus DP-SGD with
Poisson sampling and the hooks grad-sampler, the model's own loss) and nothing else: no adapter-state
copy in or out, no ledger, no config objects. Used by ``bench/client_step.py --impl bare``.
"""

from __future__ import annotations

import torch


def bare_train(model, train: torch.Tensor, steps: int, batch: int, lr: float, dp: bool, seed: int,
               noise: float = 1.0, clip: float = 1.0, ghost: bool = False) -> int:
    """Train ``steps`` steps on ``train`` [N, T]; return the number of tokens seen.

    ``ghost``: opacus' own fast gradient clipping (``grad_sample_mode="ghost"``: per-sample norms without
    per-sample gradients, a second backward pass with the clipping weights) instead of the hooks mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train), batch_size=batch, shuffle=True,
                                         generator=gen, drop_last=not dp)
    module, engine = model, None
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        if ghost:
            module, opt, criterion, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
                noise_multiplier=noise, max_grad_norm=clip, poisson_sampling=True, grad_sample_mode="ghost")
        else:
            module, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                      noise_multiplier=noise, max_grad_norm=clip,
                                                      poisson_sampling=True, grad_sample_mode="hooks")
    device, tokens, done = params[0].device, 0, 0
    model.train()
    while done < steps:
        for (x,) in loader:
            if x.shape[0] == 0:
                continue
            x = x.to(device)
            if ghost:  # [B, T-1, V] logits, the per-sample mean loss through opacus' criterion wrapper
                logits = module(input_ids=x).logits[:, :-1]
                criterion(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), shape=logits.shape).backward()
            else:
                module(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += x.numel()
            done += 1
            if done == steps:
                break
    if engine is not None:
        module._close()
    return tokens
