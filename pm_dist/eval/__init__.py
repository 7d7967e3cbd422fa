"""Evaluation: ``.bin`` verification sets (10-fold, insightface-exact), TAR@FAR on pair lists,
1:N identification, and the report (rich table, JSON, ROC PNG). See docs/evaluation.md.

Every ``evaluate_*`` function runs on all ranks under torchrun (embedding shared out by batches,
results gathered) and returns the same result dict on every rank; ``write_report`` writes on rank 0.
"""

from .binfile import BinFormatError, read_bin, write_bin
from .embed import EmbeddingError, Embeddings, extract_embeddings
from .identification import identification_metrics
from .images import FileSource, ImageDecodeError
from pm_dist.models.loading import OnnxEncoder, load_model
from .lists import ListFormatError, read_pair_list, read_subject_list, read_template_list
from .protocol import insightface_line, verification_metrics, verification_metrics_from_distances
from .report import print_report, write_report
from .roc import STANDARD_FARS, roc_curve, roc_metrics, tar_at_far
from .from_lists import evaluate_identification_lists, evaluate_pair_list
from .identification import evaluate_identification
from .synthetic import evaluate_synthetic
from .templates import aggregate_templates
from .verification import VerificationSet, evaluate_verification, load_bin

__all__ = [
    "BinFormatError", "EmbeddingError", "Embeddings", "FileSource", "ImageDecodeError", "ListFormatError",
    "OnnxEncoder", "STANDARD_FARS", "VerificationSet", "aggregate_templates", "evaluate_identification",
    "evaluate_identification_lists", "evaluate_pair_list", "evaluate_synthetic", "evaluate_verification",
    "extract_embeddings", "identification_metrics", "insightface_line", "load_bin", "load_model",
    "print_report", "read_bin", "read_pair_list", "read_subject_list", "read_template_list", "roc_curve",
    "roc_metrics", "tar_at_far", "verification_metrics", "verification_metrics_from_distances", "write_bin",
    "write_report",
]
