"""The inputs of a run: which files it reads and the case ID each goes by.

A case ID names a scan's output folder and files, so it must be unique within
a run, the same on every rerun of the same inputs (a resumed run skips the
cases whose results exist, by ID), readable, and never derived from patient
data. Real exports break naive rules: a PACS or CD export written the
standard way (DICOM PS3.10 file-set, e.g. by pydicom's ``FileSet``) names
every image ``IM000000`` in its own ``PT*/ST*/SE*`` folder, two sites both
have ``IM0001.dcm``, and file names can be non-ASCII or differ only in a
space.

Each input has a *name*: its path relative to the folder it was found in
(``siteA/IM0001.dcm``), or its file name when it was given on its own. The
case ID is derived from the name:

1. the name without its extension, folders joined by ``_``, every character
   outside ``[A-Za-z0-9._-]`` replaced by ``_`` (``siteA_IM0001``);
2. when that replacement changed something (spaces, non-ASCII, shell
   specials) or left nothing, an 8-hex-digit hash of the name is appended
   (``patient_1-1c4f0a9e``; ``case-5d41402a`` for a name with no ASCII
   letter or digit), so names that differ only there stay apart, whatever
   else is in the run;
3. IDs still shared by several inputs of the run, compared ignoring case
   (macOS and Windows file systems do), are told apart by a hash of the
   name when the names differ (``a.png`` / ``a.dcm``), else by prefixing
   the parent folders that differ (the same name under two input folders),
   else by a hash of the full path.

So the ID of an input depends only on its name, except for inputs that would
collide; the same inputs always give the same IDs. Output folders written
before are checked against the input they belong to (see
``medseg.inference.predict``), so a changed naming can never pair one scan's
results with another scan.

With ``case_id_from="sop_instance_uid"`` the SOP Instance UID replaces step 1
for DICOM files (others keep their name); UIDs shared by several files are
told apart as in step 3, with a warning.

List files (``.txt``) hold one input per line: ``PATH``, or
``PATH<TAB>CASE_ID<TAB>NAME`` as ``medseg list-inputs`` and ``medseg
list-cases`` write them, so that chunk jobs and the workflow's prediction of
a fold use exactly the IDs of the whole batch or of the manifest. A ``.txt``
none of whose lines names an existing file is no list (notes a shell glob
picked up): it is an input, and fails as "not an image" without its lines
being echoed.

While walking folders (and matching globs), files that are not images are
skipped, not reported as failures, and counted in one informational line
("skipped 3 files that are not images: ..."): by their name, hidden files
(``.DS_Store``, ``._IM0001``), a ``DICOMDIR`` and files whose extension is
that of a document or system file (:data:`NOT_IMAGE_SUFFIXES`: ``notes.txt``,
``Thumbs.db``, ``index.html``, ...); by their header, a ``DICOMDIR`` (Media
Storage Directory Storage) and DICOM objects of non-image SOP classes
(structured reports, presentation states, SEG, RT, encapsulated PDF, ...).
Files without an extension, or with any other, are inputs (DICOM files often
have none). A file named explicitly is never skipped: it fails with the
reason instead. An input path that does not exist is an error of the whole
run (:func:`collect_inputs` raises ``FileNotFoundError`` naming it), found
before anything is read; a list file's line naming a missing file is that
input's failure.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import logging
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from medseg.ingest import image_format

log = logging.getLogger(__name__)

CASE_ID_SOURCES = ("filename", "sop_instance_uid")

# PS3.10 8.6: a file-set's directory file is always called DICOMDIR.
DICOMDIR_NAME = "DICOMDIR"

# Extensions of files that are clearly no radiograph (documents, tables,
# metadata, system files such as Thumbs.db and desktop.ini), skipped when
# found while walking a folder. Not here: no extension, numeric "extensions"
# of UID-named files, and anything unknown: those are tried as DICOM.
NOT_IMAGE_SUFFIXES: frozenset[str] = frozenset({
    ".txt", ".csv", ".tsv", ".json", ".xml", ".html", ".htm", ".pdf", ".db", ".ini", ".log", ".md", ".rtf",
    ".doc", ".docx", ".xls", ".xlsx", ".yaml", ".yml", ".lnk", ".url",
})
# Names listed in the one "skipped ... files" log line; the rest are counted.
_SKIPPED_NAMES_LOGGED = 10

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASH_DIGITS = 8
# File names are limited to 255 bytes; outputs add suffixes such as
# ".nii.gz", and very long IDs are unreadable anyway.
MAX_CASE_ID_LENGTH = 120
# An ID that looks like a file of an output folder (results.csv, failures.csv,
# ctr_distribution.png, manifest.csv, ...) would clash with it there.
_OUTPUT_FILE_LIKE = re.compile(r"\.(csv|parquet|png|json|txt|log|tsv|html|nii|gz|dcm)$", re.IGNORECASE)


@dataclass(frozen=True)
class InputFile:
    """One file a run reads.

    Attributes:
        path: the file, as found or given (may be relative to the working
            directory).
        name: POSIX path relative to the folder it was found in, or its
            file name when given on its own (or as written in a list file).
        case_id: the run's unique, file-name-safe identifier of the scan.
        explicit: named by the user (a file argument or a list-file line)
            rather than found while walking a folder or matching a glob.
        url: for an instance on a DICOMweb server, its WADO-RS URL
            (``<root>/studies/<uid>/series/<uid>/instances/<uid>``); ``path``
            is then where a run retrieves it to (:mod:`medseg.ingest.remote`).
    """

    path: Path
    name: str
    case_id: str = ""
    explicit: bool = False
    url: str = ""

    @property
    def source(self) -> str:
        """What the input is read from: its URL, else its absolute path."""
        return self.url or str(self.path.resolve())

    @property
    def stem(self) -> str:
        """File name without its extension(s) (``IM0001`` for ``a/IM0001.dcm``)."""
        return _strip_suffix(PurePosixPath(self.name).name)

    @property
    def name_stem(self) -> str:
        """The name without its extension (``siteA/IM0001``)."""
        return _strip_suffix(self.name)


@dataclass(frozen=True)
class Skipped:
    """A file found while walking a folder that is not an image to read."""

    file: str
    reason: str


@dataclass
class InputSet:
    """What a run reads: the inputs with their case IDs, and what it skipped."""

    files: list[InputFile]
    skipped: list[Skipped]

    def __len__(self) -> int:
        return len(self.files)


# A file extension starts with a letter: "1.2.840.10008.5.1" (files named by
# their UID, common in PACS exports) has none to strip.
_EXTENSION = re.compile(r"(\.nii\.gz|\.[A-Za-z][A-Za-z0-9]{0,4})$", re.IGNORECASE)


def _strip_suffix(name: str) -> str:
    """``name`` without its file extension, if it has one."""
    stripped = _EXTENSION.sub("", name)
    return stripped if stripped and not stripped.endswith("/") else name


def short_hash(text: str) -> str:
    """First 8 hex digits of the SHA-1 of ``text`` (UTF-8): a stable tag."""
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_DIGITS]


def safe_case_id(raw: str) -> str:
    """``raw`` with runs of characters outside ``[A-Za-z0-9._-]`` replaced by
    ``_`` and leading/trailing dots and underscores removed ("" if none is left)."""
    return _UNSAFE.sub("_", raw).strip("._")


def is_safe_case_id(text: str) -> bool:
    """True when ``text`` can be used as a case ID as it is: only letters,
    digits, ``.``, ``_``, ``-``, at most :data:`MAX_CASE_ID_LENGTH` long, and
    not looking like an output file (``results.csv``)."""
    return (bool(text) and safe_case_id(text) == text and len(text) <= MAX_CASE_ID_LENGTH
            and not _OUTPUT_FILE_LIKE.search(text))


def _ascii_letters(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def base_case_id(name: str) -> str:
    """Steps 1 and 2 of the module docstring: the ID of ``name`` on its own.

    Args:
        name: POSIX relative path or file name, e.g. ``"siteA/IM0001.dcm"``.

    Returns:
        A file-name-safe ID, e.g. ``"siteA_IM0001"``, ``"patient_1-1c4f0a9e"``.
    """
    parts = PurePosixPath(_strip_suffix(name)).parts
    # Accented letters keep their base letter (Müller -> Muller) before
    # anything else outside ASCII becomes "_".
    cleaned = [safe_case_id(_ascii_letters(part)) for part in parts]
    joined = "_".join(part for part in cleaned if part)
    if joined and cleaned == list(parts) and is_safe_case_id(joined):
        return joined
    return f"{joined[:MAX_CASE_ID_LENGTH - _HASH_DIGITS - 1] or 'case'}-{short_hash(name)}"


def assign_case_ids(files: Sequence[InputFile], uids: Sequence[str | None] | None = None) -> list[InputFile]:
    """Give every input its case ID (module docstring, steps 1-3).

    Args:
        files: the run's inputs (``case_id`` ignored).
        uids: per input, the SOP Instance UID to use instead of the name, or
            None to use the name.

    Returns:
        ``files`` with ``case_id`` set, in the same order; IDs are unique
        ignoring case.
    """
    uids = list(uids) if uids is not None else [None] * len(files)
    ids = [safe_case_id(uid) if uid and is_safe_case_id(uid) else base_case_id(f.name)
           for f, uid in zip(files, uids)]
    for uid_group in _collisions(ids):
        if any(uids[i] for i in uid_group):
            log.warning("%d inputs share the SOP Instance UID %s (%s): told apart by their names", len(uid_group),
                        ids[uid_group[0]], ", ".join(files[i].name for i in uid_group))
    for _ in range(4):  # each pass removes the collisions it finds; new ones are rare
        groups = _collisions(ids)
        if not groups:
            break
        for group in groups:
            for index, new_id in zip(group, _tell_apart([files[i] for i in group], [ids[i] for i in group])):
                ids[index] = new_id
    if _collisions(ids):  # only reachable with adversarial names; never write over a scan
        ids = [_with_hash(i, str(f.path.resolve())) for f, i in zip(files, ids)]
    return [replace(f, case_id=i) for f, i in zip(files, ids)]


def _collisions(ids: Sequence[str]) -> list[list[int]]:
    """Index groups of IDs that are equal ignoring case."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, case_id in enumerate(ids):
        groups[case_id.casefold()].append(index)
    return [g for g in groups.values() if len(g) > 1]


def _tell_apart(files: Sequence[InputFile], ids: Sequence[str]) -> list[str]:
    """New IDs for inputs that share one (step 3 of the module docstring)."""
    names = [f.name for f in files]
    if len({n.casefold() for n in names}) == len(names):
        return [_with_hash(i, n) for i, n in zip(ids, names)]
    # The same name in several input folders: prefix the nearest folders
    # above the name that make the IDs differ.
    parents = [f.path.resolve().parts[:-len(PurePosixPath(f.name).parts)][::-1] for f in files]
    for depth in range(1, max(len(p) for p in parents) + 1):
        prefixed = ["_".join([*(safe_case_id(part) for part in reversed(p[:depth]) if safe_case_id(part)), i])
                    for p, i in zip(parents, ids)]
        if len({p.casefold() for p in prefixed}) == len(prefixed) and all(map(is_safe_case_id, prefixed)):
            return prefixed
    return [_with_hash(i, str(f.path.resolve())) for f, i in zip(files, ids)]


def _with_hash(case_id: str, text: str) -> str:
    """``case_id`` with the hash of ``text`` appended, within the length limit."""
    return f"{case_id[:MAX_CASE_ID_LENGTH - _HASH_DIGITS - 1]}-{short_hash(text)}"


def lookup_keys(files: Sequence[InputFile]) -> list[tuple[str, ...]]:
    """Per input, the names its ground truth may be stored under, most
    specific first: its name without extension (mask folders mirroring the
    image folders), its case ID, its file stem. A key that more than one
    input of the run has is left out for all of them: it would pair a mask
    with the wrong scan.

    Returns:
        One tuple per input, in order; empty when no key is its own.
    """
    candidates = [(f.name_stem, f.case_id, f.stem) for f in files]
    counts: dict[str, set[int]] = defaultdict(set)
    for index, keys in enumerate(candidates):
        for key in keys:
            counts[key.casefold()].add(index)
    return [tuple(dict.fromkeys(k for k in keys if len(counts[k.casefold()]) == 1)) for keys in candidates]


def ambiguity_note(entry: InputFile, keys: Sequence[str]) -> str:
    """Why a ground truth named after the input's file name alone was not
    used ("" when that name is among its ``keys``): for error messages."""
    if entry.stem in keys:
        return ""
    return (f" (a mask named {entry.stem!r} is not used: other inputs of this run are called {entry.stem!r} too, "
            f"so it could belong to any of them; name it after the image's path {entry.name_stem!r} or its case "
            f"ID {entry.case_id!r})")


# --------------------------------------------------------------------------- finding the files


# Files that mark a folder as medseg's own output (a predict or preprocess
# --out, or one scan's results folder): never read back as input.
_OUTPUT_MARKERS = (("prediction.json",), ("results.csv", "failures.csv"), ("manifest.csv", "failures.csv"))


def is_output_folder(folder: Path) -> bool:
    """True when ``folder`` holds medseg's own outputs (see ``_OUTPUT_MARKERS``)."""
    return any(all((folder / name).is_file() for name in marker) for marker in _OUTPUT_MARKERS)


def list_image_files(folder: str | Path) -> list[Path]:
    """All non-hidden files under ``folder`` (recursive, sorted), or ``[folder]``
    when it is a file. Folders that hold medseg's own outputs (an earlier
    run's ``--out`` inside an input folder) are left out, with an
    informational line.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
    """
    return [f for f in _walk(folder) if not f.name.startswith(".")]


def _walk(folder: str | Path) -> list[Path]:
    """:func:`list_image_files`, hidden files included (hidden folders are
    still not entered): so that the files skipped for being hidden can be
    counted."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    files: list[Path] = []
    for current, dirs, names in os.walk(folder):
        here = Path(current)
        kept = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            if is_output_folder(here / name):
                log.info("not read: %s holds medseg outputs (an earlier --out)", here / name)
                continue
            kept.append(name)
        dirs[:] = kept
        # A broken link is kept: it becomes that input's failure ("file not
        # found"), not a file that silently vanishes from the batch.
        files += [here / name for name in names if (here / name).is_file() or (here / name).is_symlink()]
    return sorted(files)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def _names_an_input(path: Path) -> bool:
    """Whether a ``.txt`` file is a list of inputs: it has no entries, or at
    least one entry's path exists. A text file among images (notes from a
    PACS export, a shell glob's ``notes.txt``) names none, and is then an
    input that fails as "not an image" instead of a list whose every line
    (patient details, perhaps) would be echoed as a missing file."""
    entries = 0
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entries += 1
        first = line.rstrip("\r\n").split("\t")[0].strip()
        if _is_url(first) or url_problem(first):  # a DICOMweb instance (or a mistyped one, said as such)
            return True
        entry = Path(first)
        try:
            if os.path.lexists(entry if entry.is_absolute() else path.parent / entry):
                return True
        except (OSError, ValueError):  # a line no path can be made of (NUL bytes, too long)
            continue
    return entries == 0


def _list_file_entries(path: Path) -> Iterable[tuple[InputFile, str | None]]:
    """(input, its case ID if the line gives one) per line of a list file."""
    base = path.parent
    # utf-8-sig: a BOM (Windows editors) is not part of the first line's URL or path
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\r\n").split("\t")
        url = fields[0].strip() if _is_url(fields[0].strip()) else ""
        if url:
            _check_instance_url(url, f"{path}:{number}")
        else:
            problem = url_problem(fields[0].strip(), f"{path}:{number}")
            if problem and not os.path.lexists(base / fields[0].strip()):  # not a path beside the list either
                raise ValueError(problem)
        entry = Path(url.rsplit("/", 1)[-1] + ".dcm") if url else Path(fields[0].strip())
        file = entry if entry.is_absolute() or url else base / entry
        case_id = fields[1].strip() if len(fields) > 1 and fields[1].strip() else None
        name = fields[2].strip() if len(fields) > 2 and fields[2].strip() else (entry.stem if url else file.name)
        if case_id is not None and not is_safe_case_id(case_id):
            raise ValueError(f"{path}:{number}: case ID {case_id!r} is not usable: it must be letters, digits, "
                             f"'.', '_', '-', at most {MAX_CASE_ID_LENGTH} characters, and not end like an output "
                             "file (.csv, .png, .json, ...)")
        yield InputFile(file, name, explicit=True, url=url), case_id


def url_problem(text: str, where: str = "") -> str | None:
    """Why ``text``, which is not an http(s) URL, looks like a URL that is
    wrong (``ftp://...``; ``http:/host``, ``http//host``; ``host:8042/
    dicom-web/studies?PatientID=...`` without its scheme), or None (a path).

    A path of that form would be globbed or looked for as a file, and its
    query (a patient name or ID, perhaps) echoed as "no file matches ...":
    the message shows the text up to its query only. A path that exists is
    never a problem.
    """
    if _is_url(text) or os.path.lexists(text):
        return None
    shown = re.split(r"[?;#]", text, maxsplit=1)[0].strip() + ("..." if re.search(r"[?;#]", text) else "")
    where = f"{where}: " if where else ""
    scheme = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]+)://", text)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        from medseg.dicomweb import redact_url

        return (f"{where}{redact_url(text)}: medseg reads files, folders, list files and DICOMweb sources (http:// "
                f"or https://), not {scheme.group(1)}://")
    mistyped = re.match(r"\s*https?\s*(:\s*/?\s*(?!/)|//|:\s*//)", text, re.IGNORECASE)
    schemeless = re.search(r"\?[^/?]*=", text) or re.match(r"[\w.-]+:[0-9]+/", text)
    if mistyped or schemeless:
        return f"{where}{shown}: a mistyped URL? A DICOMweb source starts http:// or https://"
    return None


def _check_instance_url(url: str, where: str) -> None:
    """Raise ValueError unless ``url`` is a DICOMweb instance URL (a list
    file's lines name single images; a study or a search there would be
    retrieved as if it were one)."""
    from urllib.parse import urlsplit

    from medseg.dicomweb import DicomWebSource, redact_url

    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{where}: {redact_url(url)}: an instance URL takes no query or '#' part (as list-inputs "
                         "writes them)")
    try:
        source = DicomWebSource.parse(url)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if source.search is not None or not source.instance or source.filters:
        raise ValueError(f"{where}: {redact_url(url)} is not a DICOMweb instance URL (<root>/studies/<uid>/series/"
                         "<uid>/instances/<uid>, as list-inputs writes them); give a study, series or search on the "
                         "command line, or list it first: medseg list-inputs SOURCE --out list.txt")


def _is_url(text: str) -> bool:
    """An http(s) URL (a DICOMweb source or instance), not a path."""
    return text.lower().startswith(("http://", "https://"))


RemoteLister = Callable[[str], tuple[list["InputFile"], list["Skipped"]]]


def collect_inputs(inputs: Sequence[str | Path], case_id_from: str = "filename",
                   exclude: Sequence[str | Path] = (), remote: RemoteLister | None = None) -> InputSet:
    """Every file a run reads from ``inputs``, each with its case ID.

    Args:
        inputs: folders (searched recursively, hidden files skipped), globs,
            list files (``.txt``, see the module docstring) and files, in
            order; a file reached twice (also through a link) counts once,
            with a warning.
        case_id_from: "filename" (the name) or "sop_instance_uid".
        exclude: folders whose files are never inputs, found while walking
            (the run's own output folder, when it lies inside an input folder).
        remote: lists the instances of a DICOMweb source (an http(s) URL
            among ``inputs``), e.g. :func:`medseg.ingest.remote.list_instances`
            bound to a connection: (inputs with ``url`` set, skipped).

    Returns:
        InputSet: the inputs in order with unique case IDs (list-file IDs
        kept as given), and the non-image files skipped while walking
        (hidden files, document and system files by their extension,
        DICOMDIR, non-image DICOM objects; see the module docstring), which
        are counted in one informational log line.

    Raises:
        ValueError: ``case_id_from`` unknown; a list file gives an unsafe case
            ID or one case ID to two files, or a line that is no instance
            URL but looks like a URL; an input that looks like a mistyped or
            non-http URL (:func:`url_problem`); a DICOMweb source without
            ``remote``.
        FileNotFoundError: an input that is not a glob (a folder, list file
            or file) does not exist; the message names every such input.
    """
    if case_id_from not in CASE_ID_SOURCES:
        raise ValueError(f"case_id_from must be one of {CASE_ID_SOURCES}, got {case_id_from!r}")
    for item in inputs:
        problem = url_problem(str(item))
        if problem:
            raise ValueError(problem)
    missing = [str(item) for item in inputs if not _is_url(str(item))
               and not any(ch in str(item) for ch in "*?[") and not os.path.lexists(str(item))]
    if missing:
        raise FileNotFoundError(f"input{'s' if len(missing) > 1 else ''} not found (no such file or folder): "
                                f"{', '.join(missing)}")
    found: list[InputFile] = []
    given_ids: list[str | None] = []
    remote_skipped: list[Skipped] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if _is_url(text):
            if remote is None:
                raise ValueError(f"{text.split('?')[0]}: a DICOMweb source, but no connection to list it with")
            listed, passed_over = remote(text)
            found += listed
            given_ids += [None] * len(listed)
            remote_skipped += passed_over
        elif any(ch in text for ch in "*?["):
            root = _glob_root(text)
            matches = [Path(m) for m in sorted(globbing.glob(text, recursive=True)) if Path(m).is_file()]
            if not matches:
                log.warning("no file matches %s", text)
            for match in matches:
                found.append(InputFile(match, _relative_name(match, root)))
                given_ids.append(None)
        elif path.is_dir():
            for file in _walk(path):
                found.append(InputFile(file, file.relative_to(path).as_posix()))
                given_ids.append(None)
        elif path.suffix.lower() == ".txt" and path.is_file() and _names_an_input(path):
            for entry, case_id in _list_file_entries(path):
                found.append(entry)
                given_ids.append(case_id)
        else:
            found.append(InputFile(path, path.name, explicit=True))
            given_ids.append(None)

    files: list[InputFile] = []
    ids: list[str | None] = []
    skipped: list[Skipped] = list(remote_skipped)
    skipped_names: list[str] = [PurePosixPath(s.file).name + f" ({s.reason})" for s in remote_skipped]
    seen: dict[Path | str, InputFile] = {}
    excluded = [Path(e).resolve() for e in exclude]
    repeated_instances = 0
    for entry, case_id in zip(found, given_ids):
        key = entry.url or entry.path.resolve()
        if not entry.explicit and any(key.is_relative_to(folder) for folder in excluded):
            continue  # the run's own outputs
        if key in seen:
            if entry.url:  # overlapping DICOMweb sources (a study and a search): counted, said once below
                repeated_instances += 1
            else:
                log.warning("%s is the same file as %s: read once", entry.path, seen[key].path)
            continue
        seen[key] = entry
        reason = None if entry.explicit else non_image_reason(entry.path)
        if reason:
            skipped.append(Skipped(str(entry.path), reason))
            short = "a file-set directory" if reason.startswith(DICOMDIR_NAME) else reason
            skipped_names.append(f"{entry.name} ({short})")
            log.debug("skipped %s: %s", entry.path, reason)
            continue
        files.append(entry)
        ids.append(case_id)
    if repeated_instances:
        log.warning("%d DICOMweb instance(s) named by more than one source: each read once", repeated_instances)
    if skipped:
        more = len(skipped_names) - _SKIPPED_NAMES_LOGGED
        log.info("skipped %d file%s that %s not images: %s%s", len(skipped), "" if len(skipped) == 1 else "s",
                 "is" if len(skipped) == 1 else "are", ", ".join(skipped_names[:_SKIPPED_NAMES_LOGGED]),
                 f" and {more} more" if more > 0 else "")
    return InputSet(_with_case_ids(files, ids, case_id_from), skipped)


def _relative_name(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.name


def _with_case_ids(files: list[InputFile], given: list[str | None], case_id_from: str) -> list[InputFile]:
    """Keep the IDs list files give; assign the others around them."""
    fixed = [i for i in given if i]
    duplicates = sorted({i for i in fixed if sum(j.casefold() == i.casefold() for j in fixed) > 1})
    if duplicates:
        raise ValueError(f"list files give the case IDs {', '.join(duplicates)} to more than one file")
    if fixed and len(fixed) == len(files):
        return [replace(f, case_id=i) for f, i in zip(files, fixed)]  # type: ignore[arg-type]
    free = [k for k, i in enumerate(given) if not i]
    uids = ([files[k].name if files[k].url else sop_instance_uid(files[k].path) for k in free]
            if case_id_from == "sop_instance_uid" else None)
    assigned = assign_case_ids([files[k] for k in free], uids)
    taken = {i.casefold() for i in fixed}
    out = [replace(f, case_id=i) if i else f for f, i in zip(files, given)]
    for k, entry in zip(free, assigned):
        case_id = entry.case_id
        if case_id.casefold() in taken:  # a list file already uses it for another file
            case_id = f"{case_id}-{short_hash(str(entry.path.resolve()))}"
        out[k] = entry if case_id == entry.case_id else replace(entry, case_id=case_id)
    return out


def list_file_line(path: str | Path, case_id: str, name: str) -> str:
    """One line of a list file: ``PATH<TAB>CASE_ID<TAB>NAME`` and a newline.

    Raises:
        ValueError: a field holds a tab or a line break, or the ID is unsafe.
    """
    fields = [str(path), case_id, name]
    if any(ch in field for field in fields for ch in "\t\r\n") or not is_safe_case_id(case_id):
        raise ValueError(f"cannot write {fields!r} as a list-file line")
    return "\t".join(fields) + "\n"


# --------------------------------------------------------------------------- DICOM header peeks


def _peek(path: Path):
    """The file's DICOM header without pixel data, or None if it is not a
    Part 10 file (legacy files are read, and judged, later)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError, EOFError):
        return None


def non_image_name_reason(name: str) -> str | None:
    """Why a file is clearly not an image by its name alone, or None.

    Args:
        name: the file name (a path's last part is used).

    Returns:
        "hidden file" (the name starts with "."), the DICOMDIR reason (the
        PS3.10 name of a file-set's directory), "a .txt file" and the like
        for the extensions of :data:`NOT_IMAGE_SUFFIXES`; None otherwise (no
        extension, or any other: the file may be DICOM).
    """
    base = PurePosixPath(str(name).replace("\\", "/")).name
    if base.startswith("."):
        return "hidden file"
    if base.upper() == DICOMDIR_NAME:
        return "DICOMDIR (the directory of a DICOM file-set, not an image)"
    suffix = PurePosixPath(base).suffix.lower()
    if suffix in NOT_IMAGE_SUFFIXES:
        return f"a {suffix} file"
    return None


def non_image_reason(path: Path) -> str | None:
    """Why a file found while walking is not an image to read, or None.

    Skipped: files that are no image by their name
    (:func:`non_image_name_reason`: hidden, DICOMDIR, document and system
    file extensions), a ``DICOMDIR`` by its Media Storage SOP Class, and
    DICOM objects whose SOP Class is not an image storage class. Anything
    else, unreadable files included, is an input: it gets a result or a
    failure that names the problem.
    """
    from medseg.ingest.dicom import MEDIA_STORAGE_DIRECTORY_STORAGE, is_image_sop_class

    by_name = non_image_name_reason(path.name)
    if by_name:
        return by_name
    if image_format(path) != "dicom":
        return None
    ds = _peek(path)
    if ds is None:
        return None
    media = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if media == MEDIA_STORAGE_DIRECTORY_STORAGE:
        return "DICOMDIR (the directory of a DICOM file-set, not an image)"
    sop = str(ds.get("SOPClassUID", "") or media)
    if sop and not is_image_sop_class(sop):
        from pydicom.uid import UID

        return f"not an image: {UID(sop).name}"
    return None


def sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID of a DICOM file, or None (not DICOM, none given)."""
    if image_format(path) != "dicom":
        return None
    ds = _peek(path)
    if ds is None:
        import pydicom

        try:  # legacy files without a preamble
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - the real read reports the problem
            return None
    uid = ds.get("SOPInstanceUID")
    return str(uid).strip() or None if uid else None


__all__ = ["CASE_ID_SOURCES", "NOT_IMAGE_SUFFIXES", "InputFile", "ambiguity_note", "InputSet", "Skipped", "url_problem",
           "assign_case_ids", "base_case_id", "collect_inputs", "is_safe_case_id", "list_file_line",
           "list_image_files", "lookup_keys", "non_image_name_reason", "non_image_reason", "safe_case_id",
           "short_hash", "sop_instance_uid"]
