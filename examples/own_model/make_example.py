"""Make the worked example of the README: a photo folder and a user's trained network, as a user would have them.

    python examples/own_model/make_example.py

writes `examples/own_model/photos/{train,val}/{circle,square,triangle}/*.png` (RGB photos of different
sizes, drawn with a seed) and trains `net.py:ShapeNet` on them in plain PyTorch, with its own
preprocessing (shorter side to 32, centre crop, (x - 0.5) / 0.5), saving the state_dict to
`examples/own_model/shapenet.pt`. Prints the network's val accuracy in plain PyTorch.
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
CLASSES = ("circle", "square", "triangle")
SIZE = 32


def photo(kind: str, rng: np.random.Generator) -> Image.Image:
    """A noisy photo of a size of its own with one shape at a random place, size, angle and contrast."""
    w, h = (int(v) for v in rng.integers(36, 120, 2))
    bg = rng.integers(0, 160, 3)
    im = Image.fromarray(np.clip(rng.normal(bg, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    s = min(w, h)
    r = rng.uniform(0.18, 0.35) * s
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * s, h / 2 + rng.uniform(-0.15, 0.15) * s
    fill = tuple(int(v) for v in np.clip(bg + rng.choice([-1, 1]) * rng.integers(70, 150, 3), 0, 255))
    angle = rng.uniform(0, 2 * np.pi)
    corners = {"square": 4, "triangle": 3}.get(kind)
    draw = ImageDraw.Draw(im)
    if corners is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + r * np.cos(angle + 2 * np.pi * k / corners), cy + r * np.sin(angle + 2 * np.pi * k / corners))
                      for k in range(corners)], fill=fill)
    return im if rng.random() < 0.8 else im.convert("L")  # some photos are grayscale


def make_photos(n_train: int = 600, n_val: int = 100) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in CLASSES:
            folder = HERE / "photos" / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo(kind, rng).save(folder / f"{kind}_{i:04d}.png")


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's own preprocessing: RGB, shorter side to 32 (bilinear), centre crop, (x - 0.5) / 0.5."""
    xs, ys = [], []
    for label, kind in enumerate(CLASSES):
        for f in sorted((HERE / "photos" / split / kind).glob("*.png")):
            im = Image.open(f).convert("RGB")
            scale = SIZE / min(im.size)
            im = im.resize((max(SIZE, round(im.width * scale)), max(SIZE, round(im.height * scale))), Image.BILINEAR)
            left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
            xs.append(np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0)
            ys.append(label)
    x = torch.from_numpy((np.stack(xs).transpose(0, 3, 1, 2) - 0.5) / 0.5)
    return x, torch.tensor(ys)


def main() -> None:
    make_photos()
    spec = importlib.util.spec_from_file_location("net", HERE / "net.py")
    net_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net_module)
    torch.manual_seed(0)
    model = net_module.ShapeNet(num_classes=len(CLASSES))
    (xt, yt), (xv, yv) = load("train"), load("val")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(30):
        model.train()
        for idx in torch.randperm(len(yt)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    torch.save(model.state_dict(), HERE / "shapenet.pt")
    print(f"ShapeNet: val accuracy {100 * acc:.2f} % in plain PyTorch ({len(yv)} photos) -> {HERE / 'shapenet.pt'}")


if __name__ == "__main__":
    main()
