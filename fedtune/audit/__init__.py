"""Privacy audits of a trained adapter: the canary ("secret sharer") exposure audit; knows nothing of Flower."""

from fedtune.audit.canary import (
    CanaryAuditConfig,
    CanaryAuditResult,
    CanaryExposure,
    ExposureSummary,
    candidate_secrets,
    count_occurrences,
    format_result,
    insert_canaries,
    make_canaries,
    run_canary_audit,
)
from fedtune.audit.exposure import Exposure, exposure_of, secret_log_perplexities

__all__ = [
    "CanaryAuditConfig",
    "CanaryAuditResult",
    "CanaryExposure",
    "Exposure",
    "ExposureSummary",
    "candidate_secrets",
    "count_occurrences",
    "exposure_of",
    "format_result",
    "insert_canaries",
    "make_canaries",
    "run_canary_audit",
    "secret_log_perplexities",
]
