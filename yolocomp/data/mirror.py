"""Link unlabelled images into a work folder, so their label files (empty or pseudo) live there, not in the source.

Ultralytics finds an image's labels by replacing the last ``/images/`` of its path with ``/labels/`` (and writes its
label cache beside that folder), so ``<root>/images/<name>`` links get labels in ``<root>/labels/<name>.txt``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from yolocomp.errors import UserError


def label_path(image: Path) -> Path:
    """The label file Ultralytics reads for ``image`` (``.../images/x.jpg`` -> ``.../labels/x.txt``)."""
    return image.parent.parent / "labels" / f"{image.stem}.txt"


def _unique_name(path: Path, taken: set[str]) -> str:
    """The image's file name, with a counter when another image (other folder, same name) took it; labels are found
    by stem, so stems must be unique too."""
    name, k = path.name, 1
    while Path(name).stem in taken:
        name, k = f"{path.stem}_{k}{path.suffix}", k + 1
    taken.add(Path(name).stem)
    return name


def mirror_images(images: Iterable[Path], root: str | Path) -> list[Path]:
    """Symlinks ``root/images/<name>`` to each image (absolute targets) and an empty ``root/labels/``; ``root`` is
    rebuilt from scratch so no link or label of an earlier run survives. Returns the link paths, in input order."""
    root = Path(root).resolve()
    images = [Path(p).resolve() for p in images]
    inside = next((p for p in images if root == p or root in p.parents), None)
    if inside is not None:
        raise UserError(f"image {inside} lies inside the work folder {root}, which is rebuilt; use another work folder")
    if root.exists():
        shutil.rmtree(root)  # only links and labels we wrote: the images themselves are never under root
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    taken: set[str] = set()
    links = []
    for image in images:
        link = root / "images" / _unique_name(image, taken)
        link.symlink_to(image)
        links.append(link)
    return links


def write_empty_labels(links: Iterable[Path]) -> None:
    """An empty label file per image: Ultralytics refuses to train when no label file exists at all, while empty
    ones mean "no object here" (for label-free training the detection loss is switched off)."""
    for link in links:
        label_path(link).write_text("")
