"""What fedtune's Flower message handling costs per packed round, before and after its own codec, on one machine.

A SmolLM2-135M-shaped LoRA adapter (r=8 on q,k,v,o over 30 layers: 240 tensors, 921,600 values), a packed
group of 50 devices and a round of 100 replies (fp16 uploads), timed side by side in one process:
  - client: decoding the group's incoming adapters (Flower's ``to_torch_state_dict`` per device, vs fedtune's
    codec once per shared adapter) and encoding 50 replies (``ArrayRecord(state_dict)`` vs fedtune's flat codec);
  - server: decoding and validating 100 replies (``to_torch_state_dict`` + convert-then-clone, vs now), and the
    finite check + update norm alone (several torch ops per tensor, vs one fused op over all tensors);
  - the pickled size of one group message (what Ray ships to the actor).

    PYTHONPATH=$PWD python bench/flower_messages.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.aggregation.validate import update_norm, validate_update
from fedtune.federation.replies import ReplyLimits, accept_reply
from fedtune.flower.packed_grid import arrays_part, pack_group, part_key
from fedtune.flower.records import arrays_to_state, arrays_to_tensors, state_to_arrays, tensors_to_arrays

GROUP, ROUND = 50, 100


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight":
            torch.randn((8, 576) if ab == "A" else (576 if m in "qo" else 192, 8), generator=g)
            for i in range(30) for m in "qkvo" for ab in "AB"}


def old_pack(messages, devices):  # before: every device's part carries the arrays
    content = RecordDict({"group": ConfigRecord({"size": len(messages)})})
    for i, (m, d) in enumerate(zip(messages, devices)):
        content[part_key("arrays", i)] = m.content["arrays"]
        content[part_key("config", i)] = ConfigRecord({**dict(m.content["config"]), "device-index": d})
    return Message(content=content, dst_node_id=messages[0].metadata.dst_node_id, message_type="train.packed")


def old_client(msg):
    incoming = [{k: v.clone() for k, v in msg.content[part_key("arrays", i)].to_torch_state_dict().items()}
                for i in range(GROUP)]
    return incoming


def new_client(msg):
    group, decoded, incoming = msg.content["group"], {}, []
    for i in range(GROUP):
        j = arrays_part(group, i)
        if j not in decoded:
            decoded[j] = arrays_to_state(msg.content[part_key("arrays", j)])
        incoming.append({k: v.clone() for k, v in decoded[j].items()} if j != i else decoded[j])
    return incoming


def old_server(replies, ref):
    for r in replies:
        state = {k: v.to(torch.float32).clone() for k, v in r.to_torch_state_dict().items()}
        validate_update(state, ref, 10.0)


def new_server(replies, ref):
    for r in replies:
        accept_reply(arrays_to_tensors(r), {"num-examples": 10.0, "train-loss": 1.0}, sent=ref, reference=ref,
                     limits=ReplyLimits())


def per_tensor_checks(states, ref):  # session 6's checks: several Python-level torch ops per tensor
    for state in states:
        for name, r in ref.items():
            t = state[name]
            assert tuple(t.shape) == tuple(r.shape) and t.dtype.is_floating_point
            assert torch.isfinite(t.sum()) or torch.isfinite(t).all()
        sum(float((state[n].double() - r.double()).pow(2).sum()) for n, r in ref.items())


def fused_checks(states, ref):  # now: aggregation.validate's fused finite check and update norm
    for state in states:
        validate_update(state, ref, 10.0)
        update_norm(state, ref)


def strategy_server(replies, ref):  # what AdapterFedAvg does with a round's replies
    from fedtune.flower.strategy import AdapterFedAvg, RoundStats

    strategy = AdapterFedAvg(reference=ref, clients_per_round=len(replies), min_clients=1, seed=0)
    strategy.current = ref
    msgs = [Message(RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": 10.0, "train-loss": 1.0})}),
                    dst_node_id=0, message_type=MessageType.TRAIN) for r in replies]
    stats = RoundStats()
    assert all(strategy._validated(m, stats) is not None for m in msgs)


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    repeats = ap.parse_args().repeats
    torch.set_num_threads(1)  # as in a Ray actor with num_cpus=1
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7  # what a SuperNode sets
    ref = adapter(0)
    arrays = state_to_arrays(ref)
    cfg = ConfigRecord({"server-round": 1, "local-steps": 4, "lr": 0.001})
    msgs = [Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=n + 1, message_type=MessageType.TRAIN)
            for n in range(GROUP)]
    before, after = old_pack(msgs, list(range(GROUP))), pack_group(msgs, list(range(GROUP)))
    uploads = [{k: v.half() for k, v in adapter(s).items()} for s in range(1, 6)]
    replies_old = [ArrayRecord(uploads[i % 5]) for i in range(ROUND)]
    replies_new = [tensors_to_arrays(uploads[i % 5]) for i in range(ROUND)]  # flat
    decoded = [{k: v.float() for k, v in uploads[i % 5].items()} for i in range(ROUND)]
    rows = [
        ("client: decode the group's 50 incoming adapters", lambda: old_client(before), lambda: new_client(after)),
        ("client: encode 50 replies", lambda: [ArrayRecord(uploads[i % 5]) for i in range(GROUP)],
         lambda: [tensors_to_arrays(uploads[i % 5]) for i in range(GROUP)]),
        ("server: decode + validate 100 replies", lambda: old_server(replies_old, ref),
         lambda: new_server(replies_new, ref)),
        ("  the same through the strategy", lambda: old_server(replies_old, ref),
         lambda: strategy_server(replies_new, ref)),
        ("server: finite check + update norm of 100 replies", lambda: per_tensor_checks(decoded, ref),
         lambda: fused_checks(decoded, ref)),
    ]
    print(f"{'piece':52s} {'before s':>9s} {'after s':>9s}")
    for name, old, new in rows:
        print(f"{name:52s} {timed(old, repeats):9.3f} {timed(new, repeats):9.3f}")
    print(f"{'pickled group message, MB':52s} {len(pickle.dumps(before)) / 1e6:9.1f} {len(pickle.dumps(after)) / 1e6:9.1f}")


if __name__ == "__main__":
    main()
