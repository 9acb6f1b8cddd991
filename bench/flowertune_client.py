"""Baseline ClientApp written the way Flower's FlowerTune LLM example writes it.

In FlowerTune's ``client_app.py`` every ``train`` call builds the model from scratch (``get_model``:
``from_pretrained`` with a quantization config, then ``get_peft_model``), loads the global adapter into
it, trains, and returns the adapter. Here the same: the base is loaded and quantized and LoRA attached in
every call, and the training is a bare peft loop (``bench/bare_loop.py``; FlowerTune uses trl's
SFTTrainer, which this workplace lacks). It speaks fedtune's message protocol so that fedtune's own
ServerApp drives both, on the same workload. Not DP (FlowerTune has none): compare with DP off.
"""

from __future__ import annotations

import os
import sys
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, os.path.dirname(__file__))

from bare_loop import bare_train  # noqa: E402

from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state  # noqa: E402
from fedtune.data.partition import load_client_data  # noqa: E402
from fedtune.federation.device_round import DeviceState  # noqa: E402
from fedtune.federation.task import TaskPlan  # noqa: E402
from fedtune.flower.context import run_context  # noqa: E402
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, state_to_arrays  # noqa: E402
from fedtune.flower.records import update_to_metrics  # noqa: E402
from fedtune.models.loader import load_base_model  # noqa: E402
from fedtune.types import ClientUpdate  # noqa: E402

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    ctx = run_context(context.run_config)  # the config and the run's data (no model in it)
    cfg, config = ctx.cfg, msg.content[CONFIG_KEY]
    partition = int(context.node_config["partition-id"])
    task = DeviceState.simulated(ctx.run.root / "state", cfg.seed).training_task(TaskPlan.from_wire(config), partition)
    base, _ = load_base_model(cfg.model, ctx.device)  # FlowerTune: model = get_model(cfg.model), every call
    model = create_adapter(base, cfg.adapter, seed=cfg.seed)
    set_adapter_state(model, arrays_to_state(msg.content[ARRAYS_KEY]))
    data = load_client_data(ctx.run.data, partition)
    tokens = bare_train(model, data.train, task.local_steps, min(task.batch_size, data.num_train), task.lr,
                        dp=False, seed=task.seed)
    update = ClientUpdate(adapter=get_adapter_state(model), num_examples=data.num_train, train_loss=0.0,
                          steps=task.local_steps, tokens=tokens)
    metrics = update_to_metrics(update, time.perf_counter() - start, partition)
    return Message(content=RecordDict({ARRAYS_KEY: state_to_arrays(update.adapter), METRICS_KEY: metrics}),
                   reply_to=msg)
