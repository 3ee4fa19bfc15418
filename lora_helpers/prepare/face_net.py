"""dlib's 128-d face-recognition ResNet, run with numpy.

The ``dlib-bin`` wheels are built without BLAS, so dlib's own forward pass of its face
ResNet takes about 0.1 s on one core: a quarter of preparing a 12-MP photo. The same
network as im2col convolutions on numpy's BLAS takes about 0.015 s and gives the same
vector (float32 rounding apart). :func:`load_face_net` reads the weights from dlib's model
file (``dlib_face_recognition_resnet_model_v1.dat``) and refuses any file whose layers are
not the ResNet it expects; :class:`~lora_helpers.prepare.dlib_backend.DlibBackend` checks
the result against dlib once and keeps dlib's own forward pass if they ever disagree.

The network (dlib's ``dnn_face_recognition_ex.cpp``): the 150x150 RGB chip, centred with
fixed channel means and divided by 256; a 7x7/2 convolution, affine (folded batch norm),
ReLU and 3x3/2 max pooling; 14 residual blocks (3x3 convolution, affine, ReLU, 3x3
convolution, affine, plus the block's input, ReLU), of which the first at each width
halves the size with a stride-2 convolution and 2x2 average pooling on the shortcut, the
sum padded with zeros where the two differ in channels or size; mean over the image and
a 256x128 matrix.

File format (dlib's ``serialize``): integers are one byte holding the byte count (0x80
marks a negative number) followed by that many little-endian bytes; strings are a count and
the bytes; a tensor is version 2, four dimensions and raw little-endian float32 values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["FaceNet", "load_face_net", "CHIP_SIZE"]

CHIP_SIZE = 150
# Layers the parser reads, in file order (inner layers first); the rest carry no weights.
_TAGS = re.compile(rb"\x01[\x04\x05\x07\x0a\x15](input_rgb_image_sized|con_4|affine_|max_pool_2|avg_pool_2|fc_2)")


@dataclass
class _Conv:
    weights: np.ndarray  # (kh * kw * cin, cout), affine folded in
    bias: np.ndarray  # (cout,)
    size: int
    stride: int
    padding: int


@dataclass
class _Block:
    first: _Conv
    second: _Conv
    down: bool  # stride-2 block: 2x2 average pooling on the shortcut


class FaceNet:
    """The face ResNet with its weights: call it on a 150x150 RGB ``uint8`` chip.

    Args:
        means: the per-channel means (red, green, blue) dlib subtracts from the chip.
        stem: the 7x7/2 convolution.
        blocks: the residual blocks in order.
        fc: the final ``256 x 128`` matrix.
    """

    def __init__(self, means: tuple[float, float, float], stem: _Conv, blocks: list[_Block], fc: np.ndarray):
        self.means = np.asarray(means, dtype=np.float32)
        self.stem, self.blocks, self.fc = stem, blocks, fc

    def __call__(self, chip: np.ndarray) -> np.ndarray:
        """128-d float32 embedding of an aligned face chip (dlib's ``get_face_chip``, size 150)."""
        if chip.shape != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected a {CHIP_SIZE}x{CHIP_SIZE} RGB chip, got shape {chip.shape}")
        x = (chip.astype(np.float32) - self.means) * np.float32(1.0 / 256.0)
        x = _max_pool3(np.maximum(_conv(x, self.stem), 0.0))
        for block in self.blocks:
            y = _conv(np.maximum(_conv(x, block.first), 0.0), block.second)
            x = np.maximum(_add_padded(y, _avg_pool2(x) if block.down else x), 0.0)
        return (x.mean(axis=(0, 1)) @ self.fc).astype(np.float32)


def _conv(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """Convolution of an ``H x W x C`` array as one matrix product over its patches."""
    p, k, s = conv.padding, conv.size, conv.stride
    if p:
        padded = np.zeros((x.shape[0] + 2 * p, x.shape[1] + 2 * p, x.shape[2]), np.float32)
        padded[p:-p, p:-p] = x
        x = padded
    # Ho, Wo, kh, kw, C: channels innermost, so gathering the patches reads memory in order
    patches = sliding_window_view(x, (k, k), axis=(0, 1))[::s, ::s].transpose(0, 1, 3, 4, 2)
    ho, wo = patches.shape[:2]
    return (patches.reshape(ho * wo, -1) @ conv.weights + conv.bias).reshape(ho, wo, -1)


def _max_pool3(x: np.ndarray) -> np.ndarray:
    return sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(3, 4))


def _avg_pool2(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2  # dlib drops an odd last row and column
    return x[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` where a missing row, column or channel counts as zero (dlib's ``add_prev``)."""
    if a.shape == b.shape:
        return a + b
    out = np.zeros(tuple(max(i, j) for i, j in zip(a.shape, b.shape)), np.float32)
    out[: a.shape[0], : a.shape[1], : a.shape[2]] += a
    out[: b.shape[0], : b.shape[1], : b.shape[2]] += b
    return out


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def int(self) -> int:
        head = self.data[self.pos]
        n = head & 0x0F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + n], "little")
        self.pos += 1 + n
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        return mantissa * 2.0 ** self.int()

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise ValueError("unknown tensor version")
        shape = [self.int() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.astype(np.float32)


def _read_layers(data: bytes) -> list[tuple]:
    layers, pos = [], 0
    while (m := _TAGS.search(data, pos)) is not None:
        tag, r = m.group(1), _Reader(data, m.end())
        if tag == b"input_rgb_image_sized":
            layers.append(("input", tuple(r.float() for _ in range(3))))
        elif tag == b"con_4":
            params = r.tensor()
            filters, kh, kw, sy, sx, py, px = (r.int() for _ in range(7))
            if kh != kw or sy != sx or py != px:
                raise ValueError("non-square convolution")
            layers.append(("con", params, filters, kh, sy, py))
        elif tag == b"affine_":
            layers.append(("affine", r.tensor()))
        elif tag in (b"max_pool_2", b"avg_pool_2"):
            layers.append((tag[:3].decode(), tuple(r.int() for _ in range(6))))
        else:  # fc_2: outputs, inputs, then the weights
            outputs, inputs = r.int(), r.int()
            layers.append(("fc", r.tensor().reshape(inputs, outputs)))
        pos = r.pos
    return layers


def _folded(con: tuple, affine: tuple, cin: int) -> _Conv:
    """A convolution with the affine layer after it folded into its weights."""
    _, params, cout, k, stride, padding = con
    n = cout * cin * k * k
    if params.size != n + cout or affine[1].size != 2 * cout:
        raise ValueError("layer sizes do not chain")
    gamma, beta = affine[1][:cout], affine[1][cout:]
    weights = params[:n].reshape(cout, cin, k, k).transpose(2, 3, 1, 0).reshape(k * k * cin, cout) * gamma
    return _Conv(np.ascontiguousarray(weights, dtype=np.float32), (params[n:] * gamma + beta).astype(np.float32),
                 k, stride, padding)


def load_face_net(path: str | os.PathLike) -> FaceNet:
    """Read dlib's face-recognition ResNet from its model file.

    Args:
        path: ``dlib_face_recognition_resnet_model_v1.dat``.

    Returns:
        The network, ready to call on chips.

    Raises:
        ValueError: the file does not hold the layers of that ResNet.
    """
    layers = _read_layers(Path(path).read_bytes())
    kinds = "".join({"input": "i", "con": "c", "affine": "a", "max": "m", "avg": "p", "fc": "f"}[x[0]] for x in layers)
    # input, stem (conv, affine, max pool), blocks (conv, affine, conv, affine [, avg pool]), mean (avg pool), fc
    if not re.fullmatch(r"icam(caca(p)?)+pf", kinds):
        raise ValueError(f"{Path(path).name} is not dlib's face-recognition ResNet (layers {kinds!r})")
    if layers[3][1][:4] != (3, 3, 2, 2) or layers[-2][1][:4] != (0, 0, 1, 1):
        raise ValueError(f"{Path(path).name}: unexpected pooling")
    stem, channels = _folded(layers[1], layers[2], 3), layers[1][2]
    blocks, i = [], 4
    while layers[i][0] == "con":
        first, second = layers[i:i + 2:], layers[i + 2:i + 4]
        down = layers[i + 4][0] == "avg" and layers[i + 5][0] != "fc"
        if down != (first[0][4] == 2) or (down and layers[i + 4][1][:4] != (2, 2, 2, 2)):
            raise ValueError(f"{Path(path).name}: unexpected residual block")
        blocks.append(_Block(_folded(first[0], first[1], channels), _folded(second[0], second[1], first[0][2]), down))
        channels = second[0][2]
        i += 5 if down else 4
    fc = np.ascontiguousarray(layers[-1][1], dtype=np.float32)
    if fc.shape[0] != channels:
        raise ValueError(f"{Path(path).name}: the last matrix does not fit the network")
    return FaceNet(layers[0][1], stem, blocks, fc)
