"""Real images available offline, as float32 tensors in [0, 1] (nothing is downloaded).

* :func:`digits`: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; UCI
  "Optical Recognition of Handwritten Digits"), split 80/20 stratified and seeded.
* :func:`cifar10`: CIFAR-10 from a local copy in torchvision's format
  (``cifar-10-batches-py``: pickled ``data_batch_1..5`` and ``test_batch``).
* :func:`photo`: scikit-image's photographs (``camera``, ``astronaut``, ``coffee``,
  ``chelsea``, ...) and scikit-learn's ``china.jpg`` / ``flower.jpg``.
* :func:`normalise`: per-channel (x - mean) / std.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
# scikit-image's photographs that ship inside the package (others are downloaded on first use)
PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "brick", "grass", "gravel")
CLASSES = {"digits": [str(i) for i in range(10)],
           "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}


def digits(seed: int = 0, size: int = 8, channels: int = 3):
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    Args:
        seed (int): the stratified 80/20 split's seed (1,437 train / 360 test images).
        size (int): height and width; the 8x8 originals are resized bilinearly.
        channels (int): 1, or 3 (the grey image replicated, for 3-channel networks).
    Returns:
        x: Tensor[n, channels, size, size] float32 in [0, 1] (ink 1); y: Tensor[n] int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.repeat(1, channels, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=seed)
    return x[tr], y[tr], x[te], y[te]


def cifar10(root: str):
    """CIFAR-10 from ``root`` (the ``cifar-10-batches-py`` folder or its parent) as
    ``(x_train, y_train, x_test, y_test)``: Tensor[n, 3, 32, 32] float32 in [0, 1], int64 labels.

    Raises:
        FileNotFoundError: no ``test_batch`` and ``data_batch_1..5`` there.
    """
    folder = root if os.path.exists(os.path.join(root, "test_batch")) else os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"--data: no CIFAR-10 batches under {root!r} (missing {', '.join(missing)})")

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255.0
        return x, torch.from_numpy(np.asarray(d["labels"], dtype=np.int64))

    parts = [read(n) for n in names[:5]]
    xte, yte = read("test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), xte, yte


def photo(name: str = "camera", size: int | None = None, grey: bool = False) -> Tensor:
    """A photograph as Tensor[C, H, W] float32 in [0, 1] (C = 1 for grey ones, else 3).

    Args:
        name: one of :data:`PHOTOS` (scikit-image's bundled photographs: ``camera``,
            ``astronaut``, ``coffee``, ``chelsea``...) or ``china.jpg`` / ``flower.jpg``
            (scikit-learn's).
        size (int or None): resize (antialiased, aspect kept by a centre crop) to size x size.
        grey (bool): convert a colour photo to grey (ITU-R 601 luma, skimage.color.rgb2gray).
    Raises:
        ValueError: an unknown name.
    """
    if name in ("china.jpg", "flower.jpg"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    elif name in PHOTOS:
        import skimage.data

        img = getattr(skimage.data, name)()
    else:
        raise ValueError(f"photo: expected one of {PHOTOS + ('china.jpg', 'flower.jpg')}, got {name!r}")
    img = np.asarray(img)
    if grey and img.ndim == 3:
        from skimage.color import rgb2gray

        img = rgb2gray(img[..., :3])
    x = torch.from_numpy(img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0))
    x = x[None] if x.dim() == 2 else x[..., :3].permute(2, 0, 1)
    if size is not None:
        h, w = x.shape[1:]
        s = min(h, w)
        x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1).contiguous()


def normalise(x: Tensor, mean, std) -> Tensor:
    """``(x - mean) / std`` per channel; mean, std: sequences of C floats (or Tensors)."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of Tensor[n, C, H, W] (the training set's)."""
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
