"""Where the images of a split come from: an ImageFolder, ImageNet's flat val folder + label file, or HF shards.

Each source lists its images once (keys in a fixed order, labels, class names) and opens one image by key;
`identity()` is what a latent cache records so that it is never reused for another folder or split.
  image_folder  <root>/<split>/<wnid>/**/*.JPEG          labels by sorted wnid (torchvision ImageFolder)
  flat          <root>/<split>/*.JPEG + data.labels_file  ImageNet's val folder as shipped, not reorganised
  hf            Hugging Face `datasets` shards of the split under <root>: parquet (`<split>-*.parquet`, the
                layout of ILSVRC/imagenet-1k on the hub) or arrow (`save_to_disk`'s `<split>/*.arrow`)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datamodules.adm_crop import IMAGE_EXTENSIONS, list_image_folder, load_image

WNID = re.compile(r"^n\d{8}$")


@dataclass
class Listing:
    """The images of a split in cache order: keys (unique strings), integer labels, class names."""

    keys: list[str]
    labels: list[int]
    classes: list[str]


def _real(path: str | os.PathLike) -> str:
    """Absolute path with symlinks resolved: the same folder always reads the same."""
    return os.path.realpath(os.path.expanduser(str(path)))


class ImageFolderSource:
    """<root>/<split>/<wnid>/**/*.JPEG; labels are the indices of the sorted wnids."""

    kind = "image_folder"

    def __init__(self, root: str | os.PathLike, split: str):
        self.folder, self.split = Path(root) / split, split

    def identity(self) -> dict:
        return {"kind": self.kind, "path": _real(self.folder), "split": self.split}

    def list(self) -> Listing:
        return Listing(*list_image_folder(self.folder))

    def open(self, key: str) -> Image.Image:
        return load_image(self.folder / key)


def read_label_file(path: str | os.PathLike, names: list[str]) -> list[str]:
    """Labels (wnids or integer strings) of `names` (sorted image file names) from an ImageNet val label file.

    Accepted: Kaggle's LOC_val_solution.csv (ImageId,PredictionString), lines `<file> <label>` (caffe's val.txt,
    label a wnid or a 0-based index in sorted-wnid order), or one wnid per line in file order (TF's
    imagenet_2012_validation_synset_labels.txt). The devkit's ILSVRC2012_validation_ground_truth.txt uses other
    ids (1-based, devkit order) and is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.labels_file={str(path)!r} does not exist")
    text = path.read_text()
    stem = {os.path.splitext(n)[0]: n for n in names}
    by_name: dict[str, str] = {}
    if text.startswith("ImageId,PredictionString"):
        for row in csv.DictReader(io.StringIO(text)):
            by_name[stem.get(row["ImageId"], row["ImageId"])] = row["PredictionString"].split()[0]
    else:
        lines = [line.split() for line in text.splitlines() if line.strip()]
        if lines and all(len(parts) == 1 for parts in lines):
            if not all(WNID.match(parts[0]) for parts in lines):
                raise ValueError(
                    f"data.labels_file={str(path)!r} has one integer per line: that is the devkit's ground truth "
                    f"(1-based ids in devkit order, not class indices). Use LOC_val_solution.csv, a `<file> <wnid>` "
                    f"list, or one wnid per line."
                )
            if len(lines) != len(names):
                raise ValueError(f"data.labels_file={str(path)!r} has {len(lines)} wnids for {len(names)} images")
            return [parts[0] for parts in lines]
        for parts in lines:
            if len(parts) != 2:
                raise ValueError(f"data.labels_file={str(path)!r}: cannot read the line {' '.join(parts)!r} "
                                 f"(expected `<file> <label>`)")
            by_name[stem.get(parts[0], parts[0])] = parts[1]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"data.labels_file={str(path)!r} has no label for {len(missing)} image(s), e.g. {missing[:3]}")
    return [by_name[n] for n in names]


class FlatFolderSource:
    """ImageNet's val folder as shipped (<root>/<split>/*.JPEG, no class folders) with a label file."""

    kind = "flat"

    def __init__(self, root: str | os.PathLike, split: str, labels_file: str | os.PathLike | None):
        if not labels_file:
            raise ValueError("data.source=flat needs data.labels_file (e.g. LOC_val_solution.csv)")
        self.folder, self.split, self.labels_file = Path(root) / split, split, Path(labels_file)

    def identity(self) -> dict:
        return {"kind": self.kind, "path": _real(self.folder), "split": self.split,
                "labels_file": _real(self.labels_file)}

    def list(self) -> Listing:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {str(self.folder)!r} does not exist (data.root/data.split)")
        names = sorted(e.name for e in os.scandir(self.folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"image folder {str(self.folder)!r} holds no images")
        raw = read_label_file(self.labels_file, names)
        if all(WNID.match(r) for r in raw):
            classes = sorted(set(raw))
            index = {c: i for i, c in enumerate(classes)}
            return Listing(names, [index[r] for r in raw], classes)
        if all(r.isdigit() for r in raw):
            labels = [int(r) for r in raw]
            return Listing(names, labels, [str(i) for i in range(max(labels) + 1)])
        raise ValueError(f"data.labels_file={str(self.labels_file)!r} mixes wnids and other labels")

    def open(self, key: str) -> Image.Image:
        return load_image(self.folder / key)


def _hf_classes(schema, label_column: str, folder: Path) -> list[str] | None:
    """ClassLabel names from the `datasets` metadata in the schema or a dataset_info.json beside the shards."""
    infos = []
    meta = schema.metadata or {}
    if b"huggingface" in meta:
        infos.append(json.loads(meta[b"huggingface"]).get("info", {}))
    if (folder / "dataset_info.json").is_file():
        infos.append(json.loads((folder / "dataset_info.json").read_text()))
    for info in infos:
        names = (info.get("features", {}).get(label_column) or {}).get("names")
        if names:
            return list(names)
    return None


class HFShardsSource:
    """A split stored as Hugging Face `datasets` parquet or arrow shards; images as encoded bytes."""

    kind = "hf"

    def __init__(self, root: str | os.PathLike, split: str, image_column: str = "image", label_column: str = "label"):
        self.root, self.split = Path(root), split
        self.image_column, self.label_column = image_column, label_column
        self._current: tuple | None = None  # (file, first row, rows) of the table held by this process

    def __getstate__(self):
        """DataLoader workers reopen the shards themselves."""
        return {**self.__dict__, "_current": None}

    def identity(self) -> dict:
        return {"kind": self.kind, "path": _real(self.root), "split": self.split,
                "image_column": self.image_column, "label_column": self.label_column}

    def shard_files(self) -> list[Path]:
        """The split's shards, sorted: <split>-*.parquet anywhere under root, else <root>/<split>/*.parquet|arrow."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} does not exist (data.source=hf)")
        found = sorted(p for p in self.root.rglob(f"{self.split}-*.parquet"))
        for ext in ("parquet", "arrow"):
            found = found or sorted((self.root / self.split).glob(f"*.{ext}"))
        found = found or sorted(p for p in self.root.rglob("*.arrow") if f"-{self.split}-" in p.name)
        if not found:
            raise FileNotFoundError(
                f"no {self.split!r} shards under data.root={str(self.root)!r}: looked for **/{self.split}-*.parquet "
                f"(the hub layout), {self.split}/*.parquet, {self.split}/*.arrow (save_to_disk) and *-{self.split}-*.arrow"
            )
        return found

    @staticmethod
    def _table(path: Path, columns: list[str], row_group: int | None = None):
        """A pyarrow table of `columns` from a parquet file (one row group) or an arrow file (memory-mapped)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            return pf.read_row_group(row_group, columns=columns) if row_group is not None else pf.read(columns=columns)
        source = pa.memory_map(str(path))
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:  # the random-access file format instead of the stream format
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        return table.select(columns)

    def list(self) -> Listing:
        keys: list[str] = []
        labels: list[int] = []
        classes = None
        for path in self.shard_files():
            table = self._table(path, [self.label_column])
            if classes is None:
                classes = _hf_classes(table.schema, self.label_column, path.parent)
            rel = path.relative_to(self.root).as_posix()
            values = table.column(self.label_column).to_pylist()
            if any(v is None or v < 0 for v in values):
                raise ValueError(f"{rel}: the {self.split!r} split has images without a label "
                                 f"(ImageNet's test split is unlabelled); use train or validation")
            keys += [f"{rel}#{i}" for i in range(len(values))]
            labels += values
        if classes is None:
            classes = [str(i) for i in range(max(labels) + 1)]
        return Listing(keys, labels, classes)

    def open(self, key: str) -> Image.Image:
        rel, row = key.rsplit("#", 1)
        row = int(row)
        path = self.root / rel
        cur = self._current
        if cur is None or cur[0] != rel or not cur[1] <= row < cur[1] + cur[2].num_rows:
            cur = self._current = self._load_part(path, rel, row)
        value = cur[2].column(self.image_column)[row - cur[1]].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            return load_image(path.parent / value["path"])
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")

    def _load_part(self, path: Path, rel: str, row: int) -> tuple:
        """The parquet row group holding `row` (the whole file for arrow), as (rel, first row, table)."""
        if path.suffix != ".parquet":
            return rel, 0, self._table(path, [self.image_column])
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if row < first + n:
                return rel, first, self._table(path, [self.image_column], row_group=g)
            first += n
        raise IndexError(f"{rel} has {first} rows, not row {row}")


# data.source -> the source, built from (root, split, the data config's source options)
SOURCES = {
    "image_folder": lambda root, split, opts: ImageFolderSource(root, split),
    "flat": lambda root, split, opts: FlatFolderSource(root, split, opts.get("labels_file")),
    "hf": lambda root, split, opts: HFShardsSource(root, split, opts.get("image_column", "image"),
                                                   opts.get("label_column", "label")),
}


def make_source(kind: str, root: str | os.PathLike, split: str, **opts):
    """The source named by data.source; a wrong name fails naming the key and the choices."""
    if kind not in SOURCES:
        raise ValueError(f"data.source={kind!r} is not one of {list(SOURCES)}")
    return SOURCES[kind](root, split, opts)
