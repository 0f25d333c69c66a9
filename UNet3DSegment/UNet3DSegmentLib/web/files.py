"""Files of the web front end: upload checks (type, size, safe name) and the demo MRI volume.

Part of the web layer, but free of trame and Slicer, so every check here is a plain function that tests
call directly.

The demo MRI is the MNI152 2009 T1 template shipped inside nilearn (no download); ``downsample``
> 1 averages blocks of voxels (SimpleITK ``BinShrink``) for fast tests and previews.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Union

from ..base.options import WebOptions
from ..base.errors import BadInputError

PathLike = Union[str, Path]
UPLOAD_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")  # single files: detached headers (.nhdr/.mhd) need a 2nd file
DEFAULT_MAX_UPLOAD_MB = WebOptions.spec("max_upload_mb").default
DEMO_VOLUME_NAME = "MNI152 T1"


def upload_suffix(name: str) -> str:
    """The volume suffix of ``name`` (``.nii.gz`` counts as one), lower case; ``""`` if not a volume file."""
    lower = name.lower()
    for suffix in sorted(UPLOAD_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    return ""


def safe_file_name(name: str) -> str:
    """``name`` without folders or unusual characters, so it can be written inside a temporary folder."""
    base = Path(str(name).replace("\\", "/")).name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return cleaned or "volume"


def check_upload(name: str, size: int, max_mb: float = DEFAULT_MAX_UPLOAD_MB) -> str:
    """Validate an uploaded file's name and size; returns its volume suffix or raises BadInputError."""
    suffix = upload_suffix(str(name))
    if not suffix:
        allowed = ", ".join(UPLOAD_SUFFIXES)
        raise BadInputError(f"{name} is not a supported volume file; upload one of {allowed}")
    if size <= 0:
        raise BadInputError(f"{name} is empty; upload the volume file itself")
    if size > max_mb * 1024 * 1024:
        raise BadInputError(
            f"{name} is {size / 1024 / 1024:.0f} MB, over the {max_mb:g} MB upload limit; "
            "crop or compress it, or start the server with a higher --max-upload-mb"
        )
    return suffix


def write_upload(file: Mapping[str, Any], folder: PathLike, max_mb: float = DEFAULT_MAX_UPLOAD_MB) -> Path:
    """Check one browser file (trame's dict: name, size, content) and write it into ``folder``."""
    name = str(file.get("name") or "")
    content = file.get("content")
    if isinstance(content, list):  # large files arrive in chunks
        content = b"".join(content)
    if not isinstance(content, (bytes, bytearray)):
        raise BadInputError(f"the upload of {name or 'the file'} arrived without content; upload it again")
    check_upload(name, len(content), max_mb)
    path = Path(folder) / safe_file_name(name)
    path.write_bytes(bytes(content))
    return path


def demo_volume_file(folder: PathLike, downsample: int = 1) -> Path:
    """The demo T1 as a file to load: nilearn's own file, or a block-averaged NRRD copy in ``folder``."""
    from ..training.demo import mni152_paths

    source = mni152_paths()["t1"]
    factor = int(downsample)
    if factor < 1:
        raise BadInputError(f"demo downsample factor must be a positive integer, got {downsample}")
    if factor == 1:
        return source
    import SimpleITK as sitk

    image = sitk.BinShrink(sitk.ReadImage(str(source), sitk.sitkFloat32), [factor] * 3)
    path = Path(folder) / f"mni152_t1_downsampled_{factor}.nrrd"
    sitk.WriteImage(image, str(path))
    return path
