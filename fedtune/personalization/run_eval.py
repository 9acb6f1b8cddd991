"""``fedtune evaluate RUN_DIR``: per-user evaluation of a finished run, from its run directory alone.

Reads the resolved config, the prepared per-user data, the starting adapter (``adapters/round-0``), the
final global adapter (the checkpoint's round), the devices' private parts (``state/private``) and their
privacy ledgers (``state/ledgers``, read, never written), then writes ``eval/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fedtune.adapters import get_adapter_state
from fedtune.adapters.split import merge, initial_private, shared_part
from fedtune.config import ExperimentConfig, load_config
from fedtune.data.partition import load_client_data, read_index
from fedtune.personalization.evaluate import Sources, UserResult, evaluate_users
from fedtune.personalization.select import SelectionStore
from fedtune.personalization.store import PrivateStateStore
from fedtune.personalization.users import select_users
from fedtune.personalization.summary import MethodSummary, write_outputs
from fedtune.privacy.ledger import LedgerStore
from fedtune.types import AdapterState
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


class RunNotEvaluable(ValueError):
    """The directory is not a finished fedtune run (says what is missing and how to get it)."""


def final_round(run: RunDir) -> int:
    ckpt = run.root / "checkpoint.json"
    if ckpt.is_file():
        return int(json.loads(ckpt.read_text())["round"])
    rounds = [int(p.name.split("-")[1]) for p in (run.root / "adapters").glob("round-*") if p.name[6:].isdigit()]
    if not rounds:
        raise RunNotEvaluable(f"{run.root} has no saved global adapter (adapters/round-N); run "
                              "`fedtune simulate CONFIG --out DIR` first, then evaluate DIR")
    return max(rounds)


def load_round_adapter(run: RunDir, server_round: int, keys: AdapterState) -> AdapterState:
    """The saved adapter of a round, restricted to the model's trainable tensors (``keys``)."""
    from safetensors.torch import load_file

    path = run.adapter(server_round) / "adapter_model.safetensors"
    if not path.is_file():
        raise RunNotEvaluable(f"{path} is missing; the run did not finish round {server_round}")
    saved = load_file(str(path))
    missing = sorted(set(keys) - set(saved))
    if missing:
        raise RunNotEvaluable(f"{path} lacks adapter tensors {missing[:3]}; was it saved with this config?")
    return {k: saved[k].float() for k in keys}


def sources_for(run: RunDir, cfg: ExperimentConfig, template: AdapterState) -> Sources:
    initial = load_round_adapter(run, 0, template)
    final = load_round_adapter(run, final_round(run), template)
    split = cfg.personalization.split
    store = PrivateStateStore(run.private)
    ledgers = LedgerStore(run.ledgers)
    src = Sources(initial=initial, split_name=split, n_users=len(read_index(run.data)),
                  ledger_for=lambda user: ledgers.load(user, cfg.privacy.accountant) if cfg.privacy.enabled else None,
                  choices=SelectionStore(run.root / "state" / "selection"))
    if split == "none":
        src.global_state = final
    else:  # the global model of a split run is the shared part with the private part at its init
        src.split_shared = shared_part(final, split)
        src.global_state = merge(src.split_shared, initial_private(final, split))
        src.private_for = store.load
    return src


def load_model(cfg: ExperimentConfig, device: str):
    from fedtune.adapters.cached import adapter_model

    return adapter_model(cfg.model, cfg.adapter, cfg.seed, device)[0]


def sit_out_notes(run: RunDir) -> list[str]:
    """One line per reason devices declined to train (too small for their DP budget, budget spent), naming
    the users: their global model is the federation's."""
    from fedtune.report import decline_notes
    from fedtune.workspace import read_jsonl

    return decline_notes(read_jsonl(run.events))


def evaluate_run(run_dir: str | Path, methods: list[str] | None = None, device: str | None = None,
                 progress=None, overrides: dict | None = None) -> tuple[list[UserResult], list[MethodSummary]]:
    """Evaluate every user of the run; writes ``RUN_DIR/eval/`` and returns (per-user rows, summaries).

    ``overrides`` (e.g. ``{"finetune_steps": 4}``) replace fields of the run's personalization section.
    """
    run = RunDir(Path(run_dir).absolute())
    if not run.config.is_file():
        raise RunNotEvaluable(f"{run.root} is not a fedtune run directory (no config.yaml); pass the --out "
                              "directory of `fedtune simulate`")
    cfg = load_config(run.config)
    if overrides:
        cfg = cfg.model_copy(update={"personalization": cfg.personalization.model_copy(update=overrides)})
    index = read_index(run.data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg, device)
    src = sources_for(run, cfg, get_adapter_state(model))
    per = cfg.personalization
    users = select_users([row["user_id"] for row in index], per.eval_users, per.tuning_fraction, per.eval_max_users)
    wanted = set(users)
    clients = [load_client_data(run.data, i) for i, row in enumerate(index) if row["user_id"] in wanted]
    chosen = list(methods or cfg.personalization.methods)
    results = evaluate_users(model, clients, src, cfg, chosen, progress=progress)
    summaries = write_outputs(results, run.eval, title=cfg.name, notes=sit_out_notes(run))
    return results, summaries
