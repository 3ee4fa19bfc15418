"""Stage 1: check photos, find and level the face, crop to SDXL buckets, write dataset/ (notebook 01)."""

from lora_helpers.core.buckets import bucket_sizes, nearest_bucket
from lora_helpers.prepare.align import AlignSpec
from lora_helpers.prepare.config import PrepareConfig
from lora_helpers.prepare.records import VERDICTS, NoPhotosAcceptedError, PhotoRecord, PrepareResult
from lora_helpers.prepare.report import accepted_grid, contact_sheet, rejected_grid, report_rows, write_report
from lora_helpers.prepare.stage import prepare_photos, read_overrides, write_overrides
from lora_helpers.prepare.subjects import (
    SUBJECT_MODES, group_faces, read_subject_overrides, subject_slug, write_subject_overrides,
)

__all__ = [
    "AlignSpec", "bucket_sizes", "nearest_bucket",
    "accepted_grid", "contact_sheet", "rejected_grid", "report_rows", "write_report",
    "VERDICTS", "NoPhotosAcceptedError", "PhotoRecord", "PrepareConfig", "PrepareResult", "prepare_photos",
    "read_overrides", "write_overrides",
    "SUBJECT_MODES", "group_faces", "read_subject_overrides", "subject_slug", "write_subject_overrides",
]
