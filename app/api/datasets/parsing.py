"""Reading an uploaded .npz or CSV into float32 features and raw labels, with bounded memory.

Every size is judged before the memory it implies is taken: an .npz member's declared size and
its .npy header (shape and dtype) are checked against the limits before a byte of data is read,
and a CSV is counted in a first pass before its float32 array is allocated and filled in a
second. So parsing one upload holds at most its features as float32 (which
TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES bounds), its labels, and a chunk or a line at a time; the
upload itself stays in the spooled temporary file it was streamed to.
"""

import codecs
import csv
import lzma
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from app.core.catalog import DataKind
from app.core.config import Settings
from app.core.errors import InvalidInput

# Fewer samples than this cannot be split into a training and a validation set worth the name.
MIN_UPLOAD_SAMPLES = 10
# Class names are stored and shown; a label longer than this is a mistake, not a class.
MAX_LABEL_CHARS = 200
# An .npy is read in pieces of about this size, cast to float32 piece by piece.
_READ_CHUNK_BYTES = 4 * 1024 * 1024
# zipfile reads an archive's whole central directory into objects before anything else: an
# .npz holds a few members, so a directory larger than this is refused before zipfile sees it.
_MAX_CENTRAL_DIRECTORY_BYTES = 16 * 1024
_END_OF_CENTRAL_DIRECTORY = struct.Struct("<4s4H2LH")
# Non-negative decimal integers in ASCII digits only ("²".isdigit() is True, int("²") fails).
_INTEGER_LABEL = re.compile(r"-?[0-9]+")
_UNREADABLE_ZIP = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    NotImplementedError,  # a compression method zipfile does not know
    RuntimeError,  # an encrypted member
    ValueError,  # a malformed .npy magic or header
)


@dataclass(frozen=True)
class UploadLimits:
    max_samples: int
    max_features: int
    max_unpacked_bytes: int
    max_classes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "UploadLimits":
        return cls(
            max_samples=settings.max_upload_samples,
            max_features=settings.max_upload_features,
            max_unpacked_bytes=settings.max_upload_unpacked_bytes,
            max_classes=settings.max_upload_classes,
        )

    @property
    def max_csv_line_bytes(self) -> int:
        # A row of max_features numbers, each printed at full float64 precision, fits.
        return 1024 * 1024 + 24 * self.max_features


# -- shapes, judged before anything is allocated --------------------------------------------


def check_shape(shape: tuple[int, ...], limits: UploadLimits) -> None:
    """Refuse x of this shape (samples first) before any memory is taken for it."""
    samples = shape[0] if shape else 0
    if samples > limits.max_samples:
        raise InvalidInput("file.x", f"{samples} samples is over the limit of {limits.max_samples}")
    if len(shape) not in (2, 3):
        raise InvalidInput(
            "file.x",
            f"x must be [samples, features] or [samples, height, width], not {list(shape)}",
        )
    features = math.prod(shape[1:])
    if features == 0:
        raise InvalidInput("file.x", f"x has no features: shape {list(shape)}")
    if features > limits.max_features:
        raise InvalidInput(
            "file.x",
            f"{features} features per sample is over the limit of {limits.max_features}",
        )
    as_float32 = 4 * samples * features
    if as_float32 > limits.max_unpacked_bytes:
        raise InvalidInput(
            "file.x",
            f"x as float32 takes {as_float32} bytes, over the limit of "
            f"{limits.max_unpacked_bytes} (TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES)",
        )


def check_enough_samples(x: np.ndarray) -> None:
    # Judged after parsing, so that a CSV too short and malformed is told what is malformed.
    if len(x) < MIN_UPLOAD_SAMPLES:
        raise InvalidInput("file.x", f"at least {MIN_UPLOAD_SAMPLES} samples are needed")


def check_kind(ndim: int, requested: DataKind | None) -> DataKind:
    kind: DataKind = requested or ("tabular" if ndim == 2 else "image")
    if (kind == "image") != (ndim == 3):
        wanted = "[samples, height, width]" if kind == "image" else "[samples, length]"
        raise InvalidInput("kind", f"kind {kind!r} needs x of shape {wanted}")
    return kind


def check_finite(x: np.ndarray) -> None:
    """NaN or inf anywhere in x is a 422; checked a slice at a time, so no x-sized mask."""
    rows = max(1, _READ_CHUNK_BYTES // max(1, x[0].nbytes))
    for start in range(0, len(x), rows):
        if not np.isfinite(x[start : start + rows]).all():
            raise InvalidInput("file.x", "x contains NaN or infinite values")


# -- .npz ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyHeader:
    member: str  # "x" or "y"
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int  # where the data starts in the unpacked member
    member_size: int  # the member's declared unpacked size

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def read_npz(file: IO[bytes], limits: UploadLimits) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 and y as stored, from an .npz with members x.npy and y.npy."""
    _check_central_directory(file)
    try:
        with zipfile.ZipFile(file) as archive:
            infos = _npz_members(archive, limits)
            x_header = _read_header(archive, infos["x"])
            y_header = _read_header(archive, infos["y"])
            _check_npz_headers(x_header, y_header, limits)
            x = _read_x(archive, infos["x"], x_header)
            y = _read_whole(archive, infos["y"], y_header)
    except _UNREADABLE_ZIP as exc:
        raise InvalidInput("file", f"not a readable .npz: {exc}") from exc
    return x, y


def _check_central_directory(file: IO[bytes]) -> None:
    """Refuse a zip whose central directory is large (thousands of members) or in zip64 form,
    which no upload-sized .npz needs, before zipfile turns it into objects."""
    end = file.seek(0, 2)
    tail_size = min(end, _END_OF_CENTRAL_DIRECTORY.size + 65535 + 20)  # record, comment, zip64
    file.seek(end - tail_size)
    tail = file.read(tail_size)
    file.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END_OF_CENTRAL_DIRECTORY.size:
        return  # not a zip: zipfile says so, and that is a 422 too
    record = _END_OF_CENTRAL_DIRECTORY.unpack_from(tail, at)
    entries, directory_size = record[4], record[5]
    zip64 = tail[max(0, at - 20) : at].startswith(b"PK\x06\x07")
    if zip64 or entries == 0xFFFF or directory_size > _MAX_CENTRAL_DIRECTORY_BYTES:
        raise InvalidInput(
            "file",
            f"the .npz's zip directory lists {entries} members in {directory_size} bytes; an "
            f"upload holds x.npy and y.npy (a directory up to {_MAX_CENTRAL_DIRECTORY_BYTES} "
            "bytes, no zip64)",
        )


def _npz_members(archive: zipfile.ZipFile, limits: UploadLimits) -> dict[str, zipfile.ZipInfo]:
    names = archive.namelist()
    missing = [member for member in ("x", "y") if f"{member}.npy" not in names]
    if missing:
        wanted = " or ".join(f"{member} (a member {member}.npy)" for member in missing)
        raise InvalidInput("file", f"the .npz has no array named {wanted}")
    for member in ("x", "y"):
        # zipfile would read the last of them, another tool the first: which array is x?
        if (count := names.count(f"{member}.npy")) > 1:
            raise InvalidInput(f"file.{member}", f"the .npz has {count} members named {member}.npy")
    infos = {member: archive.getinfo(f"{member}.npy") for member in ("x", "y")}
    # A zip bomb: a few compressed megabytes that unpack to gigabytes. Judged by the declared
    # sizes, which zipfile never reads past, and for the upload as a whole, not per member.
    limit = limits.max_unpacked_bytes
    for member, info in infos.items():
        if info.file_size > limit:
            raise InvalidInput(
                f"file.{member}",
                f"{member} unpacks to {info.file_size} bytes, over the limit of {limit} "
                "(TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES)",
            )
    total = sum(info.file_size for info in infos.values())
    if total > limit:
        raise InvalidInput(
            "file",
            f"x and y together unpack to {total} bytes, over the limit of {limit} "
            "(TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES)",
        )
    return infos


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyHeader:
    member = info.filename.removesuffix(".npy")
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise InvalidInput(f"file.{member}", f"{member} is .npy version {version}; use 1.0")
        offset = stream.tell()
    if dtype.hasobject:
        raise InvalidInput(
            "file", f"{member} holds pickled Python objects; uploads are read without pickle"
        )
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"file.{member}", f"{member} has a negative dimension: {list(shape)}")
    return _NpyHeader(member, shape, fortran_order, dtype, offset, info.file_size)


def _check_npz_headers(x: _NpyHeader, y: _NpyHeader, limits: UploadLimits) -> None:
    if x.dtype.kind not in "biuf" or x.dtype.fields is not None:
        raise InvalidInput("file.x", f"x must be numeric, not {x.dtype}")
    check_shape(x.shape, limits)
    if len(y.shape) != 1:
        raise InvalidInput(
            "file.y", f"y must be one label per sample, not of shape {list(y.shape)}"
        )
    if y.dtype.kind not in "biuUS" or y.dtype.fields is not None:
        raise InvalidInput(
            "file.y", f"labels must be integers 0..C-1 or strings, not {y.dtype} values"
        )
    if y.shape[0] != x.shape[0]:
        raise InvalidInput("file.y", f"y has {y.shape[0]} labels for {x.shape[0]} samples in x")
    for header in (x, y):
        held = header.member_size - header.data_offset
        if header.nbytes > held:
            raise InvalidInput(
                f"file.{header.member}",
                f"{header.member} is truncated: its header says {list(header.shape)} of "
                f"{header.dtype} ({header.nbytes} bytes) but it holds {held}",
            )


def _read_exactly(stream: IO[bytes], size: int, member: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise InvalidInput(f"file.{member}", f"{member} is truncated")
    return data


def _read_x(archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: _NpyHeader) -> np.ndarray:
    """x cast to float32 a chunk at a time: never held in its stored dtype as a whole."""
    # The data is laid out in C order, or in Fortran order (the reversed shape, transposed).
    layout = header.shape[::-1] if header.fortran_order else header.shape
    x = np.empty(layout, dtype=np.float32)
    flat = x.reshape(-1)
    per_chunk = max(1, _READ_CHUNK_BYTES // header.dtype.itemsize)
    with archive.open(info) as stream, np.errstate(over="ignore"):
        stream.seek(header.data_offset)
        for start in range(0, header.count, per_chunk):
            count = min(per_chunk, header.count - start)
            data = _read_exactly(stream, count * header.dtype.itemsize, "x")
            # A float64 beyond float32's range becomes inf here, and check_finite refuses it.
            flat[start : start + count] = np.frombuffer(data, dtype=header.dtype)
    return x.T if header.fortran_order else x


def _read_whole(archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: _NpyHeader) -> np.ndarray:
    with archive.open(info) as stream:
        stream.seek(header.data_offset)
        data = _read_exactly(stream, header.nbytes, header.member)
    return np.frombuffer(data, dtype=header.dtype).reshape(header.shape)


# -- CSV -------------------------------------------------------------------------------------


def read_csv(
    file: IO[bytes], label_column: str, limits: UploadLimits
) -> tuple[np.ndarray, list[str]]:
    """Features as float32 and the label column's text, in two passes over the spooled file:
    the first counts rows and checks their widths, the second fills a preallocated array."""
    rows = _csv_rows(file, limits.max_csv_line_bytes)
    first = next(rows, None)
    if first is None:
        raise InvalidInput("file", "the CSV is empty")
    header = [cell.strip() for cell in first[1]]
    if label_column not in header:
        raise InvalidInput(
            "label_column", f"the CSV header has no column {label_column!r}: {header[:20]}"
        )
    if header.count(label_column) > 1:
        # Else the first would be the label and the other a feature: the label, leaked.
        raise InvalidInput(
            "label_column",
            f"the CSV header names column {label_column!r} {header.count(label_column)} times",
        )
    label_index = header.index(label_column)
    samples = 0
    for line, row in rows:
        if len(row) != len(header):
            raise InvalidInput(
                "file", f"line {line} has {len(row)} fields; the header has {len(header)}"
            )
        samples += 1
        if samples > limits.max_samples:
            break  # check_shape names the limit; counting further proves nothing
    check_shape((samples, len(header) - 1), limits)

    file.seek(0)
    x = np.empty((samples, len(header) - 1), dtype=np.float32)
    labels: list[str] = []
    rows = _csv_rows(file, limits.max_csv_line_bytes)
    next(rows)  # the header
    with np.errstate(over="ignore"):
        for index, (line, row) in enumerate(rows):
            label = row[label_index].strip()
            check_label(label)
            labels.append(label)
            try:
                x[index] = [float(cell) for i, cell in enumerate(row) if i != label_index]
            except ValueError as exc:
                raise InvalidInput("file", f"line {line}: every feature must be a number") from exc
    return x, labels


def _csv_rows(file: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each row that is not blank."""
    reader = csv.reader(_text_lines(file, max_line_bytes))
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, row
    except csv.Error as exc:
        raise InvalidInput("file", f"line {reader.line_num}: {exc}") from exc


def _text_lines(file: IO[bytes], max_line_bytes: int) -> Iterator[str]:
    """The file's lines as text, none longer than max_line_bytes: one line is all csv holds."""
    first = True
    while raw := file.readline(max_line_bytes + 1):
        if len(raw) > max_line_bytes:
            raise InvalidInput("file", f"a line of the CSV is longer than {max_line_bytes} bytes")
        if first:
            raw, first = raw.removeprefix(codecs.BOM_UTF8), False
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("file", "a CSV must be UTF-8 text") from exc


# -- labels ----------------------------------------------------------------------------------


def check_label(label: str) -> None:
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidInput("file.y", f"a label is longer than {MAX_LABEL_CHARS} characters")
    if "\x00" in label:
        raise InvalidInput("file.y", "a label contains a NUL character")


def labels_as_text(y: np.ndarray) -> list[str] | None:
    """An .npz's string labels as Python text, or None when they are not strings."""
    if y.dtype.kind not in "US":
        return None
    labels = []
    try:
        for value in y.tolist():
            text = value.decode("utf-8") if isinstance(value, bytes) else value
            text.encode("utf-8")  # a lone surrogate can be neither stored nor sent
            labels.append(text.strip())
    except (UnicodeError, ValueError) as exc:
        raise InvalidInput("file.y", "a label is not valid UTF-8 text") from exc
    for label in labels:
        check_label(label)
    return labels


def class_indices(
    raw: np.ndarray | list[str], max_classes: int
) -> tuple[np.ndarray, list[str] | None]:
    """Labels as class indices 0..C-1, and the class names when the labels were names.

    Text that is all integers ("0", "1", ...) is class indices; any other text is names,
    mapped to indices in sorted order.
    """
    class_names = None
    values: np.ndarray | list[int]
    if isinstance(raw, list):
        if all(_INTEGER_LABEL.fullmatch(label) for label in raw):
            values = [int(label) for label in raw]  # at most 200 digits: int() takes them
        else:
            if "" in raw:
                raise InvalidInput("file.y", "a label is empty")
            class_names = sorted(set(raw))
            index = {name: i for i, name in enumerate(class_names)}
            values = [index[label] for label in raw]
    elif raw.dtype.kind in "biu":
        values = raw
    else:
        raise InvalidInput(
            "file.y", f"labels must be integers 0..C-1 or strings, not {raw.dtype} values"
        )
    if len(values) == 0:
        raise InvalidInput("file.y", "y is empty")
    if isinstance(values, np.ndarray):
        low, high = int(values.min()), int(values.max())
    else:
        low, high = min(values), max(values)
    if low < 0:
        raise InvalidInput("file.y", f"labels must be 0..C-1; found {low}")
    if high + 1 > max_classes:
        raise InvalidInput(
            "file.y", f"label {high} makes {high + 1} classes, over the limit of {max_classes}"
        )
    y = np.asarray(values).astype(np.int64)
    if len(np.unique(y)) < 2:
        raise InvalidInput("file.y", "a classification dataset needs at least two classes")
    return y, class_names
