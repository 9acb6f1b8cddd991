"""A device's side of secure aggregation as Flower messages (SecAgg+, ``fedtune.privacy.secagg``).

The server's stage driver (``fedtune.flower.secagg_grid``) sends each sampled device one message per stage;
this ClientApp handler answers them, keeping everything secret in the device's own Flower context state
(``context.state[STATE_KEY]``: its two X25519 private keys, its self-mask seed, the shares its neighbours
sealed for it), so nothing the server holds or sends lets it re-derive a mask:

    query.secagg  setup (+ its id, the payload parameters)    -> KeyAdvert (fresh keys, OS randomness)
    query.secagg  its neighbours' KeyAdverts                  -> SealedShares, one per neighbour
    train.secagg  its sealed shares + the adapter and task    -> trains (``handle_train``: the plain round's
                                                                 device code), decodes its own upload, builds
                                                                 its payload (``SecureAggregation.device_payload``)
                                                                 and replies with the MASKED vector + its metrics
    query.secagg  UnmaskRequest                               -> UnmaskReply; the state is dropped

A device that declines or fails training answers stage 2 with that decline or error: to the protocol it
dropped out. Any protocol violation raises (``SecAggAbort``): the reply is an error, the device drops out.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.federation.replies import ReplyLimits, accept_reply
from fedtune.federation.secure_round import SecureAggregation
from fedtune.flower import secagg_records as rec
from fedtune.flower.context import run_context
from fedtune.flower.device import declined_reason
from fedtune.flower.records import ARRAYS_KEY, METRICS_KEY, arrays_to_state, arrays_to_tensors
from fedtune.privacy.secagg import SecAggClient, SecAggSetup, UnmaskRequest
from fedtune.privacy.secagg.client import export_state, restore_state
from fedtune.privacy.secagg.payload import VectorLayout

SECAGG_QUERY, SECAGG_TRAIN = "query.secagg", "train.secagg"
STATE_KEY = "secagg-device"  # the device's protocol state, in its own context
PARAMS_KEY = "secagg-params"  # stage 0: the device's id in the cohort and its payload parameters
_SETUP, _PARAMS = "setup.", "params."


def _save(context: Context, setup: SecAggSetup, client: SecAggClient, params: dict) -> None:
    flat = {**export_state(client), **{_SETUP + k: v for k, v in rec.setup_config(setup).items()},
            **{_PARAMS + k: v for k, v in params.items()}}
    context.state[STATE_KEY] = ConfigRecord(flat)


def _load(context: Context) -> tuple[SecAggClient, dict]:
    if STATE_KEY not in context.state.config_records:
        raise RuntimeError("secure aggregation: a stage message arrived before this device's setup (or after it "
                           "dropped out of the round); it does not take part")
    flat = dict(context.state.config_records[STATE_KEY])
    setup = rec.setup_from_config({k[len(_SETUP):]: v for k, v in flat.items() if k.startswith(_SETUP)})
    params = {k[len(_PARAMS):]: v for k, v in flat.items() if k.startswith(_PARAMS)}
    return restore_state(setup, flat), params


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=msg)


def handle_secagg(msg: Message, context: Context) -> Message:
    request = rec.from_record(msg.content)
    if isinstance(request, SecAggSetup):  # stage 0: fresh keys for this round
        params = dict(msg.content[PARAMS_KEY])
        client = SecAggClient(int(params.pop("cid")), request)
        advert = client.advertise()
        _save(context, request, client, params)
        return _reply(msg, rec.to_record(advert))
    client, params = _load(context)
    if isinstance(request, dict):  # stage 1: its neighbours' adverts
        shares = client.share_keys(request)
        _save(context, client.setup, client, params)
        return _reply(msg, rec.to_record(shares))
    if isinstance(request, UnmaskRequest):  # stage 3
        del context.state[STATE_KEY]
        return _reply(msg, rec.to_record(client.unmask(request)))
    if isinstance(request, list):  # stage 2: train, then mask
        return _masked_input(msg, context, client, params, request)
    raise ValueError(f"secure aggregation: a device got a {type(request).__name__} it does not answer")


def _masked_input(msg: Message, context: Context, client: SecAggClient, params: dict, inbox: list) -> Message:
    from fedtune.flower.client_app import handle_train  # it registers this handler

    del context.state[STATE_KEY]  # whatever happens now, this device's keys are not used again
    trained = handle_train(msg, context)
    if declined_reason(trained) is not None:
        return _reply(msg, trained.content)  # an ineligible device: it drops out of the round
    incoming = arrays_to_state(msg.content[ARRAYS_KEY])
    metrics = dict(trained.content[METRICS_KEY])
    # the upload as the server would have decoded it (int8 / fp16 rounding included), checked on the device
    own = accept_reply(arrays_to_tensors(trained.content[ARRAYS_KEY]), metrics, sent=incoming,
                       reference=incoming, limits=ReplyLimits())
    secure = SecureAggregation.for_device(run_context(context.run_config).cfg.privacy.secure_aggregation, params)
    payload = secure.device_payload(incoming, own, VectorLayout.of(incoming))
    masked = client.masked_input(payload, inbox)
    _save(context, client.setup, client, params)
    content = rec.to_record(masked)
    content[METRICS_KEY] = trained.content[METRICS_KEY]
    return _reply(msg, content)
