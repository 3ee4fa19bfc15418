"""Settings of the prepare stage: :class:`PrepareConfig`, every limit the photo checks use."""

from __future__ import annotations

from dataclasses import dataclass

from lora_helpers.prepare.align import AlignSpec

__all__ = ["PrepareConfig"]


@dataclass
class PrepareConfig:
    """Settings for :func:`lora_helpers.prepare.stage.prepare_photos`; the defaults suit SDXL at 1024 px.

    Attributes:
        resolution: side of the square SDXL bucket; other buckets scale with it
            (64 in smoke mode gives 64x64, 56x72, ...).
        square_only: always crop 1:1 instead of the bucket nearest the photo's aspect.
        eye_y: eye midpoint height as a fraction of the output (eyes sit centred across).
        face_fraction: face size as a fraction of the output's short side.
        max_upscale: never enlarge a photo more than this.
        max_zoom: enlarge the face up to this much beyond ``face_fraction`` to avoid padding.
        padding: fill for crop areas outside the photo: "blur" or "reflect".
        ideal_short_side: photos with a shorter short side get a warning.
        min_short_side: photos below this are rejected (half of 1024: the whole photo
            would have to be enlarged more than 2x).
        min_face_px, good_face_px: face size (about its width) in photo pixels below
            which a photo is rejected / warned about.
        min_sharpness, good_sharpness: face sharpness limits (see
            :class:`lora_helpers.prepare.quality.FaceMeasures`).
        min_relative_sharpness, warn_relative_sharpness: face sharpness as a share of
            the set's median below which a photo is rejected / warned about.
        brightness_limits: (reject below, warn below, warn above, reject above) for
            the face's mean grey level.
        clipped_limits: (warn above, reject above) for the share of blown or crushed
            face pixels.
        clarity_pass: minimum ``face_clarity_score``.
        second_face_ratio: a second face at least this share of the main face's area
            is a second subject (reject); smaller ones only warn.
        max_roll: head tilt (degrees) above which a photo is warned about.
        duplicate_distance: perceptual-hash bits (of 64) within which photos are
            near-duplicates.
        identity_threshold: cosine similarity to the set below which a face is taken
            for someone else.
        background_weight: mask value outside the face (0..1); 0 keeps the contract
            (the trainer applies its own weight).
        mask: "hull" (landmark outline plus forehead) or "ellipse".
        normalise: gentle gray-world white balance and CLAHE on lightness.
        backend: face backend name for :func:`lora_helpers.prepare.faces.get_backend`.
        detect_max_side: longest side for the first face-detection pass.
        quality_threshold: resize quality (share of a crop's detail that is real, see
            :func:`lora_helpers.prepare.align.resize_quality`) below which a crop gets a warning.
        hold_out: photos kept out of training for the held-out likeness score: None (or
            "auto") chooses (none below 8 usable photos, 1 from 8, 2 from 12; see
            :mod:`lora_helpers.prepare.holdout`), 0 holds none out, a number holds that many.
            Per-photo "hold_out" / "train" overrides win over the choice. With several people the
            rule applies to each person's photos.
        subjects: whose photos these are (see :mod:`lora_helpers.prepare.subjects`): "auto"
            (one subfolder per person when the photo folder holds only subfolders, else one
            person), "one", "folders" (one subfolder per person) or "group" (one mixed folder,
            grouped by face).
    """

    resolution: int = 1024
    square_only: bool = False
    # Alignment defaults live in AlignSpec, so both stay the same.
    eye_y: float = AlignSpec.eye_y
    face_fraction: float = AlignSpec.face_fraction
    max_upscale: float = AlignSpec.max_upscale
    max_zoom: float = AlignSpec.max_zoom
    padding: str = "blur"
    ideal_short_side: int = 1024
    min_short_side: int = 512
    min_face_px: float = 64.0
    good_face_px: float = 128.0
    min_sharpness: float = 300.0
    good_sharpness: float = 900.0
    min_relative_sharpness: float = 0.3
    warn_relative_sharpness: float = 0.5
    brightness_limits: tuple[float, float, float, float] = (30.0, 60.0, 215.0, 235.0)
    clipped_limits: tuple[float, float] = (0.05, 0.25)
    clarity_pass: float = 0.9
    second_face_ratio: float = 0.25
    max_roll: float = 25.0
    duplicate_distance: int = 8
    identity_threshold: float | None = None
    background_weight: float = 0.0
    mask: str = "hull"
    normalise: bool = False
    backend: str = "dlib"
    detect_max_side: int = 1024
    quality_threshold: float = 0.95
    hold_out: int | None = None
    subjects: str = "auto"

    def __post_init__(self):
        if self.padding not in ("blur", "reflect"):
            raise ValueError(f"padding must be 'blur' or 'reflect', got {self.padding!r}")
        if self.mask not in ("hull", "ellipse"):
            raise ValueError(f"mask must be 'hull' or 'ellipse', got {self.mask!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px, got {self.resolution}")
        # A face fraction of 0 makes every crop transform singular (a LinAlgError per photo).
        if not 0.0 < self.face_fraction <= 1.0:
            raise ValueError(f"face_fraction must be above 0 and at most 1 (default {AlignSpec.face_fraction}), "
                             f"got {self.face_fraction}")
        for name in ("eye_y",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        for name in ("max_upscale", "max_zoom"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight must be within 0..1, got {self.background_weight}")
        if not 0.0 <= self.quality_threshold <= 1.0:
            raise ValueError(f"quality_threshold must be within 0..1 (default 0.95), got {self.quality_threshold}")
        if self.subjects not in ("auto", "one", "folders", "group"):
            raise ValueError(f"subjects must be 'auto', 'one', 'folders' (a subfolder per person) or 'group' "
                             f"(group a mixed folder by face), got {self.subjects!r}")
        if isinstance(self.hold_out, str):  # a form field or the command line: "auto", "0", "2"
            text = self.hold_out.strip().lower()
            self.hold_out = None if text in ("auto", "") else int(text) if text.isdigit() else self.hold_out
        if self.hold_out is not None and (isinstance(self.hold_out, bool) or not isinstance(self.hold_out, int)
                                          or self.hold_out < 0):
            raise ValueError(f"hold_out must be 'auto' (None: choose from the number of photos), 0 (none) or a "
                             f"number of photos, got {self.hold_out!r}")
