"""Likeness and prompt-adherence metrics: face embeddings, and CLIP.

Identity: the largest face of an image is embedded with a face-recognition model
(dlib's ResNet offline; ArcFace through ``insightface`` where installed);
:mod:`lora_helpers.evaluate.identity` compares it by cosine similarity with the mean
embedding of the person's reference photos (training and held-out).

CLIP (as in the DreamBooth paper): CLIP-T is the cosine of image and prompt embeddings
with the identifier removed from the prompt, CLIP-I the similarity to the reference
photos, and diversity the mean pairwise CLIP distance of images of one prompt.
:mod:`lora_helpers.evaluate.scoring` applies them to images, :mod:`lora_helpers.evaluate.run` to whole runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from lora_helpers.core.config import resolve_models
from lora_helpers.core.images import load_image
from lora_helpers.core.runtime import default_device, default_dtype
from lora_helpers.prepare.faces import SAME_PERSON_COSINE, Face, detect_faces, get_backend

__all__ = [
    "ARCFACE_SAME_PERSON_COSINE",
    "face_backend",
    "default_threshold",
    "as_image",
    "largest_face_embedding",
    "unit",
    "ClipScorer",
    "load_clip",
    "remove_identifier",
    "clip_scores",
    "clip_image_scores",
    "diversity",
]

ARCFACE_SAME_PERSON_COSINE = 0.4
"""Cosine above which two ArcFace (insightface buffalo_l) embeddings are the same person."""

# HOG finds faces from ~80 px; smaller images (thumbnails, smoke-size crops) are enlarged first.
_MIN_DETECT_SIDE = 400


# --- identity ----------------------------------------------------------------------


class _InsightFaceBackend:
    """ArcFace (insightface ``buffalo_l``): detector, 5 key points, 512-d embedding."""

    def __init__(self, name: str = "buffalo_l", det_size: tuple[int, int] = (640, 640)):
        # Optional (not installed by default): imported only when the ArcFace backend is asked for.
        import onnxruntime  # noqa: F401  (insightface needs it; fail here with its name)
        from insightface.app import FaceAnalysis

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        self._app = FaceAnalysis(name=name, allowed_modules=["detection", "recognition"], providers=providers)
        self._app.prepare(ctx_id=0, det_size=det_size)

    def detect(self, image: np.ndarray) -> list:
        found = self._app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface wants BGR
        faces = [Face(box=tuple(float(v) for v in f.bbox), landmarks=np.asarray(f.kps, dtype=np.float64),
                      score=float(f.det_score)) for f in found]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def embed(self, image: np.ndarray, face) -> np.ndarray:
        from insightface.app.common import Face as InsightFace  # optional, as in __init__

        f = InsightFace(bbox=np.asarray(face.box), kps=np.asarray(face.landmarks, dtype=np.float32), det_score=face.score)
        vec = self._app.models["recognition"].get(np.ascontiguousarray(image[:, :, ::-1]), f)
        return np.asarray(vec, dtype=np.float32)


_EXTRA_BACKENDS: dict[str, Any] = {}


def face_backend(name: str = "dlib"):
    """Return a face backend by name: ``"dlib"``, ``"dlib5"`` or ``"insightface"`` (ArcFace).

    Raises:
        ModuleNotFoundError: for ``"insightface"`` when it is not installed, with the pip line.
    """
    if name in ("insightface", "arcface"):
        if "insightface" not in _EXTRA_BACKENDS:
            try:
                _EXTRA_BACKENDS["insightface"] = _InsightFaceBackend()
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    f"the ArcFace backend needs {exc.name}: `pip install insightface onnxruntime` "
                    "(or use face_backend='dlib', which works offline)"
                ) from exc
        return _EXTRA_BACKENDS["insightface"]
    return get_backend(name)


def default_threshold(backend_name: str) -> float:
    """The same-person cosine of a face backend: ArcFace's or dlib's."""
    return ARCFACE_SAME_PERSON_COSINE if backend_name in ("insightface", "arcface") else SAME_PERSON_COSINE


def as_image(item) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (ImageLoadError names an unreadable file)."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    return load_image(item)


def largest_face_embedding(image: Image.Image, backend) -> tuple[np.ndarray | None, int]:
    """(embedding of the largest face or None, number of faces) of an RGB image."""
    import cv2  # as in prepare.faces: importing this module does not load OpenCV

    array = np.asarray(image)
    longest = max(array.shape[:2])
    if longest < _MIN_DETECT_SIDE:
        k = _MIN_DETECT_SIDE / longest
        array = cv2.resize(array, (round(array.shape[1] * k), round(array.shape[0] * k)), interpolation=cv2.INTER_CUBIC)
    faces = detect_faces(array, backend=backend)
    if not faces:
        return None, 0
    vec = np.asarray(backend.embed(array, faces[0]), dtype=np.float64)
    return vec, len(faces)


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length (a zero vector stays zero)."""
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


# --- CLIP --------------------------------------------------------------------------


class ClipScorer:
    """CLIP image and text embeddings (unit length) in batches.

    Args:
        model: hub id or folder (None: ``resolve_models().clip``).
        device: torch device (None: CUDA when present).
        batch_size: images or texts per forward pass.
    """

    def __init__(self, model: str | Path | None = None, *, device=None, batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor  # seconds to import; only CLIP scoring needs it

        self.name = str(model or resolve_models().clip)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = default_dtype(self.device)
        self.model = CLIPModel.from_pretrained(self.name, dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.name)
        self.batch_size = batch_size

    def _run(self, items: list, fn) -> np.ndarray:
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(items), self.batch_size):
                e = fn(items[i : i + self.batch_size]).float()
                chunks.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)

    def image_embeddings(self, images: Sequence) -> np.ndarray:
        """``N x D`` unit embeddings of PIL images or paths."""
        def fn(batch):
            pix = self.processor.image_processor([as_image(x) for x in batch], return_tensors="pt")["pixel_values"]
            out = self.model.vision_model(pixel_values=pix.to(self.device, self.dtype))
            return self.model.visual_projection(out.pooler_output)

        return self._run(list(images), fn)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``N x D`` unit embeddings of texts (truncated to CLIP's 77 tokens)."""
        def fn(batch):
            tok = self.processor.tokenizer(list(batch), padding=True, truncation=True, max_length=77, return_tensors="pt")
            out = self.model.text_model(**{k: v.to(self.device) for k, v in tok.items()})
            return self.model.text_projection(out.pooler_output)

        return self._run(list(texts), fn)


def load_clip(model: str | Path | ClipScorer | None = None, **kwargs) -> ClipScorer:
    """A :class:`ClipScorer` (an existing one is returned as is)."""
    return model if isinstance(model, ClipScorer) else ClipScorer(model, **kwargs)


def remove_identifier(prompt: str, identifier: str | None) -> str:
    """Remove the rare identifier (e.g. ``"TOK"``) from a prompt, as whole words.

    ``"a photo of TOK person, smiling"`` becomes ``"a photo of person, smiling"``: CLIP does
    not know the identifier, so leaving it in measures noise.
    """
    if not identifier:
        return prompt
    # Case-insensitive with "@"-aware word boundaries, as the caption stage matches it.
    text = re.sub(rf"(?<![\w@]){re.escape(identifier)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", text))
    return re.sub(r"^[\s,;:]+", "", text).strip()


def clip_scores(images: Sequence, prompts: Sequence[str], *, clip_model=None, subject_phrase_to_remove: str | None = None) -> list[float]:
    """CLIP-T: cosine similarity of each image and its prompt (identifier removed).

    Args:
        images: PIL images or paths.
        prompts: one prompt per image.
        clip_model: a :class:`ClipScorer`, hub id or folder (None: the default CLIP).
        subject_phrase_to_remove: the identifier to remove from each prompt, e.g. ``"TOK"``.

    Returns:
        One float per image (about 0.2-0.35 for matching pairs with ViT-L/14).
    """
    if len(images) != len(prompts):
        raise ValueError(f"clip_scores: {len(images)} images but {len(prompts)} prompts")
    clip = load_clip(clip_model)
    img = clip.image_embeddings(images)
    txt = clip.text_embeddings([remove_identifier(p, subject_phrase_to_remove) for p in prompts])
    return [float(v) for v in (img * txt).sum(axis=1)]


def clip_image_scores(images: Sequence, references: Sequence, *, clip_model=None) -> list[float]:
    """CLIP-I: mean cosine similarity of each image to the reference photos' CLIP embeddings."""
    clip = load_clip(clip_model)
    ref = clip.image_embeddings(references)
    return [float(v) for v in (clip.image_embeddings(images) @ ref.T).mean(axis=1)]


def diversity(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance of unit embeddings (NaN for fewer than two)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if len(e) < 2:
        return float("nan")
    sims = e @ e.T
    iu = np.triu_indices(len(e), k=1)
    return float(np.mean(1.0 - sims[iu]))
