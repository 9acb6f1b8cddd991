"""Device secrets: a deployed device's noise and sampling cannot be derived from what the server knows,
noise and sampling are independent streams, and a deployed device never trains a round twice."""

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.data import build_client_data
from fedtune.federation.device_round import DeviceState, StaleRound, train_one
from fedtune.federation.seeds import Seeds, task_seeds
from fedtune.federation.task import TaskPlan
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientTask
from tests.conftest import make_config

PLAN = TaskPlan(server_round=3, local_steps=2, batch_size=4, lr=0.05)


def _setup():
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 2.0}, federation={"upload": "fp32"})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    return cfg, model, get_adapter_state(model), build_client_data(cfg.data, ByteEncoder(), seed=0)[0]


def _server_guess(cfg, model, start, data, task):
    """What a server that knows the run seed computes for this device's round."""
    return train_local(model, start, data, task, cfg.privacy, PrivacyLedger(data.user_id),
                       planned_steps=cfg.federation.rounds * cfg.train.local_steps,
                       weight_decay=cfg.train.weight_decay, loss_chunk_tokens=cfg.train.loss_chunk_tokens).adapter


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_server_that_knows_the_run_seed_cannot_reconstruct_a_deployed_devices_noise(tmp_path):
    cfg, model, start, data = _setup()
    device = 7
    old = ClientTask(3, 2, 4, 0.05, seed=(cfg.seed * 1_000_003 + 3 * 10_007 + device) % (2**31))  # main@ac4911b
    sampling, noise = task_seeds(Seeds.simulated(cfg.seed), 3, device)
    guesses = [_server_guess(cfg, model, start, data, t)
               for t in (old, PLAN.training_task(sampling, noise))]
    # a simulated device is reproducible from the seed: the server's regeneration matches it exactly
    sim = train_one(model, DeviceState.simulated(tmp_path / "sim", cfg.seed), cfg, start, data, PLAN, "u", device)
    assert _same(sim.update.adapter, guesses[1])
    # a deployed device's secret streams match neither formula, nor another round's secrets
    dev = [train_one(model, DeviceState.deployed_device(tmp_path / f"dev{i}"), cfg, start, data, PLAN, "u", device)
           for i in range(2)]
    for d in dev:
        assert not any(_same(d.update.adapter, g) for g in guesses)
    assert not _same(dev[0].update.adapter, dev[1].update.adapter)


def test_deployed_streams_are_secret_and_simulated_ones_reproducible():
    a, b = Seeds.secret(), Seeds.secret()
    assert a.derive("task.noise", 1, 2) != b.derive("task.noise", 1, 2)
    assert Seeds.simulated(5).derive("cohort", 1) == Seeds.simulated(5).derive("cohort", 1)
    assert Seeds.for_run(5, deployed=True).mode == "secret" and Seeds.for_run(5, deployed=False).mode == "simulated"
    assert "_key" not in repr(a) and a.root is None


def _poisson_masks(gen, n, q, steps):
    """opacus' UniformWithReplacementSampler: each epoch (1/q steps) the DataLoader first draws its base seed
    from the generator, then every step draws rand(n) < q."""
    masks, per_epoch = [], round(1 / q)
    while len(masks) < steps:
        torch.empty((), dtype=torch.int64).random_(generator=gen)  # DataLoader's _base_seed
        masks += [torch.rand(n, generator=gen) < q for _ in range(per_epoch)]
    return masks[:steps]


def test_the_noise_stream_does_not_reveal_the_batch_sampler():
    """On CPU the old code seeded noise and sampling with one seed: the noise generator replays the batches.
    Now the two streams have independent seeds, so the same recovery fails."""
    from fedtune.packed.sampling import DeviceBatches

    cfg, _, _, data = _setup()
    sampling, noise = task_seeds(Seeds.simulated(0), 1, 0)
    task = ClientTask(1, 6, 4, 0.05, seed=sampling, noise_seed=noise)
    batches = DeviceBatches(data, task, dp=True)
    q, n = batches.sample_rate, data.num_train
    actual = [batches.next() for _ in range(6)]
    members = [[tuple(row.tolist()) for row in b] for b in actual]

    def recovered(seed):
        rows = [tuple(r.tolist()) for r in data.train]
        return [[rows[i] for i in mask.nonzero().flatten().tolist()]
                for mask in _poisson_masks(torch.Generator().manual_seed(seed), n, q, 6)]

    assert recovered(task.seed) == members  # the recovery method is right: the sampler's own seed replays it
    assert recovered(task.noise_seed) != members  # the noise stream's seed does not
    assert task.noise_seed != task.seed
    assert ClientTask(1, 1, 1, 0.1, seed=4).noise_seed != 4  # a bare task never shares one stream either


def test_a_deployed_device_refuses_a_repeated_or_older_round(tmp_path):
    state = DeviceState.deployed_device(tmp_path)
    state.admit_round("run-1", 3)
    for again in (3, 2):
        with pytest.raises(StaleRound, match="not newer than round 3"):
            state.admit_round("run-1", again)
    later = DeviceState.deployed_device(tmp_path)  # persisted: a restarted device remembers
    with pytest.raises(StaleRound):
        later.admit_round("run-1", 3)
    later.admit_round("run-1", 4)
    later.admit_round("run-2", 1)  # another run starts from its own first round
    DeviceState.simulated(tmp_path / "sim", 0).admit_round("run-1", 1)  # virtual nodes: the server is the simulator
    DeviceState.simulated(tmp_path / "sim", 0).admit_round("run-1", 1)


def test_server_user_level_noise_is_secret_outside_simulations():
    from fedtune.config import UserLevelPrivacyConfig
    from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level

    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0, clip_norm=1.0)
    plan = plan_user_level(cfg, 100, 10, 3)
    g = {"w": torch.zeros(4, 4)}
    sim = [DPFedAvg(cfg, plan, 100, Seeds.simulated(0)).aggregate(g, [], 1)[0]["w"] for _ in range(2)]
    secret = DPFedAvg(cfg, plan, 100, Seeds.secret()).aggregate(g, [], 1)[0]["w"]
    assert torch.equal(sim[0], sim[1]) and not torch.equal(sim[0], secret)


class _Spy:
    """Counts the CSPRNG draws (``AesCtrStream.normal`` / ``uniform``) while the real code runs."""

    def __init__(self, monkeypatch):
        from fedtune.privacy.csprng import AesCtrStream

        self.normal = self.uniform = 0
        real_normal, real_uniform = AesCtrStream.normal, AesCtrStream.uniform

        def normal(s, *a, **k):
            self.normal += 1
            return real_normal(s, *a, **k)

        def uniform(s, *a, **k):
            self.uniform += 1
            return real_uniform(s, *a, **k)

        monkeypatch.setattr(AesCtrStream, "normal", normal)
        monkeypatch.setattr(AesCtrStream, "uniform", uniform)


def test_a_deployed_device_draws_noise_and_batches_from_the_csprng_in_both_engines(tmp_path, monkeypatch):
    from fedtune.federation.device_round import train_group
    from fedtune.privacy.csprng import AesCtrStream

    cfg, model, start, data = _setup()
    spy = _Spy(monkeypatch)
    sim = train_one(model, DeviceState.simulated(tmp_path / "sim", cfg.seed), cfg, start, data, PLAN, "u", 1)
    assert (spy.normal, spy.uniform) == (0, 0) and "torch.Generator" in sim.update.noise_generator
    dev = train_one(model, DeviceState.deployed_device(tmp_path / "dev"), cfg, start, data, PLAN, "u", 1)
    assert spy.normal == PLAN.local_steps  # one flat noise draw per DP-SGD step
    assert spy.uniform == PLAN.local_steps  # every Poisson batch (the noise draws its words apart)
    assert dev.update.noise_generator == AesCtrStream.name
    spy.normal = spy.uniform = 0
    group = train_group(model, DeviceState.deployed_device(tmp_path / "grp"), cfg, [start] * 2, [data] * 2,
                        [PLAN] * 2, ["a", "b"], [1, 2])
    assert spy.normal == 2 * PLAN.local_steps and spy.uniform == 2 * PLAN.local_steps
    assert all(t.update.noise_generator == AesCtrStream.name for t in group)


def test_a_deployed_servers_user_noise_and_cohort_come_from_the_csprng(monkeypatch):
    from fedtune.config import UserLevelPrivacyConfig
    from fedtune.federation.aggregate import UserLevelDP
    from fedtune.privacy.csprng import AesCtrStream, StreamRandom
    from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level

    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0, clip_norm=1.0)
    plan = plan_user_level(cfg, 100, 10, 3)
    spy = _Spy(monkeypatch)
    sim = DPFedAvg(cfg, plan, 100, Seeds.simulated(0))
    sim.aggregate({"w": torch.zeros(4)}, [], 1)
    assert spy.normal == 0 and "torch.Generator" in UserLevelDP(sim).report()["noise_generator"]
    dp = DPFedAvg(cfg, plan, 100, Seeds.secret())
    dp.aggregate({"w": torch.zeros(4), "v": torch.zeros(2, 3)}, [], 1)
    assert spy.normal == 2  # one draw per tensor
    assert UserLevelDP(dp).report()["noise_generator"] == AesCtrStream.name
    assert isinstance(dp.seeds.rng("cohort", 1), StreamRandom)
    assert spy.uniform == 0 and len(dp.sample(1)) <= 100


def test_a_deployed_device_with_ghost_clipping_draws_from_the_csprng_too(tmp_path, monkeypatch):
    from fedtune.privacy.csprng import AesCtrStream

    cfg, model, start, data = _setup()
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"clipping": "ghost"})})
    spy = _Spy(monkeypatch)
    sim = train_one(model, DeviceState.simulated(tmp_path / "sim", cfg.seed), cfg, start, data, PLAN, "u", 1)
    assert (spy.normal, spy.uniform) == (0, 0) and "torch.Generator" in sim.update.noise_generator
    dev = train_one(model, DeviceState.deployed_device(tmp_path / "dev"), cfg, start, data, PLAN, "u", 1)
    assert spy.normal == PLAN.local_steps and spy.uniform == PLAN.local_steps
    assert dev.update.noise_generator == AesCtrStream.name
