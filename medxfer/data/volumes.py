"""Reading one image volume file (NIfTI with nibabel, other ITK formats with SimpleITK) as an array and
its voxel-to-world affine, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .problems import DatasetError

__all__ = ["read_volume", "read_header"]


def read_volume(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI (nibabel) or other ITK image (SimpleITK) as ``(array, 4x4 voxel-to-world affine)``.

    The array keeps the file's dtype and axis order ``(X, Y, Z[, C])``; the affine is in mm (RAS for
    NIfTI, converted from ITK's LPS otherwise). Raises :class:`DatasetError` naming the file.
    """
    path = Path(path)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).transpose()  # ITK arrays are (Z, Y, X); make them (X, Y, Z)
        dim = 3 if img.GetDimension() >= 3 else img.GetDimension()
        direction = np.asarray(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())[:dim, :dim]
        affine = np.eye(4)
        affine[:dim, :dim] = direction * np.asarray(img.GetSpacing()[:dim])
        affine[:dim, 3] = img.GetOrigin()[:dim]
        affine[:2] *= -1  # LPS -> RAS
        return arr, affine
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except Exception as e:  # nibabel/gzip/zlib/ITK raise many types for a broken file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(path, f"cannot read image ({type(e).__name__}: {msg})") from None


def read_header(path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``(X, Y, Z[, C])`` and 4x4 voxel-to-world affine (mm) of an image file, from its header
    only (no voxel is read: cheap, and safe before reading a file whose header may be wrong).
    Same conventions as :func:`read_volume`; raises :class:`DatasetError` naming the file."""
    path = Path(path)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        ndim = reader.GetDimension()
        dim = 3 if ndim >= 3 else ndim
        direction = np.asarray(reader.GetDirection()).reshape(ndim, ndim)[:dim, :dim]
        affine = np.eye(4)
        affine[:dim, :dim] = direction * np.asarray(reader.GetSpacing()[:dim])
        affine[:dim, 3] = reader.GetOrigin()[:dim]
        affine[:2] *= -1  # LPS -> RAS
        return size, affine
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except Exception as e:  # nibabel/gzip/ITK raise many types for a broken header
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(path, f"cannot read image header ({type(e).__name__}: {msg})") from None
