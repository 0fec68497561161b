"""Reading and writing images with SimpleITK, with clear errors and no half-written files; file checksums."""
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import InputError


def read_image(path):
    """Read a NIfTI/NRRD/MHA image; raise InputError naming the file when it is missing or unreadable."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"cannot read image {path}: not a readable NIfTI/NRRD/MHA file ({first_line[:120]})") from None


def _make_temporary(path: Path, suffix: str) -> str:
    """A temporary file beside the target, with the permissions a normally created file would get."""
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(path.parent))
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return temporary


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    # Single-file formats only: .nhdr/.mhd write a second data file that could not be committed atomically.
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return suffix
    raise InputError(f"unsupported output format for {path}: use .nii.gz, .nii, .nrrd or .mha")


def check_writable_file(path, suffixes=None) -> Path:
    """Refuse, before any work, an output path that cannot be written: a directory, a parent that is a file or
    not writable, or (for images) an unsupported format."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path is a directory: {path}")
    if suffixes is None:
        _image_suffix(path)
    elif not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"unsupported output format for {path}: use {' or '.join(suffixes)}")
    check_writable_directory(path.parent)
    return path


def check_writable_directory(directory) -> Path:
    """The nearest existing ancestor must be a writable directory (the rest is created on writing)."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write into {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {directory}: {existing} is not writable")
    return directory


def write_image(image, path) -> None:
    """Write atomically: to a temporary file in the same folder, then rename, so a failure leaves nothing behind."""
    import SimpleITK as sitk

    path = Path(path)
    suffix = _image_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _make_temporary(path, suffix)
    try:
        sitk.WriteImage(image, temporary, True)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _make_temporary(path, path.suffix)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
