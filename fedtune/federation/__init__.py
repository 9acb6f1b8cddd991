"""The round engine, Flower-free. ``fedtune.flower`` adapts it to Flower messages; ``inprocess`` runs it in a loop.

One round, whichever backend carries the messages:

  1. Seeds (``seeds``): every random stream derives from the run's one ``Seeds`` object by name; a
     simulation's are reproducible from ``seed`` (``randomness: simulated``), a deployment's are secret.
  2. Sample (``sampler``): uniform; Poisson under user-level DP (what its accountant assumes); fleet
     availability (``fleet.FleetCoordinator``). Which sampler may meet which feature: ``capabilities``.
  3. Plan (``task``): each sampled device gets a typed ``TaskPlan`` (steps, batch, lr; in a fleet its tier's
     rank, alpha, quantization and the deadline) and the global adapter (at its rank).
  4. Device round (``device_round``): ``DeviceState`` (privacy ledger, private adapter part, upload
     residuals, secret streams, last round) admits the round, ``train_one`` / ``train_group`` (packed)
     trains with DP-SGD on the device's own two streams (sampling, noise), saves the ledger and private
     part, and encodes the upload (fp32 / fp16 / int8 with error feedback).
  5. Replies (``replies``): each upload is decoded against what its device was sent and validated (keys,
     shapes, finite values, example count, metrics, norm bound) into a ``Reply``, or rejected with a reason.
  6. Aggregate (``aggregate``): the pipeline applies user-level DP-FedAvg (clip, sum through a pluggable
     summer -- the secure-aggregation hook --, noise, fixed denominator; every round noised and charged)
     or the rule: FedAvg | median | trimmed mean | heterogeneous ranks. It reports the mechanisms applied.
     With ``privacy.secure_aggregation`` (in-process backend; ``secure_round``) devices clip, quantize and
     mask their uploads (SecAgg+), the pipeline gets tensor-free replies and only the cohort's unmasked
     sum (``Pipeline.aggregate_secure``), and user-level noise goes on that sum.
  7. Label and record (``labels``; the backends' recorders): the privacy label comes from the applied
     mechanisms and the replies' own ledgers; the global adapter is evaluated, saved with that label
     (``fedtune.json``), one record goes to metrics.jsonl and the checkpoint is written.

Before round 1, ``server.build_server`` sets up seeds, population, sampler, user-level plan, fleet
coordinator, rule and reply limits for either backend (resumed from a checkpoint where there is one);
``virtual_device`` maps a simulated device to its data user and ledger key.

Import the submodules directly; this package imports nothing, so any layer may use ``federation.seeds``.
"""
